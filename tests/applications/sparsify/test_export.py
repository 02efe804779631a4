"""Export of pruned networks as smaller dense models (issue #6).

For every supported model, with random test-time gates (some exactly 0, the others
continuous) and BatchNorm layers with non-trivial running statistics, the exported model
must reproduce the gated model's eval outputs (max abs difference <= 1e-5 in float32), have
exactly the parameter count implied by the kept widths, survive a JSON round trip of its
spec and a reload in a fresh process, and trace with ``torch.jit.trace`` and
``torch.export.export``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from applications.sparsify.export import (
    ConstantChannelConv2d,
    ExportError,
    SelectUnits,
    build_from_spec,
    export,
    load_exported,
    save_exported,
    save_exported_file,
    spec_num_params,
)
from applications.sparsify.flops import count_params
from applications.sparsify.layers import L0Linear
from applications.sparsify.models import WideResNet, lenet5_caffe, mlp, to_l0
from applications.sparsify.network import GatedNetwork

REPO = Path(__file__).resolve().parents[3]
TOL = 1e-5


# ---------------------------------------------------------------------------- helpers
def set_gates(net: GatedNetwork, seed: int, zero_frac: float = 0.35) -> None:
    """Test-time gates: 0 with probability ``zero_frac``, else ``pi`` in (0.55, 0.98)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in net.gated_layers().values():
            gate = layer.gate
            n = gate.num_units
            off = torch.rand(n, generator=gen) < zero_frac
            pi = 0.55 + 0.43 * torch.rand(n, generator=gen)
            probs = torch.where(off, torch.full_like(pi, 0.05), pi)
            gate.phi.copy_(gate.parameterization.inverse(probs))


def randomize_bn(module: nn.Module, seed: int) -> None:
    """Running statistics and affine parameters far from the defaults; the constant a
    removed channel leaves after BN + ReLU, ``relu(beta - gamma mean / std)``, is often > 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(0.5 + torch.rand(n, generator=gen))
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
                m.bias.copy_(torch.randn(n, generator=gen) * 0.5 + 0.3)
                m.num_batches_tracked.fill_(7)


def user_sequential() -> nn.Sequential:
    """A user's own chain: padded convs after BN (border correction), a 1x1 conv (bias
    fold), Flatten into a gated Linear, BatchNorm1d and Dropout."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 10, 1), nn.BatchNorm2d(10), nn.ReLU(),
        nn.Flatten(), nn.Linear(10 * 4 * 4, 32), nn.BatchNorm1d(32), nn.ReLU(),
        nn.Dropout(0.2), nn.Linear(32, 5),
    )


def build(name: str, seed: int = 0, estimator: str = "arm") -> tuple[GatedNetwork, tuple]:
    torch.manual_seed(seed)
    if name == "mlp":
        net, shape = GatedNetwork(mlp(), estimator), (1, 28, 28)
    elif name == "lenet5":
        net, shape = GatedNetwork(lenet5_caffe(), estimator), (1, 28, 28)
    elif name == "wrn":
        net, shape = GatedNetwork(WideResNet(depth=10, width=2, num_classes=7), estimator), (
            3, 16, 16)
    elif name == "user":
        net, shape = GatedNetwork(to_l0(user_sequential()), estimator), (3, 8, 8)
    else:
        raise KeyError(name)
    set_gates(net, seed + 1)
    randomize_bn(net, seed + 2)
    return net.eval(), shape


def gates(net: GatedNetwork) -> dict[str, torch.Tensor]:
    return {k: v.gate.deterministic().detach() for k, v in net.gated_layers().items()}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def expected_params(name: str, net: GatedNetwork) -> int:
    """Parameter count implied by the kept widths, computed from the gates directly."""
    g = {k: (v > 0) for k, v in gates(net).items()}
    if name == "mlp":
        k1, k2, k3 = (int(g[k].sum()) for k in ("1", "3", "5"))
        return k1 * k2 + k2 + k2 * k3 + k3 + k3 * 10 + 10
    if name == "lenet5":
        c1 = int(g["0"].sum())
        cols = g["7"].reshape(50, 16) & g["3"].unsqueeze(1)  # kept fc1 inputs of live channels
        c2 = int(cols.any(1).sum())
        n_cols, h = int(cols.sum()), int(g["9"].sum())
        return (c1 * 25 + c1) + (c2 * c1 * 25 + c2) + (n_cols * h + h) + (h * 10 + 10)
    if name == "wrn":
        total = 3 * 16 * 9
        in_planes = 16
        for i, planes in enumerate((32, 32 * 2, 64 * 2)):  # width 2, one block per stage
            k = int(g[f"blocks.{i}.conv1"].sum())
            total += 2 * in_planes + k * in_planes * 9 + 2 * k + planes * k * 9
            total += in_planes * planes  # 1x1 shortcut (in != out in every block here)
            in_planes = planes
        return total + 2 * in_planes + in_planes * 7 + 7
    if name == "user":
        k1, k2 = int(g["0"].sum()), int(g["3"].sum())
        cols = g["11"].reshape(10, 16) & g["7"].unsqueeze(1)
        k3, n_cols, h = int(cols.any(1).sum()), int(cols.sum()), int(g["15"].sum())
        return ((k1 * 27 + k1) + 2 * k1 + (k2 * k1 * 9 + k2) + 2 * k2 + (k3 * k2 + k3) + 2 * k3
                + (n_cols * h + h) + 2 * h + (h * 5 + 5))
    raise KeyError(name)


MODELS = ["mlp", "lenet5", "wrn", "user"]


# ---------------------------------------------------------------------------- exactness
def test_gates_are_non_trivial():
    for name in MODELS:
        net, _ = build(name)
        for layer_name, z in gates(net).items():
            assert (z == 0).any(), (name, layer_name)
            assert ((z > 0) & (z < 1)).any(), (name, layer_name)


@pytest.mark.parametrize("name", MODELS)
def test_export_matches_gated_model_and_param_count(name):
    net, shape = build(name)
    exported = export(net, input_shape=shape)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, *shape, generator=gen)
    with torch.no_grad():
        ref, out = net(x), exported.module(x)
    assert out.shape == ref.shape
    assert max_diff(out, ref) <= TOL
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= TOL
    n = count_params(exported.module)
    assert n == expected_params(name, net)
    assert n == spec_num_params(exported.spec) == exported.spec["num_params"]
    assert n < count_params(net)
    assert not any(isinstance(p, nn.Parameter) and p.requires_grad is False
                   for p in exported.module.parameters())
    # no gates left, plain layers only
    assert not any("gate" in k or "phi" in k for k in exported.module.state_dict())


def test_export_does_not_modify_the_gated_model():
    net, shape = build("lenet5")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    export(net, input_shape=shape)
    assert net.training  # mode restored after the check
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_export_of_the_wrapped_module_and_default_input_shape():
    net, shape = build("mlp")
    exported = export(net.module)  # a bare Sequential of L0 layers works too
    assert exported.spec["input_shape"] == [784]  # inferred from the first Linear
    x = torch.randn(8, *shape)
    with torch.no_grad():
        assert max_diff(exported.module(x), net(x)) <= TOL
    assert isinstance(exported.module[1], SelectUnits)  # unused input pixels are dropped


def test_mlp_widths_follow_the_gates():
    net, _ = build("mlp")
    g = gates(net)
    widths = export(net).spec["widths"]
    assert [w["in"] for w in widths] == [
        [int((g["1"] > 0).sum()), 784], [int((g["3"] > 0).sum()), 300],
        [int((g["5"] > 0).sum()), 100]]
    assert widths[-1]["out"] == [10, 10]


@pytest.mark.parametrize("name", ["wrn", "user"])
def test_border_correction_is_exercised_and_needed(name):
    """Removed channels after BN + ReLU feed zero-padded 3x3 convs: folding them into a
    uniform bias would be wrong near the borders; the correction keeps the output exact."""
    net, shape = build(name)
    exported = export(net, input_shape=shape)
    corrected = [m for m in exported.module.modules() if isinstance(m, ConstantChannelConv2d)]
    assert corrected and all(bool(m.const_kernel.abs().sum() > 0) for m in corrected)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        ref = net(x)
        assert max_diff(exported.module(x), ref) <= TOL
        for m in corrected:
            m.const_kernel.zero_()
        assert max_diff(exported.module(x), ref) > 1e-3


def test_wrn_export_is_exact_for_other_input_sizes():
    net, _ = build("wrn")
    exported = export(net, input_shape=(3, 16, 16))
    for shape in [(3, 12, 20), (3, 9, 9)]:
        x = torch.randn(3, *shape)
        with torch.no_grad():
            assert max_diff(exported.module(x), net(x)) <= TOL


def test_hard_concrete_gates():
    net, shape = build("mlp", estimator="hard_concrete")
    z = torch.cat(list(gates(net).values()))
    assert (z == 1).any() and (z == 0).any() and ((z > 0) & (z < 1)).any()
    exported = export(net, input_shape=shape)
    x = torch.randn(8, *shape)
    with torch.no_grad():
        assert max_diff(exported.module(x), net(x)) <= TOL
    assert count_params(exported.module) == expected_params("mlp", net)


def test_weight_gates_remove_empty_rows_and_columns():
    torch.manual_seed(0)
    seq = nn.Sequential(L0Linear(20, 30, gate="weight"), nn.ReLU(),
                        L0Linear(30, 4, gate="weight"))
    net = GatedNetwork(seq)
    set_gates(net, 5, zero_frac=0.85)
    exported = export(net)
    x = torch.randn(8, 20)
    with torch.no_grad():
        assert max_diff(exported.module(x), net(x)) <= TOL
    z2 = seq[2].gate.deterministic().reshape(4, 30)
    z0 = seq[0].gate.deterministic().reshape(30, 20)
    hidden = int(((z2 != 0).any(0) & (z0 != 0).any(1)).sum())
    assert exported.spec["widths"][0]["out"] == [hidden, 30]
    assert hidden < 30


def test_all_units_of_a_layer_removed():
    """A layer whose gates are all 0: the output is a constant, the export stays exact and
    no layer shrinks to zero width."""
    net, shape = build("user")
    with torch.no_grad():
        net.module[11].gate.phi.fill_(-5.0)  # every input of the first Linear off
    exported = export(net, input_shape=shape)
    x = torch.randn(8, *shape)
    with torch.no_grad():
        ref = net(x)
        assert max_diff(exported.module(x), ref) <= TOL
        assert max_diff(ref, ref[:1].expand_as(ref)) <= TOL  # constant output
    assert count_params(exported.module) < 120  # the convolutions are gone
    for s in exported.spec["layers"]:
        for key in ("in_features", "out_features", "in_channels", "out_channels",
                    "num_features"):
            assert s.get(key, 1) >= 1


def test_plain_network_exports_unchanged():
    torch.manual_seed(0)
    seq = user_sequential()
    randomize_bn(seq, 0)
    seq.eval()
    exported = export(seq, input_shape=(3, 8, 8))
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert max_diff(exported.module(x), seq(x)) <= TOL
    assert count_params(exported.module) == count_params(seq)


def test_spec_is_json_and_rebuilds():
    for name in MODELS:
        net, shape = build(name)
        exported = export(net, input_shape=shape)
        spec = json.loads(json.dumps(exported.spec))
        module = build_from_spec(spec)
        module.load_state_dict(exported.module.state_dict(), strict=True)
        x = torch.randn(4, *shape)
        with torch.no_grad():
            assert max_diff(module(x), exported.module(x)) == 0.0


def test_save_and_load_in_process(tmp_path):
    net, shape = build("lenet5")
    exported = export(net, input_shape=shape)
    save_exported(exported, tmp_path / "folder")
    save_exported_file(exported, tmp_path / "model.pt")
    assert (tmp_path / "folder" / "spec.json").is_file()
    assert (tmp_path / "folder" / "state_dict.pt").is_file()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        ref = net(x)
        for path in (tmp_path / "folder", tmp_path / "model.pt"):
            module = load_exported(path)
            assert not module.training
            assert max_diff(module(x), ref) <= TOL


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_exported(tmp_path / "missing")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ExportError, match="not an exported model"):
        load_exported(tmp_path / "other.pt")


@pytest.mark.parametrize("content", [b"", b"hello, not a torch file\n", b"PK\x03\x04trunc"])
def test_load_of_a_file_that_is_not_an_export_names_it(tmp_path, content):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ExportError, match=r"cannot read .*model\.pt: expected a file written "
                       r"by torch\.save"):
        load_exported(path)


def test_load_of_a_broken_folder_names_the_file(tmp_path):
    net, shape = build("mlp")
    save_exported(export(net, input_shape=shape), tmp_path / "folder")
    (tmp_path / "folder" / "state_dict.pt").write_bytes(b"")
    with pytest.raises(ExportError, match=r"state_dict\.pt: expected a file written by"):
        load_exported(tmp_path / "folder")
    (tmp_path / "folder" / "spec.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"spec\.json: expected the JSON spec"):
        load_exported(tmp_path / "folder")


def test_load_of_a_mismatched_pair_is_an_export_error(tmp_path):
    """The spec of one export with the weights of another: an ExportError, not a bare one."""
    for name in ("mlp", "lenet5"):
        net, shape = build(name)
        save_exported(export(net, input_shape=shape), tmp_path / name)
    os.replace(tmp_path / "lenet5" / "state_dict.pt", tmp_path / "mlp" / "state_dict.pt")
    with pytest.raises(ExportError, match="the weights do not match the spec"):
        load_exported(tmp_path / "mlp")


def _two_exports():
    """Exports of two different models (different specs) with the same input shape."""
    return tuple(export(build(name)[0], input_shape=(1, 28, 28)) for name in ("mlp", "lenet5"))


def _save_that_dies(obj, f, *args, **kwargs):
    """torch.save that writes part of its output, then stops like a killed process."""
    if isinstance(f, (str, os.PathLike)):
        Path(f).write_bytes(b"partial")
    else:
        f.write(b"partial")
    raise KeyboardInterrupt


@pytest.mark.parametrize("target", ["pruned", "model.pt"])  # the folder and the file
def test_save_exported_killed_midway_leaves_the_previous_export(tmp_path, monkeypatch,
                                                                 target):
    first, second = _two_exports()
    path = tmp_path / target
    save = save_exported if target == "pruned" else save_exported_file
    save(first, path)
    monkeypatch.setattr(torch, "save", _save_that_dies)
    with pytest.raises(KeyboardInterrupt):
        save(second, path)
    monkeypatch.undo()
    # the old spec with the old weights, not the new spec next to the old (or torn) weights
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert max_diff(load_exported(path)(x), first.module(x)) == 0.0
    if target == "pruned":
        assert json.loads((path / "spec.json").read_text()) == first.spec
    else:
        assert torch.load(path, weights_only=True)["spec"] == first.spec
    assert sorted(p.name for p in tmp_path.iterdir()) == [target]  # no temporary left


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_save_exported_replaces_a_previous_export(tmp_path, monkeypatch, exchange):
    import applications.sparsify.export as export_module

    first, second = _two_exports()
    folder = tmp_path / "pruned"
    save_exported(first, folder)
    if not exchange:  # other systems: the fallback of two renames
        monkeypatch.setattr(export_module, "_exchange", lambda a, b: False)
    save_exported(second, folder)
    assert json.loads((folder / "spec.json").read_text()) == second.spec
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert max_diff(load_exported(folder)(x), second.module(x)) <= TOL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_save_exported_into_a_link_or_a_folder_of_other_files(tmp_path):
    first, second = _two_exports()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_exported(first, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()  # the link still points at the replaced folder
    assert json.loads((tmp_path / "real" / "spec.json").read_text()) == first.spec
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds files other than an export \(notes.txt"):
        save_exported(second, tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        save_exported(second, tmp_path / "file")


def test_fresh_process_reload(tmp_path):
    """Save every model, reload it in a new Python process from spec + state dict only."""
    x_by_name, ref_by_name = {}, {}
    for name in MODELS:
        net, shape = build(name)
        exported = export(net, input_shape=shape)
        save_exported(exported, tmp_path / name)
        save_exported_file(exported, tmp_path / f"{name}.pt")
        x = torch.randn(6, *shape)
        with torch.no_grad():
            ref_by_name[name] = net(x)
        x_by_name[name] = x
    torch.save(x_by_name, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch
        from applications.sparsify.export import load_exported
        xs = torch.load({str(tmp_path / "inputs.pt")!r})
        out = {{}}
        with torch.no_grad():
            for name, x in xs.items():
                out[name] = load_exported({str(tmp_path)!r} + "/" + name)(x)
                out[name + ".pt"] = load_exported({str(tmp_path)!r} + "/" + name + ".pt")(x)
        torch.save(out, {str(tmp_path / "outputs.pt")!r})
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    outputs = torch.load(tmp_path / "outputs.pt")
    for name in MODELS:
        assert max_diff(outputs[name], ref_by_name[name]) <= TOL, name
        assert max_diff(outputs[name + ".pt"], ref_by_name[name]) <= TOL, name


# ---------------------------------------------------------------------------- tracing
@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
@pytest.mark.parametrize("name", MODELS)
def test_jit_trace(name):
    net, shape = build(name)
    module = export(net, input_shape=shape).module
    x, x2 = torch.randn(4, *shape), torch.randn(4, *shape)
    with torch.no_grad():
        traced = torch.jit.trace(module, x)
        assert max_diff(traced(x2), net(x2)) <= TOL


@pytest.mark.parametrize("name", MODELS)
def test_torch_export(name):
    net, shape = build(name)
    module = export(net, input_shape=shape).module
    x, x2 = torch.randn(4, *shape), torch.randn(4, *shape)
    program = torch.export.export(module, (x,))
    with torch.no_grad():
        assert max_diff(program.module()(x2), net(x2)) <= TOL


# ---------------------------------------------------------------------------- errors
class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_unsupported_layers_are_named():
    cases = [
        (nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.ReLU()), r"'0' \(Conv2d\).*groups=2"),
        (nn.Sequential(nn.Conv2d(3, 4, 3), Residual(), nn.Flatten()),
         r"'1' \(Residual\).*container"),
        (nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.LayerNorm(4))),
         r"'1\.1' \(LayerNorm\)"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False)),
         r"'1' \(BatchNorm1d\).*running statistics"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=1)), r"'1' \(Softmax\)"),
    ]
    for module, pattern in cases:
        with pytest.raises(ExportError, match=pattern):
            export(module)


def test_unsupported_top_level_module_is_named():
    with pytest.raises(ExportError, match=r"Residual.*container"):
        export(to_l0(Residual()))


def test_shape_mismatch_is_reported():
    with pytest.raises(ExportError, match=r"'2' \(Linear\) expects 7 input units"):
        export(nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(7, 2)))


# ---------------------------------------------------------------------------- devices
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MODELS)
def test_export_on_cuda(name, tmp_path):
    """A network on the GPU exports to a module on the GPU; saved files hold CPU tensors."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convolutions would blur the comparison
    try:
        net, shape = build(name)
        net = net.cuda()
        exported = export(net, input_shape=shape)
        assert all(t.is_cuda for t in exported.module.state_dict().values())
        x = torch.randn(8, *shape, device="cuda")
        with torch.no_grad():
            ref = net(x)
            assert max_diff(exported.module(x), ref) <= TOL
            save_exported(exported, tmp_path)
            state = torch.load(tmp_path / "state_dict.pt", weights_only=True)
            assert all(not t.is_cuda for t in state.values())
            reloaded = load_exported(tmp_path, map_location="cuda")
            assert max_diff(reloaded(x), ref) <= TOL
    finally:
        torch.backends.cudnn.allow_tf32 = old

"""Users' own models: what ``to_l0`` gates, what it keeps, what it refuses, and how they train
and export (shared layers, tied weights, attention, embeddings, float64, non-chains)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.utils.data import TensorDataset

from applications.sparsify.export import (
    ExportError,
    build_from_spec,
    export,
    load_exported,
    save_exported,
    save_exported_file,
)
from applications.sparsify.flops import count_flops
from applications.sparsify.layers import L0Layer, L0Linear
from applications.sparsify.models import to_l0
from applications.sparsify.network import GatedNetwork
from applications.sparsify.train import ConfigError, TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")


def _all_gates_on(net: GatedNetwork) -> dict[str, torch.Tensor]:
    return {n: torch.ones(1, g.gate.num_units) for n, g in net.gated_layers().items()}


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        e = self.emb(t)
        a, _ = self.attn(e, e, e)
        return self.fc(a.mean(1))


def _encoder_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Embedding(20, 8),
        nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
        nn.Flatten(), nn.Linear(8 * 5, 2),
    )


@pytest.mark.parametrize("make", [AttentionNet, _encoder_net], ids=["mha", "encoder_layer"])
def test_every_gate_to_l0_adds_acts_on_the_output(make):
    """MultiheadAttention passes out_proj.weight to a kernel and TransformerEncoderLayer's
    inference fast path does so for linear1/linear2: gates there would be trained and
    reported as pruning but have no effect, so to_l0 keeps those modules whole."""
    torch.manual_seed(0)
    net = GatedNetwork(to_l0(make()), "arm", lam=0.1)
    assert list(net.gated_layers()) == (["fc"] if make is AttentionNet else ["3"])
    t = torch.randint(0, 20, (4, 5))
    net.eval()
    for name, layer in net.gated_layers().items():
        with torch.no_grad():
            before = net(t)
            saved = layer.gate.phi.clone()
            layer.gate.phi.fill_(-10.0)  # every unit of this layer off
            after = net(t)
            layer.gate.phi.copy_(saved)
        assert not torch.allclose(before, after), name
    inner = net.module.attn if make is AttentionNet else net.module[1]
    assert not any(isinstance(m, L0Layer) for m in inner.modules())


def test_to_l0_keeps_a_layer_used_twice_one_layer():
    shared = nn.Linear(6, 6)
    original = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), nn.Linear(6, 2))
    converted = to_l0(original)
    assert type(converted[0]) is L0Linear and converted[2] is converted[0]
    assert original[0] is shared and type(shared) is nn.Linear  # not modified
    net = GatedNetwork(converted, "arm", lam=0.0)
    assert list(net.gated_layers()) == ["0", "4"]
    x = torch.randn(5, 6)
    original.eval(), net.eval()
    with net.sampled(_all_gates_on(net)), torch.no_grad():
        assert torch.allclose(converted(x), original(x), atol=1e-6)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.hidden = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.emb.weight  # weight tying

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.emb(t)))).mean(1)


def test_to_l0_keeps_tied_weights_tied():
    original = TiedLM()
    converted = to_l0(original)
    assert isinstance(converted.head, L0Linear)
    assert converted.head.weight is converted.emb.weight
    assert converted.emb.weight is not original.emb.weight  # a copy
    net = GatedNetwork(converted, "arm", lam=0.1, num_train=10)
    assert sum(p is converted.emb.weight for p in net.weight_parameters()) == 1
    t = torch.randint(0, 12, (4, 3))
    net.train()
    net.objective(t, torch.randint(0, 12, (4,))).loss.backward()
    assert converted.emb.weight.grad is not None


class Doubled(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(x)


def test_to_l0_keeps_layers_whose_forward_it_would_not_reproduce():
    torch.manual_seed(0)
    original = nn.Sequential(Doubled(4, 5), nn.ReLU(), weight_norm(nn.Linear(5, 5)), nn.ReLU(),
                             nn.Linear(5, 2)).eval()
    converted = to_l0(original)
    assert type(converted[0]) is Doubled
    assert not isinstance(converted[2], L0Linear) and hasattr(converted[2], "parametrizations")
    assert type(converted[4]) is L0Linear
    net = GatedNetwork(converted, "arm", lam=0.0)
    x = torch.randn(3, 4)
    with net.sampled(_all_gates_on(net)), torch.no_grad():
        assert torch.allclose(converted(x), original(x), atol=1e-6)


def test_to_l0_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"layer '1\.0' \(Conv2d\).*dilation=1.*\(2, 2\)"):
        to_l0(nn.Sequential(nn.ReLU(), nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2))))
    with pytest.raises(ValueError, match=r"layer '0' \(LazyLinear\).*not initialised"):
        to_l0(nn.Sequential(nn.LazyLinear(3), nn.ReLU()))
    with pytest.raises(TypeError, match="nn.Module; got list"):
        to_l0([nn.Linear(2, 2)])


def test_export_runs_a_reused_module_at_every_place():
    torch.manual_seed(0)
    act, twice = nn.ReLU(), nn.Linear(6, 6)
    with torch.no_grad():
        twice.bias.fill_(-0.3)  # the second ReLU clips something
    module = nn.Sequential(nn.Linear(4, 6), act, twice, act, twice, act, nn.Linear(6, 2))
    net = GatedNetwork(to_l0(module, init_drop_rate=0.3), "arm", lam=0.0)
    exported = export(net, input_shape=(4,))
    assert exported.max_abs_diff is not None and exported.max_abs_diff <= 1e-5
    assert len(exported.module) == len(module)  # the reused layer appears twice
    x = torch.randn(7, 4)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(exported.module(x), net(x), atol=1e-5)


def test_float64_export_reloads_in_float64(tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                           nn.Flatten(), nn.Linear(4 * 5 * 5, 3)).double()
    net = GatedNetwork(to_l0(module, init_drop_rate=0.4), "arm", lam=0.0)
    with torch.no_grad():
        net.module[0].gate.phi[:2] = -1.0  # two channels off
    exported = export(net, input_shape=(1, 5, 5))
    assert exported.spec["dtype"] == "float64"
    save_exported(exported, tmp_path / "folder")
    save_exported_file(exported, tmp_path / "model.pt")
    x = torch.randn(6, 1, 5, 5, dtype=torch.float64)
    net.eval()
    with torch.no_grad():
        ref = net(x)
        for path in (tmp_path / "folder", tmp_path / "model.pt"):
            loaded = load_exported(path)
            assert {p.dtype for p in loaded.parameters()} == {torch.float64}
            assert torch.allclose(loaded(x), ref, rtol=1e-12, atol=1e-12), path
    spec = json.loads((tmp_path / "folder" / "spec.json").read_text())
    assert next(build_from_spec(spec).parameters()).dtype == torch.float64
    del spec["dtype"]  # written before the dtype was recorded: float32, as documented
    assert next(build_from_spec(spec).parameters()).dtype == torch.float32
    with pytest.raises(ExportError, match="floating torch dtype.*'int64'"):
        build_from_spec({**spec, "dtype": "int64"})


def test_count_flops_of_a_model_taking_token_ids():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    assert count_flops(model, (3,), torch.int64) == 24


def _tokens(n_train: int = 60, n_test: int = 20):
    gen = torch.Generator().manual_seed(0)
    t = torch.randint(0, 20, (n_train + n_test, 5), generator=gen)
    y = (t[:, 0] < 10).long()
    return (TensorDataset(t[:n_train], y[:n_train]), TensorDataset(t[n_train:], y[n_train:]))


def _config(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(model=name, dataset="toy", epochs=1, batch_size=20, lam=0.05,
                progress=False, out=str(tmp_path / name), device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 4)
        self.fc = nn.Sequential(nn.Linear(20, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(t).flatten(1))


@pytest.mark.filterwarnings("ignore:export of the pruned network failed")
def test_train_on_token_ids_finishes_with_estimated_counts(tmp_path):
    """A model that export cannot shrink (not a Sequential) on integer inputs: the run's
    summary estimates the counts from one dummy example of the data's dtype."""
    summary = train(_config(tmp_path, "tokens", baseline="dense"), module=TokenNet(),
                    data=_tokens())
    assert summary["compression_method"] == "estimate"
    assert "cannot export layer 'TokenNet'" in summary["export_error"]
    assert summary["flops_dense"] == 20 * 8 + 8 * 2
    dense = train(_config(tmp_path, "tokens_dense"), module=TokenNet(), data=_tokens(),
                  _dense_only=True)
    assert dense["flops_dense"] == 20 * 8 + 8 * 2


@pytest.mark.filterwarnings("ignore:export of the pruned network failed")
def test_train_float64_model_that_export_refuses(tmp_path):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    data = (TensorDataset(x[:60], y[:60]), TensorDataset(x[60:], y[60:]))
    module = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)).double()
    summary = train(_config(tmp_path, "layernorm"), module=module, data=data)
    assert summary["compression_method"] == "estimate"
    assert "'1' (LayerNorm)" in summary["export_error"]


def test_train_names_a_model_that_cannot_take_the_data(tmp_path):
    lstm_in_a_chain = nn.Sequential(nn.Embedding(20, 4), nn.LSTM(4, 3), nn.Linear(3, 2))
    with pytest.raises(ConfigError, match=r"cannot take the data's inputs of shape \(5,\)"):
        train(_config(tmp_path, "lstm"), module=lstm_in_a_chain, data=_tokens())

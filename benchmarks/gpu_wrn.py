"""Training throughput of WRN-28-10 on a GPU: dense vs L0-HC vs L0-ARM steps.

CIFAR-shaped random tensors (3x32x32, 10 classes), batch 128, SGD with Nesterov momentum
(the WRN setting), bf16 autocast and channels-last by default. A *step* is forward +
backward + optimizer step through :class:`~applications.sparsify.network.GatedNetwork`;
dense is the same WideResNet built with ``gated=False``.

Variants
--------
``dense``                the ungated network.
``L0-HC``                hard concrete gates (one sample per step).
``L0-ARM``               the defaults: the two antithetic samples' losses from one pass
                         without autograd plus one with it (weight gradient from the
                         ``z = 1[u < pi]`` sample), no host-device synchronisation.
``L0-ARM mean``          ``weight_grad="mean"``: both samples stacked in one pass with
                         autograd (the weight gradient averages them).
``L0-ARM conditional``   ``conditional=True``: channels gated off in the sample are not
                         computed (one device-to-host copy of the gate masks per step).

Each gated variant runs at the model's initial gates (``init``: drop rate 0.3) and with
all gates open (``open``: ``pi = 0.999``). After a warm-up of every variant, the variants
are timed in interleaved rounds (the order rotated by one place each round) with CUDA
events; the table gives ms/step (median over rounds), images/s, the ratio to dense
(of the medians; ``paired``: the median over rounds of the ratio within the round; ``min``:
of the fastest rounds, the least disturbed by other work on the GPU) and the fraction of the
card's dense bf16 peak reached by the *dense-equivalent* work (analytic conv/linear MACs
x 2 FLOPs x 3 for forward and backward, per image x batch; gated variants do more or less
real work than that). The peak comes from :data:`PEAK_TFLOPS` keyed on the device name, or
``--peak-tflops``. Host-device synchronisations inside a step are counted with
``torch.cuda.set_sync_debug_mode``. The floor of a two-sample step
(``two_sample_floor_ratio``: 1 + a dense forward without autograd over a dense step) times
that forward as one more slot of the same rotating rounds.

Usage::

    python benchmarks/gpu_wrn.py                    # CUDA: writes benchmarks/results/gpu_wrn.json
    python benchmarks/gpu_wrn.py --smoke            # tiny WRN, runs on CPU too (gpu_wrn_smoke.json)

Without ``--out``, a run with other settings than the defaults writes
``gpu_wrn_<settings>.json`` next to it, never the committed result.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.sparsify.models import WideResNet  # noqa: E402
from applications.sparsify.network import GatedNetwork  # noqa: E402
from applications.toys._common import environment  # noqa: E402
from benchmarks._output import settings_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by a substring of the device
#: name; the first match wins, so more specific names come first.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("V100", 125.0),  # fp16; V100 has no bf16
]


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key in device_name:
            return value
    return None


def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of every Conv2d and Linear for ONE input of ``input_shape``."""
    total = 0

    def hook(m, inputs, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out[0].numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out[0].numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for h in handles:
            h.remove()
        module.train()
    return total


def set_open(net: GatedNetwork, prob: float = 0.999) -> None:
    for layer in net.gated_layers().values():
        gate = layer.gate
        with torch.no_grad():
            gate.phi.copy_(gate.parameterization.inverse(torch.full_like(gate.phi, prob)))


def variants() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"name": "dense", "gated": False, "state": None}]
    for state in ("init", "open"):
        out += [
            {"name": f"L0-HC {state}", "estimator": "hard_concrete", "options": {}},
            {"name": f"L0-ARM {state}", "estimator": "arm", "options": {}},
            {"name": f"L0-ARM mean {state}", "estimator": "arm",
             "options": {"weight_grad": "mean"}},
            # data-dependent shapes every step: cudnn autotuning would re-run each time
            {"name": f"L0-ARM conditional {state}", "estimator": "arm",
             "options": {"conditional": True}, "cudnn_benchmark": False},
        ]
        for spec in out[-4:]:
            spec.update(gated=True, state=state)
    return out


def build(spec: dict[str, Any], args, device: torch.device):
    torch.manual_seed(args.seed)
    module = WideResNet(args.depth, args.width, num_classes=10, gated=spec["gated"])
    module = module.to(device)
    if args.channels_last:
        module = module.to(memory_format=torch.channels_last)
    if spec["gated"]:
        net = GatedNetwork(module, spec["estimator"], lam=1e-3, num_train=50000,
                           **spec["options"])
        if spec["state"] == "open":
            set_open(net)
    else:
        net = GatedNetwork(module, "arm", lam=1e-3, num_train=50000)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    return net, opt


def make_step(args, device: torch.device):
    use_amp = args.dtype == "bf16"

    def step(net: GatedNetwork, opt: torch.optim.Optimizer, x, y) -> None:
        opt.zero_grad(set_to_none=True)
        ctx = (torch.autocast(device.type, dtype=torch.bfloat16) if use_amp
               else contextlib.nullcontext())
        with ctx:
            out = net.objective(x, y, F.cross_entropy)
        out.loss.backward()
        opt.step()

    return step


def count_syncs(step, net, opt, x, y, device: torch.device) -> tuple[int | None, list[str]]:
    """Host-device synchronisations in one step and their messages (CUDA only)."""
    if device.type != "cuda":
        return None, []
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(net, opt, x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    found = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    return len(found), sorted({f"{w.filename}:{w.lineno}" for w in caught
                               if "synchroniz" in str(w.message)})


def _cudnn_mode(spec: dict[str, Any], device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = spec.get("cudnn_benchmark", True)


def check_exactness(device: torch.device, seed: int = 0) -> dict[str, float]:
    """Max relative gradient difference, conditional vs masked, of a small WRN on
    ``device`` in float32 (TF32 off), channels-last, for ARM and hard concrete."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    out = {}
    try:
        torch.manual_seed(seed)
        base = WideResNet(10, 2, num_classes=10).to(device).to(memory_format=torch.channels_last)
        gen = torch.Generator().manual_seed(seed)
        levels = torch.tensor([0.001, 0.3, 0.5, 0.7, 0.999])
        for layer in GatedNetwork(base).gated_layers().values():
            probs = levels[torch.randint(0, 5, (layer.gate.num_units,), generator=gen)]
            with torch.no_grad():
                layer.gate.phi.copy_(layer.gate.parameterization.inverse(probs).to(device))
        x = torch.randn(16, 3, 32, 32, generator=gen).to(device)
        x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (16,), generator=gen).to(device)
        for est in ("arm", "hard_concrete"):
            grads = []
            for cond in (False, True):
                net = GatedNetwork(copy.deepcopy(base), est, lam=1e-3, num_train=100,
                                   conditional=cond,
                                   generator=torch.Generator(device).manual_seed(seed))
                net.objective(x, y).loss.backward()
                grads.append({n: p.grad for n, p in net.named_parameters()
                              if p.grad is not None})
            err = 0.0
            for n, g in grads[0].items():
                other = grads[1].get(n, torch.zeros_like(g))
                err = max(err, float((g - other).abs().max() / g.abs().max().clamp_min(1e-12)))
            out[est] = err
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return out


def profile_step(step, net, opt, x, y, device: torch.device, top: int) -> dict[str, Any]:
    """Kernel time of 3 steps by operator (torch.profiler), the ``top`` largest."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(3):
            step(net, opt, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    total = sum(getattr(e, attr, 0.0) for e in events) / 3 / 1e3
    rows = sorted(events, key=lambda e: -getattr(e, attr, 0.0))[:top]
    return {
        "ms_per_step_in_kernels": total,
        "top": [{"name": e.key, "calls_per_step": e.count / 3,
                 "ms_per_step": getattr(e, attr, 0.0) / 3 / 1e3} for e in rows],
    }


class _Timer:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def run(args) -> dict[str, Any]:
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU {platform.processor() or platform.machine()}"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    macs = count_macs(WideResNet(args.depth, args.width, num_classes=10, gated=False),
                      (3, 32, 32))
    flops_per_step = 2 * 3 * macs * args.batch
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    specs = [s for s in variants() if not args.only or any(o in s["name"] for o in args.only)]
    step = make_step(args, device)
    built = [build(s, args, device) for s in specs]
    syncs, memory, sync_sites = [], [], []
    for spec, (net, opt) in zip(specs, built):  # warm-up, then count syncs in one step
        _cudnn_mode(spec, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            resident = torch.cuda.memory_allocated(device)
        for _ in range(args.warmup):
            step(net, opt, x, y)
        n_sync, sites = count_syncs(step, net, opt, x, y, device)
        syncs.append(n_sync)
        sync_sites.append(sites)
        # memory a step needs beyond what is resident (all models, optimizer states)
        memory.append((torch.cuda.max_memory_allocated(device) - resident) / 2**30
                      if device.type == "cuda" else None)
    # the floor of a two-sample step: one dense step plus one forward without autograd of
    # the dense network, timed as one more slot of the same rotating rounds
    dense_net = built[0][0]
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
           else contextlib.nullcontext())

    def nograd_forward() -> None:
        with torch.no_grad(), amp:
            dense_net(x)

    _cudnn_mode(specs[0], device)
    for _ in range(args.warmup):
        nograd_forward()
    times: list[list[float]] = [[] for _ in specs]
    fwd_times: list[float] = []
    slots = len(specs) + 1  # the variants, then the no-grad forward
    for r in range(args.rounds):
        for j in range(slots):
            i = (j + r) % slots
            if i == len(specs):
                _cudnn_mode(specs[0], device)
                with _Timer(device) as t:
                    for _ in range(args.steps):
                        nograd_forward()
                fwd_times.append(t.seconds / args.steps)
                continue
            net, opt = built[i]
            _cudnn_mode(specs[i], device)
            with _Timer(device) as t:
                for _ in range(args.steps):
                    step(net, opt, x, y)
            times[i].append(t.seconds / args.steps)
    nograd_forward_s = statistics.median(fwd_times)
    exactness = check_exactness(device, args.seed) if args.check or not args.smoke else None
    profiles = {}
    if args.profile:
        for spec, (net, opt) in zip(specs, built):
            _cudnn_mode(spec, device)
            profiles[spec["name"]] = profile_step(step, net, opt, x, y, device, args.profile)
    dense = statistics.median(times[0])
    dense_min = min(times[0])
    rows = []
    for spec, ts, n_sync, mem, sites in zip(specs, times, syncs, memory, sync_sites):
        sec = statistics.median(ts)
        row = {
            "variant": spec["name"],
            "state": spec["state"],
            "ms_per_step": 1e3 * sec,
            "images_per_s": args.batch / sec,
            "ratio_to_dense": sec / dense,
            # robust to a GPU shared with other work: the fastest round, and the median
            # over rounds of the ratio to dense's round (same round, interleaved)
            "ratio_to_dense_min": min(ts) / dense_min,
            "ratio_to_dense_paired": statistics.median(a / b for a, b in zip(ts, times[0])),
            "dense_equiv_tflops": flops_per_step / sec / 1e12,
            "fraction_of_peak": (flops_per_step / sec / 1e12 / peak) if peak else None,
            "syncs_per_step": n_sync,
            "sync_sites": sites,
            "step_memory_gib": mem,
            "ms_per_step_rounds": [1e3 * t for t in ts],
        }
        if spec["name"] == "L0-ARM init":
            row["bar"] = 1.4
            row["meets_bar"] = row["ratio_to_dense"] <= 1.4
            row["meets_bar_paired"] = row["ratio_to_dense_paired"] <= 1.4
        rows.append(row)
    return {
        "benchmark": "gpu_wrn",
        "device": name,
        "device_type": device.type,
        "peak_bf16_tflops": peak,
        "model": f"WRN-{args.depth}-{args.width}",
        "macs_per_image": macs,
        "dense_equiv_flops_per_step": flops_per_step,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rows": rows,
        "dense_nograd_forward_ms": 1e3 * nograd_forward_s,
        "dense_nograd_forward_ms_rounds": [1e3 * t for t in fwd_times],
        "two_sample_floor_ratio": 1.0 + nograd_forward_s / dense,
        "two_sample_floor_ratio_paired": 1.0 + statistics.median(
            f / d for f, d in zip(fwd_times, times[0])),
        "conditional_vs_masked_max_rel_grad_diff": exactness,
        "profiles": profiles,
    }


def print_table(result: dict[str, Any]) -> None:
    print(f"{result['model']} on {result['device']} (peak {result['peak_bf16_tflops']} TFLOP/s)")
    for name, prof in result.get("profiles", {}).items():
        print(f"-- {name}: {prof['ms_per_step_in_kernels']:.2f} ms/step in kernels")
        for r in prof["top"]:
            print(f"   {r['ms_per_step']:8.3f} ms {r['calls_per_step']:6.1f}x  {r['name'][:90]}")
    print(f"dense forward without autograd: {result['dense_nograd_forward_ms']:.2f} ms; "
          f"floor of a two-sample step: {result['two_sample_floor_ratio']:.3f} x dense "
          f"(paired {result['two_sample_floor_ratio_paired']:.3f}; same rounds)")
    if result["conditional_vs_masked_max_rel_grad_diff"] is not None:
        print("conditional vs masked, max relative gradient difference:",
              result["conditional_vs_masked_max_rel_grad_diff"])
    head = (f"{'variant':28s} {'ms/step':>9s} {'img/s':>9s} {'x dense':>8s} {'paired':>7s} "
            f"{'min':>6s} {'TFLOP/s':>8s} {'of peak':>8s} {'syncs':>6s}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        frac = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:7.1f}%"
        sync = "" if r["syncs_per_step"] is None else str(r["syncs_per_step"])
        bar = "" if "bar" not in r else f"  bar {r['bar']} {'ok' if r['meets_bar'] else 'MISS'}"
        print(f"{r['variant']:28s} {r['ms_per_step']:9.2f} {r['images_per_s']:9.1f} "
              f"{r['ratio_to_dense']:8.3f} {r['ratio_to_dense_paired']:7.3f} "
              f"{r['ratio_to_dense_min']:6.3f} {r['dense_equiv_tflops']:8.1f} {frac:>8s} "
              f"{sync:>6s}{bar}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=28)
    parser.add_argument("--width", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--only", nargs="*", default=None,
                        help="time only variants whose name contains one of these (and dense)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="print the TOP operators by kernel time of each variant")
    parser.add_argument("--check", action="store_true",
                        help="also compare conditional and masked gradients in --smoke runs")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny WRN-10-1, batch 8, 1 round of 1 step, fp32 on CPU (a test)")
    parser.add_argument("--out", default=None,
                        help="JSON output path (default: benchmarks/results/gpu_wrn.json on "
                        "CUDA, gpu_wrn_smoke.json with --smoke; see default_out)")
    args = parser.parse_args(argv)
    if args.only is not None:
        args.only = ["dense", *args.only]
    if args.smoke:
        args.depth, args.width, args.batch = 10, 1, 8
        args.steps, args.rounds, args.warmup = 1, 1, 1
        if not torch.cuda.is_available() or args.device == "cpu":
            args.dtype = "fp32"  # bf16 convolutions are slow on most CPUs
    result = run(args)
    path = Path(args.out) if args.out else default_out(args, parser, result["device_type"])
    result["argv"] = (list(sys.argv) if argv is None
                      else [f"benchmarks/{Path(__file__).name}", *argv])
    result["environment"] = environment()
    result["out"] = str(path)
    print_table(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return result


#: Options that do not change the timings (left out of default output names).
_NOT_SETTINGS = frozenset({"out", "device", "profile", "check", "peak_tflops"})


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser,
                device_type: str) -> Path:
    """``RESULTS/gpu_wrn_smoke.json`` for ``--smoke``; ``gpu_wrn.json`` for a CUDA run with
    the default settings (``gpu_wrn_cpu.json`` on the CPU); otherwise a name that spells
    out the settings that differ from the defaults (:func:`benchmarks._output.settings_path`;
    ``--only`` without the ``dense`` that is always timed), so that a run with other
    settings never overwrites the committed result unless ``--out`` names it."""
    if args.smoke:
        return RESULTS / "gpu_wrn_smoke.json"
    stem = "gpu_wrn" if device_type == "cuda" else f"gpu_wrn_{device_type}"
    values = vars(args)
    if args.only is not None:
        values = {**values, "only": [v for v in args.only if v != "dense"]}
    return settings_path(stem, values, parser, ignore=_NOT_SETTINGS, results=RESULTS)


if __name__ == "__main__":
    main()

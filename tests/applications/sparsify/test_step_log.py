"""Batched host reads of the per-step training statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from applications.sparsify import train as train_mod
from applications.sparsify.step_log import (
    ASYNC_READ_INTERVAL,
    NonFiniteLoss,
    StepLog,
    host_read_interval,
)
from applications.sparsify.train import TrainConfig, TrainingDivergedError, train


def _steps(n: int, bad: int | None = None):
    gen = torch.Generator().manual_seed(0)
    for step in range(1, n + 1):
        loss = torch.rand((), generator=gen) + 1.0
        if step == bad:
            loss = loss * float("nan")
        data = loss - 0.25
        yield step, loss, data, torch.tensor(0.25), torch.tensor(step % 3), 10 + step


def _run(log: StepLog, steps) -> NonFiniteLoss | None:
    for step, loss, data, pen, wrong, n in steps:
        bad = log.add(step, loss, data, pen, wrong, n, scale=2.0)
        if bad is not None:
            return bad
    return log.flush()


def test_interval_does_not_change_the_sums():
    one, seven = StepLog(1), StepLog(7)
    assert _run(one, _steps(20)) is None and _run(seven, _steps(20)) is None
    assert one.sums == pytest.approx(seven.sums, rel=1e-15)
    assert (one.wrong, one.seen) == (seven.wrong, seven.seen)
    # reference: the sums computed directly
    ref = {"loss": 0.0, "data_loss": 0.0, "penalty": 0.0}
    for _, _loss, data, pen, _, n in _steps(20):
        d = float(data) / 2.0
        ref["loss"] += (d + float(pen)) * n
        ref["data_loss"] += d * n
        ref["penalty"] += float(pen) * n
    assert one.sums == pytest.approx(ref, rel=1e-12)
    assert one.seen == sum(10 + s for s in range(1, 21))
    assert one.wrong == sum(s % 3 for s in range(1, 21))


def test_reads_only_every_interval_steps():
    log = StepLog(4)
    steps = list(_steps(6))
    for i, (step, loss, data, pen, wrong, n) in enumerate(steps[:3]):
        assert log.add(step, loss, data, pen, wrong, n) is None
        assert (log.pending, log.seen) == (i + 1, 0)
    log.add(*steps[3][:5], steps[3][5])
    assert log.pending == 0 and log.seen == sum(10 + s for s in range(1, 5))


@pytest.mark.parametrize("every", [1, 3, 8])
def test_first_non_finite_step_is_reported_exactly(every):
    log = StepLog(every)
    bad = _run(log, _steps(12, bad=5))
    assert bad is not None and bad.step == 5 and math.isnan(bad.value)
    assert log.seen == sum(10 + s for s in range(1, 5))  # steps before it only


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_interval_is_checked(every):
    with pytest.raises(ValueError, match="every must be an integer >= 1"):
        StepLog(every)


def test_host_read_interval_by_device():
    assert host_read_interval(torch.device("cpu")) == 1
    assert host_read_interval(torch.device("cuda")) == ASYNC_READ_INTERVAL > 1
    assert host_read_interval("meta") == ASYNC_READ_INTERVAL


def _tiny(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(model="mlp", dataset="mnist5k", limit=200, epochs=2, batch_size=30, lam=0.05,
                model_options={"hidden": [20, 10]}, progress=False,
                out=str(tmp_path / name), device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def _metrics(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        for key in list(row):
            if "time" in key:
                del row[key]
    return rows


def test_batched_reads_give_the_same_training_run(tmp_path, monkeypatch, one_thread):
    train(_tiny(tmp_path, "every1"))
    monkeypatch.setattr(train_mod, "host_read_interval", lambda device: 3)
    train(_tiny(tmp_path, "every3"))  # 7 steps per epoch: a partial window at the end
    a, b = _metrics(tmp_path / "every1" / "metrics.jsonl"), _metrics(
        tmp_path / "every3" / "metrics.jsonl")
    assert a == b and len(a) == 2


def test_batched_reads_still_name_the_diverging_step(tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "host_read_interval", lambda device: 4)
    original = train_mod.GatedNetwork.objective
    calls = {"n": 0}

    def objective(self, x, y, *args, **kwargs):
        out = original(self, x, y, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] > 7 + 1:  # 7 steps per epoch: diverges at epoch 2, step 2
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_mod.GatedNetwork, "objective", objective)
    with pytest.raises(TrainingDivergedError) as info:
        train(_tiny(tmp_path, "nan", epochs=3))
    assert (info.value.epoch, info.value.step) == (2, 2)
    assert "step 2/7" in str(info.value)
    assert calls["n"] == 7 + 4  # it stopped at the first read after the NaN


def test_train_loop_benchmark_smoke(tmp_path, load_benchmark):
    bench = load_benchmark("train_loop")
    before = (train_mod.host_read_interval, train_mod._channels_last)
    out = tmp_path / "loop.json"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    assert (train_mod.host_read_interval, train_mod._channels_last) == before  # restored
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["rows"]] == [v["name"] for v in bench.VARIANTS]
    assert result["rows"][0]["speedup_vs_first"] == 1.0
    assert result["rows"][0]["speedup_vs_first_paired"] == 1.0
    assert result["rows"][-1]["time_ratio_to_dense_paired"] == 1.0
    # one warm-up epoch, then 2 rounds of 1 epoch each (the runs resume between rounds)
    for r in result["rows"]:
        assert len(r["warmup_epoch_times_s"]) == 1 and len(r["round_s_per_epoch"]) == 2
        assert len(r["epoch_times_s"]) == 3 and r["images_per_s"] > 0
    assert result["argv"][1:] == ["--smoke", "--out", str(out)]
    assert result["settings"]["rounds"] == 2 and "torch" in result["environment"]


def test_train_loop_benchmark_rotates_and_defaults_out(tmp_path, monkeypatch, load_benchmark):
    import argparse

    bench = load_benchmark("train_loop")
    order = []
    monkeypatch.setattr(bench, "run_variant",
                        lambda v, args, data, out, epochs: order.append(v["name"]) or [1.0])
    variants = [{"name": n} for n in "abc"]
    args = argparse.Namespace(rounds=3, round_epochs=1, warmup_epochs=1)
    warmup, rounds = bench.time_variants(variants, args, None, tmp_path)
    assert order[:3] == ["a", "b", "c"]  # one global warm-up, then rotating rounds
    assert order[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert warmup == [[1.0]] * 3 and rounds == [[[1.0]] * 3] * 3

    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    written = []
    monkeypatch.setattr(bench, "time_variants", lambda *a, **k: written.append(1) or (
        [[1.0]] * len(bench.VARIANTS), [[[1.0]]] * len(bench.VARIANTS)))
    assert bench.main(["--smoke"]) == 0
    assert json.loads((tmp_path / "train_loop_smoke.json").read_text())["settings"]["smoke"]
    assert bench.main(["--device", "cpu", "--steps", "1", "--batch", "2", "--rounds", "1"]) == 0
    assert (tmp_path / "train_loop_cpu_batch-2_rounds-1_steps-1.json").exists()

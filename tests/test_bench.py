"""The benchmark harness measures real training steps (the long runs live behind `vaepipe bench`)."""

import math

from conftest import base_overrides
from pipeline.bench import plain_pytorch_images_per_sec
from pipeline.config import load_config


def test_plain_baseline_measures_positive_throughput(shards32, tmp_path):
    cfg = load_config(None, base_overrides(shards32, tmp_path))
    ips = plain_pytorch_images_per_sec(cfg, steps=3, warmup=1)
    assert math.isfinite(ips) and ips > 0


def test_trials_are_drawn_as_tune_draws_them_and_reproducibly():
    from pipeline.tune import draw_trials

    space = {"optim.lr": {"loguniform": [1e-4, 1e-3]}, "model.beta": {"grid": [1.0, 2.0, 4.0]}}
    trials = draw_trials(space, num_samples=2, seed=3)
    assert len(trials) == 6  # every grid point once per sample
    assert sorted(t["model.beta"] for t in trials) == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert all(1e-4 <= t["optim.lr"] <= 1e-3 for t in trials)
    assert len({t["optim.lr"] for t in trials}) == 6
    assert draw_trials(space, num_samples=2, seed=3) == trials
    assert draw_trials(space, num_samples=2, seed=4) != trials


def test_asha_bench_runs_the_same_trials_under_both_schedulers(monkeypatch):
    """The comparison is fair by construction: identical trials, ASHA first, speed-up = FIFO/ASHA wall."""
    import pipeline.tune
    from pipeline.bench import asha_speedup

    cfg = load_config(None, ["train.max_steps=12", "tune.num_samples=2"])
    space = {"optim.lr": {"grid": [1e-3, 1e-2]}}
    calls = []
    clock = iter([0.0, 10.0, 10.0, 40.0])  # ASHA takes 10 s, FIFO 30 s
    monkeypatch.setattr("pipeline.bench.time.perf_counter", lambda: next(clock))

    def fake_sweep(run_cfg, run_space, points=None):
        calls.append((run_cfg.tune.scheduler, run_cfg.tune.search, points))
        asha = run_cfg.tune.scheduler == "asha"
        rows = [{"last_step": 3 if asha and i % 2 else 12, "status": "stopped" if asha and i % 2 else "finished"}
                for i in range(len(points))]
        return {"trials": rows, "failed": 0, "best": {"val_neg_elbo": 1.0}, "parent_run_id": run_cfg.tune.scheduler}

    monkeypatch.setattr(pipeline.tune, "run_sweep", fake_sweep)
    res = asha_speedup(cfg, space, seed=0)
    assert [c[0] for c in calls] == ["asha", "fifo"]
    assert calls[0][2] == calls[1][2] and len(calls[0][2]) == 4
    assert {c[1] for c in calls} == {"random"}
    assert res["asha"]["stopped"] == [3, 3] and res["asha"]["trial_steps"] == 30 and res["fifo"]["trial_steps"] == 48
    assert res["speedup"] == 3.0 and res["trial_steps_ratio"] == 48 / 30

"""The benchmark harness measures real training steps (the long runs live behind `vaepipe bench`)."""


import pytest

from conftest import base_overrides
from pipeline.bench.throughput import plain_pytorch_images_per_sec
from pipeline.config import load_config


def test_plain_baseline_rate_is_timed_steps_times_batch_over_their_time(shards32, tmp_path, monkeypatch):
    """Warm-up steps are not timed: the clock is read when the first timed step starts and after
    the last one, so the rate is steps * batch / (t_end - t_start) exactly."""
    cfg = load_config(None, base_overrides(shards32, tmp_path))
    clock = iter([100.0, 106.0])
    monkeypatch.setattr("pipeline.bench.throughput.time.perf_counter", lambda: next(clock))
    ips = plain_pytorch_images_per_sec(cfg, steps=3, warmup=1)
    assert ips == 3 * cfg.data.batch_size / 6.0
    assert next(clock, None) is None  # read exactly twice


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


@pytest.mark.integration
def test_asha_bench_runs_the_same_trials_under_both_schedulers(ray_session, shards32, tmp_path):
    """A real bench: two sweeps on the session's Ray, the same drawn trials in both (read back
    from MLflow), and every figure of the report computed from what was measured."""
    from pipeline.bench.asha import asha_speedup
    from pipeline.tracking import make_client

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{
        "dist.num_workers": 1, "train.max_steps": 4, "train.log_every": 1, "train.val_every": 1,
        "train.checkpoint_every": 4, "train.image_every": 4, "tracking.log_model": False,
        "tune.num_samples": 1, "tune.grace_period": 1, "tune.reduction_factor": 2,
        "tune.storage_path": str(tmp_path / "tune")}))
    space = {"optim.lr": {"grid": [1e-2, 1e-5]}}
    res = asha_speedup(cfg, space, seed=0)
    assert res["speedup"] == res["fifo"]["wall_s"] / res["asha"]["wall_s"]
    assert res["fifo"]["trial_steps"] == 2 * 4 and res["fifo"]["stopped"] == []
    assert res["asha"]["trial_steps"] == 8 - sum(4 - s for s in res["asha"]["stopped"])
    assert res["trial_steps_ratio"] == res["fifo"]["trial_steps"] / res["asha"]["trial_steps"]
    client = make_client(cfg.tracking.tracking_uri)
    drawn = []
    for scheduler in ("asha", "fifo"):
        parent = res[scheduler]["parent_run_id"]
        exp = client.get_run(parent).info.experiment_id
        children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        drawn.append(sorted(float(c.data.tags["vaepipe.hp.optim.lr"]) for c in children))
    assert drawn[0] == drawn[1] == [1e-5, 1e-2]

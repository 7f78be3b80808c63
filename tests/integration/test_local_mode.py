"""``dist.num_workers=0``: local mode, one rank trained by vaepipe in this process (``train/local_mode.py``).

No Ray is started here: the runs train in the pytest process itself, checkpoint into their run
folder, resume from it bit for bit, and leave the process as they found it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import base_overrides
from pipeline.config import ConfigError, load_config

pytestmark = pytest.mark.integration

LOCAL = {"dist.num_workers": 0, "train.checkpoint_every": 5, "train.log_every": 1, "train.precision": "fp32",
         "train.keep_checkpoints": 5, "tracking.log_model": False}


def _train(overrides, resume=None):
    from pipeline.train.trainer import run_training

    return run_training(load_config(None, overrides), resume=resume)


def _losses(result) -> dict[int, list[float]]:
    from pipeline.tracking import make_client

    out: dict[int, list[float]] = {}
    for m in make_client(result.tracking_uri).get_metric_history(result.run_id, "loss"):
        out.setdefault(m.step, []).append(m.value)
    return out


def _weights(ckpt: str) -> dict:
    import torch

    from pipeline.train.checkpoint import CKPT_TAG

    return torch.load(Path(ckpt) / CKPT_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


@pytest.fixture(scope="module")
def local_run(shards32, tmp_path_factory):
    """A 12-step local-mode run with its checkpoints at steps 5, 10 and 12."""
    import torch

    tmp = tmp_path_factory.mktemp("local")
    import ray

    threads, env, ray_up = torch.get_num_threads(), dict(os.environ), ray.is_initialized()
    overrides = base_overrides(shards32, tmp, **{**LOCAL, "train.run_name": "first", "dist.cpus_per_worker": 1})
    result = _train(overrides)
    return {"result": result, "overrides": overrides, "threads": threads, "env": env, "ray_up": ray_up}


def test_local_run_trains_in_this_process_and_checkpoints_into_its_run_folder(local_run):
    import ray
    import torch
    import torch.distributed as dist

    from pipeline.train.checkpoint import committed_checkpoints, marker_of

    result = local_run["result"]
    assert ray.is_initialized() == local_run["ray_up"]  # no Ray cluster was started or joined
    assert not dist.is_initialized() and torch.get_num_threads() == local_run["threads"]
    assert {k: v for k, v in os.environ.items() if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} == \
           {k: v for k, v in local_run["env"].items() if k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    assert result.metrics["step"] == 12
    run_dir = Path(result.run_dir)
    assert run_dir.name == "first"
    steps = [marker_of(c)["step"] for c in committed_checkpoints(run_dir)]
    assert steps == [12, 10, 5]  # every one persisted into the run folder
    assert Path(result.checkpoint_path) == committed_checkpoints(run_dir)[0]
    assert marker_of(result.checkpoint_path)["world_size"] == 1
    losses = _losses(result)
    assert sorted(losses) == list(range(1, 13)) and all(len(v) == 1 for v in losses.values())
    assert losses[12][0] < 0.9 * losses[1][0], losses


def test_local_resume_reproduces_the_uninterrupted_run(local_run):
    """A second local run in the same process resumes from the first run's step-5 checkpoint: the
    same loss at every step after it (the curve each final checkpoint keeps), and bit for bit the
    same final weights (CPU, fp32, ZeRO-2). The one MLflow run keeps one loss per step: the redone
    steps 6-12 are not logged again."""
    import torch

    from pipeline.train.checkpoint import committed_checkpoints, marker_of

    first = local_run["result"]
    step5 = next(c for c in committed_checkpoints(Path(first.run_dir)) if marker_of(c)["step"] == 5)
    resumed = _train(local_run["overrides"] + ["train.run_name=resumed"], resume=str(step5))
    assert resumed.run_id == first.run_id and resumed.metrics["step"] == 12
    losses = _losses(resumed)
    assert sorted(losses) == list(range(1, 13)) and all(len(v) == 1 for v in losses.values()), losses
    curve = lambda ckpt: json.loads((Path(ckpt) / "vaepipe_state.json").read_text())["train_state"]["history"]  # noqa: E731
    assert curve(resumed.checkpoint_path) == curve(first.checkpoint_path) == [[s, losses[s][0]] for s in range(1, 13)]
    a, b = _weights(first.checkpoint_path), _weights(resumed.checkpoint_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_run_keeps_the_newest_checkpoints_only_and_says_its_eta(shards32, tmp_path, capsys):
    import re

    from pipeline.train.checkpoint import committed_checkpoints, marker_of

    result = _train(base_overrides(shards32, tmp_path, **{**LOCAL, "train.max_steps": 6, "train.checkpoint_every": 2,
                                                           "train.keep_checkpoints": 2, "data.val_batches": 0}))
    assert [marker_of(c)["step"] for c in committed_checkpoints(Path(result.run_dir))] == [6, 4]
    assert len(list(Path(result.run_dir).glob("checkpoint_*"))) == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("[vaepipe] step ")]
    # each step's line says how far the run is and the time left at that window's pace; the last, none
    assert [int(re.search(r" (\d+)% eta \d+(m\d\ds|s)$", ln).group(1)) for ln in lines[:-1]] == [16, 33, 50, 66, 83]
    assert lines[-1].startswith("[vaepipe] step 6/6 ") and "% eta " not in lines[-1]


def test_eta_reads_as_a_person_reads_time():
    from pipeline.train.observe import eta

    assert [eta(s) for s in (0.4, 45, 192, 3599.6, 7500)] == ["0s", "45s", "3m12s", "1h00m", "2h05m"]


def test_local_divergence_fails_with_its_own_message(shards32, tmp_path):
    from pipeline.tracking import make_client
    from pipeline.train.failures import NotRetried

    overrides = base_overrides(shards32, tmp_path, **{**LOCAL, "optim.lr": 1000, "train.max_consecutive_skips": 2})
    with pytest.raises(NotRetried, match=r"rank 0: diverged: 2 consecutive non-finite losses .*optim\.lr"):
        _train(overrides)
    uri = load_config(None, overrides).tracking.tracking_uri
    (run,) = make_client(uri).search_runs([e.experiment_id for e in make_client(uri).search_experiments()])
    assert run.info.status == "FAILED"


def test_local_mode_config_checks_and_what_a_local_trial_holds(shards32, tmp_path):
    from pipeline.train.trainer import run_training
    from pipeline.tune import DRIVER_CPU, trial_resources

    with pytest.raises(ConfigError, match=r"dist\.num_workers.*-1.*or 0: local mode"):
        load_config(None, ["dist.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"dist\.min_workers"):
        load_config(None, ["dist.num_workers=0", "dist.min_workers=1"])
    # a local trial trains in its own process: it holds the rank's CPUs (and GPUs), not a driver's sliver
    assert trial_resources(load_config(None, ["dist.num_workers=0", "dist.cpus_per_worker=2"])) == {"CPU": 2.0}
    assert trial_resources(load_config(None, ["dist.num_workers=0", "dist.gpus_per_worker=1"])) == {"CPU": 1.0, "GPU": 1.0}
    assert trial_resources(load_config(None, ["dist.num_workers=2"])) == {"CPU": DRIVER_CPU}
    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"dist.num_workers": 0}))
    with pytest.raises(ValueError, match="runs no Ray Train callbacks"):
        run_training(cfg, callbacks=(object(),))


def test_bench_refuses_local_mode():
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = CliRunner().invoke(app, ["bench", "overhead", "dist.num_workers=0"], env={"COLUMNS": "200"})
    assert out.exit_code == 2 and "dist.num_workers=0 (local mode) starts no Ray Train workers" in out.output

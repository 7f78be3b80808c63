"""End to end on real local services: shards -> Ray Train (2 workers) + DeepSpeed -> MLflow.

Every test here runs real ``fit()`` calls on the session's local Ray, so they are kept to a
dozen steps of the debug model at 32 px.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import base_overrides, logged_images
from pipeline.config import ConfigError, load_config
from pipeline.data.shards import read_manifest
from pipeline.lineage import dataset_digest

pytestmark = pytest.mark.integration


def _train(overrides, resume=None):
    from pipeline.train.trainer import run_training

    return run_training(load_config(None, overrides), resume=resume)


def _client(uri):
    from pipeline.tracking import make_client

    return make_client(uri)


def _metric_steps(client, run_id, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _assert_run_recorded(client, run_id, max_steps):
    import mlflow

    mlflow.flush_async_logging()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "recon", "kl", "beta", "active_units", "images_per_sec", "skipped_steps", "val_loss",
                "val_active_units"):
        assert key in run.data.metrics, f"metric {key} missing from run {run_id}"
    assert run.data.params["dist.num_workers"] == "2"
    assert run.data.tags["vaepipe.posterior_collapse"] in ("True", "False")
    assert run.data.tags["vaepipe.retain_freed_memory"] == "True"  # the workers' glibc keeps freed memory
    images = logged_images(client, run_id)  # MLflow images by key and step (the UI's slider)
    for key in ("reconstructions", "samples", "traversals", "kl_per_dim"):
        assert (key, max_steps) in images, sorted(images)
    assert {("reconstructions", 0), ("samples", 0), ("traversals", 0)} <= set(images)  # the untrained model
    assert not any(k.startswith("kl_dim/") for k in run.data.metrics)  # the kl_per_dim image shows them
    # every rank's system metrics, named by rank and node
    nodes = {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")}
    assert sorted(n.split("-")[0] for n in nodes) == ["rank0", "rank1"], nodes
    assert all(f"system/{n}/cpu_utilization_percentage" in run.data.metrics for n in nodes)
    (data,) = run.inputs.dataset_inputs  # the shard set, by the manifest's content hash
    assert data.dataset.digest == dataset_digest(read_manifest(run.data.params["data.path"]))
    assert any(a.path == "config/resolved.yaml" for a in client.list_artifacts(run_id, "config"))
    loss = _metric_steps(client, run_id, "loss")
    assert loss[-1][0] == max_steps
    # The first window already includes a few updates; the last must be clearly lower.
    assert loss[-1][1] < 0.9 * loss[0][1], f"loss did not fall: {loss}"


def _assert_every_rank_shard_saved(result, stage: int) -> None:
    ckpt = Path(result.checkpoint_path)
    saved = json.loads((ckpt / "vaepipe_state.json").read_text())
    assert saved["train_state"]["step"] == 12 and saved["config"]["dist"]["zero_stage"] == stage
    # every rank's ZeRO shard is in the one reported checkpoint
    shards = list(ckpt.glob("ds/*optim_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in ckpt.rglob("*"))


def test_zero1_run_whose_worker_exits_restarts_from_the_last_checkpoint(ray_session, shards32, tmp_path, monkeypatch):
    """A worker process exits at step 8 (``os._exit``): Ray restarts the group, which restores
    step 6's checkpoint and ends at step 12, and the run is recorded whole, as any run is."""
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv("VAEPIPE_FAULT_AT_STEP", "8")
    monkeypatch.setenv("VAEPIPE_FAULT_MARKER", str(marker))
    result = _train(base_overrides(shards32, tmp_path, **{"dist.zero_stage": 1, "dist.max_failures": 1,
                                                            "tracking.log_model": False}))
    assert marker.read_text() == "8", "the fault was not injected"
    assert result.metrics["step"] == 12
    client = _client(result.tracking_uri)
    assert client.get_run(result.run_id).data.tags["vaepipe.resumed_from_step"] == "6"
    _assert_run_recorded(client, result.run_id, 12)
    _assert_every_rank_shard_saved(result, 1)


def test_zero3_run_registers_samples_and_evaluates_through_the_cli(ray_session, shards32, tmp_path):
    result = _train(base_overrides(shards32, tmp_path, **{"dist.zero_stage": 3}))
    client = _client(result.tracking_uri)
    _assert_run_recorded(client, result.run_id, 12)
    assert result.metrics["step"] == 12
    _assert_every_rank_shard_saved(result, 3)
    # the logged model goes through the CLI: register, then sample from the alias
    _cli("register", "--run-id", result.run_id, "--name", "vae-local", "--alias", "champion",
         "--tracking-uri", result.tracking_uri)
    out = tmp_path / "samples.png"
    _cli("sample", "--model", "models:/vae-local@champion", "--n", "9", "--out", str(out),
         "--tracking-uri", result.tracking_uri)
    from PIL import Image

    grid = Image.open(out)
    assert grid.size == (3 * 33 + 1, 3 * 33 + 1)  # 3x3 tiles of 32 px with 1-px gaps
    printed = _cli("evaluate", "--model", "models:/vae-local@champion", "--data", shards32, "--k", "8",
                   "--max-samples", "16", "--tracking-uri", result.tracking_uri)
    # mse on continuous pixels: the IWAE bound under its own name, and why nll is not shown
    assert "neg_iwae_nats" in printed and "nll not shown" in printed and "mig" in printed
    assert "[vaepipe] evaluate: 16 samples scored in" in printed  # its progress line's closing one
    client = _client(result.tracking_uri)
    version = client.get_model_version_by_alias("vae-local", "champion")
    eval_run = client.get_run(version.tags["vaepipe.eval_run"])  # the version links to its evaluation
    assert eval_run.data.tags["vaepipe.model_version"] == str(version.version)
    assert eval_run.data.metrics["num_samples"] == 16
    assert eval_run.data.metrics["neg_iwae_nats"] > 0 and "mig" in eval_run.data.metrics  # mse: the bound, not an nll
    assert "nll" not in eval_run.data.metrics
    images = logged_images(client, eval_run.info.run_id)
    assert {("samples", 0), ("traversals", 0), ("interpolation_slerp", 0)} <= set(images)
    (data,) = eval_run.inputs.dataset_inputs
    assert {t.key: t.value for t in data.tags}["mlflow.data.context"] == "test"
    assert data.dataset.digest == version.tags["vaepipe.data_digest"]  # trained and scored on one set


def _cli(*args):
    """A ``vaepipe`` command in this process (the entry point itself is run as a process in
    test_bad_config_fails_before_workers_start): ~5 s of interpreter and import start-up less each."""
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_zero2_over_mlflow_server_register_load_and_resume(uninterrupted):
    """The uninterrupted twin of the resume drills is also the ZeRO-2 run over a real MLflow
    server: its run is recorded, its model registers and loads, and ``--resume <run id>``
    continues the same MLflow run and step count (on another world size: one rank)."""
    import mlflow.pyfunc

    from pipeline.tracking import register_model

    result, overrides = uninterrupted["result"], uninterrupted["overrides"]
    assert result.tracking_uri == uninterrupted["server"]
    client = _client(result.tracking_uri)
    _assert_run_recorded(client, result.run_id, 12)
    version = register_model(result.tracking_uri, result.run_id, "vae-test", "champion")
    assert client.get_model_version_by_alias("vae-test", "champion").version == str(version)
    model = mlflow.pyfunc.load_model("models:/vae-test@champion")
    images = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    recon = model.predict(images)
    assert recon.shape == (3, 3, 32, 32) and np.isfinite(recon).all() and recon.min() >= 0 and recon.max() <= 1
    codes = model.predict(images, params={"method": "encode"})
    assert codes.shape == (3, 8, 1, 1)
    decoded = model.predict(codes, params={"method": "decode"})
    np.testing.assert_allclose(decoded, recon, atol=1e-5)  # reconstruct == decode(encode mean)
    samples = model.predict(np.zeros((1, 1, 1, 1), np.float32), params={"method": "sample", "n": 5})
    assert samples.shape == (5, 3, 32, 32)
    # `vaepipe train` ends by naming the run's page in the server's own UI, which the server serves
    from urllib.request import urlopen

    from pipeline.cli import _where_to_look

    page = _where_to_look(result.tracking_uri, result.run_id)
    experiment_id = client.get_run(result.run_id).info.experiment_id
    assert page == f"{result.tracking_uri}/#/experiments/{experiment_id}/runs/{result.run_id}"
    with urlopen(page.split("#")[0], timeout=30) as ui:
        assert ui.status == 200 and b"<html" in ui.read().lower()

    # a manual resume by MLflow run id: the same run goes on from step 12 to 14, here in local mode
    # (one rank in this process: the 2-rank ZeRO-2 checkpoint is converted to a universal one)
    second = _train(overrides + ["train.max_steps=14", "tracking.log_model=false", "dist.num_workers=0"],
                    resume=result.run_id)
    assert second.run_id == result.run_id  # same MLflow run continues
    assert second.metrics["step"] == 14
    saved = json.loads((Path(second.checkpoint_path) / "vaepipe_state.json").read_text())
    assert saved["train_state"]["step"] == 14
    steps = [s for s, _ in _metric_steps(client, second.run_id, "loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 14 and 12 in steps
    assert client.get_run(second.run_id).data.tags["vaepipe.resumed_from_step"] == "12"


# The resume drills and their uninterrupted twin: the same math (seed, fp32 on every CPU class,
# checkpoints every 5 steps, validation at 6 and 12), a loss logged at every step.
RESUME_MATH = {"train.checkpoint_every": 5, "train.log_every": 1, "train.precision": "fp32", "tracking.log_model": False}
# what the chaos drill compares besides: images every 4 steps and a LoggedModel per checkpoint
# (images and models draw from their own generators: the losses are the same either way)
# and every checkpoint kept: Ray's retention does not reach a killed driver's checkpoints (step 5's
# stays in the run folder after the --resume), so with retention the drill's folder would hold more
RECORDS = {"train.image_every": 4, "tracking.log_model": True, "tracking.model_per_checkpoint": True,
           "train.keep_checkpoints": 100}


@pytest.fixture(scope="module")
def uninterrupted(ray_session, shards32, tmp_path_factory, mlflow_server):
    """The run every resume drill must reproduce (its per-step losses, final weights and what its
    MLflow run holds), trained under ZeRO-2 into the real MLflow server: the server test reads it too."""
    from chaos_soak import read_record

    tmp = tmp_path_factory.mktemp("uninterrupted")
    overrides = base_overrides(shards32, tmp, tracking_uri=mlflow_server,
                               **{**RESUME_MATH, **RECORDS, "dist.zero_stage": 2})
    result = _train(overrides)
    return {"record": read_record(_client(result.tracking_uri), result.run_id, result.run_dir),
            "result": result, "overrides": overrides, "server": mlflow_server}


def _assert_resume_reproduces(uninterrupted: dict, result, resumed_from: int) -> None:
    """Deterministic resume (issue: reliability): from the restore on, the same loss at every step
    and, at the end, bit for bit the uninterrupted run's weights (CPU, fp32, ZeRO-2)."""
    from chaos_soak import assert_same_weights, final_weights

    reference = uninterrupted["record"]
    loss = dict(_metric_steps(_client(result.tracking_uri), result.run_id, "loss"))
    after = {s: v for s, v in reference.loss.items() if s > resumed_from}
    assert after and {s: loss[s] for s in after} == after
    assert_same_weights(reference.weights, final_weights(result.checkpoint_path))


def _kill_when_paused(marker: Path, timeout: float = 600.0) -> threading.Thread:
    """SIGKILL, from outside, the worker that wrote its pid into ``marker`` (a fault drill pause)."""
    def kill() -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            pid = marker.read_text().strip() if marker.exists() else ""
            if pid.isdigit():
                os.kill(int(pid), signal.SIGKILL)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=kill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("where, resumed", [("step:8", "5"), ("checkpoint:10", "5")])
def test_worker_sigkilled_from_outside_resumes_from_the_last_committed_checkpoint(
        ray_session, shards32, tmp_path, monkeypatch, uninterrupted, where, resumed):
    """A preemption: one worker is SIGKILLed mid-epoch (after step 8) or while it writes step 10's
    checkpoint. Ray restarts the group, which restores the newest *committed* checkpoint (step 5:
    step 10's folder is never committed), redoes at most one interval and ends at the step asked."""
    from pipeline.train.checkpoint import commit_status, marker_of

    marker = tmp_path / "fault.marker"
    monkeypatch.setenv("VAEPIPE_FAULT_PAUSE", where)
    monkeypatch.setenv("VAEPIPE_FAULT_MARKER", str(marker))
    killer = _kill_when_paused(marker)
    result = _train(base_overrides(shards32, tmp_path, **{**RESUME_MATH, "dist.max_failures": 1,
                                                            "train.keep_checkpoints": 5}))
    killer.join(timeout=5)
    assert marker.read_text().strip().isdigit(), "no worker paused for the drill"
    assert result.metrics["step"] == 12
    run = _client(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["vaepipe.resumed_from_step"] == resumed
    folders = list(Path(result.run_dir).glob("checkpoint_*"))
    committed = sorted(marker_of(f)["step"] for f in folders if commit_status(f)[0])
    assert committed[-1] == 12 and 5 in committed
    _assert_resume_reproduces(uninterrupted, result, int(resumed))


def test_whole_job_killed_mid_checkpoint_resumes_from_the_last_committed(ray_session, shards32, tmp_path,
                                                                         uninterrupted, monkeypatch):
    """The suite's chaos soak (``tests/chaos_soak.py`` is the long one). The driver is SIGKILLed
    while step 10's checkpoint is written, which takes its Train controller and workers with it;
    ``--resume`` continues from step 5, never from the half-written step-10 folder. There a worker
    is SIGKILLed after a step drawn at random, and Ray restarts the group. The run ends as the
    uninterrupted one, and holds each metric step, image, LoggedModel and checkpoint once."""
    import random

    import ray

    from chaos_soak import check_against_reference, read_record

    marker = tmp_path / "fault.marker"
    overrides = base_overrides(shards32, tmp_path, **{**RESUME_MATH, **RECORDS, "dist.zero_stage": 2,
                                                      "train.run_name": "killed"})
    env = {**os.environ, "VAEPIPE_FAULT_PAUSE": "checkpoint:10", "VAEPIPE_FAULT_MARKER": str(marker)}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", *overrides,
                               f"dist.address={ray.get_runtime_context().gcs_address}"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (marker.exists() and marker.read_text().strip().isdigit()) and time.time() < deadline:
        assert driver.poll() is None, "the job ended before the drill"
        time.sleep(0.2)
    driver.kill()  # the whole job: driver, controller, workers
    driver.wait(timeout=30)
    kill_after = random.Random().randint(6, 11)  # in the redone steps 6-9, at 10, or after step 10's checkpoint
    print(f"the worker is killed after step {kill_after}")  # shown where the test fails
    second = tmp_path / "worker.marker"
    monkeypatch.setenv("VAEPIPE_FAULT_PAUSE", f"step:{kill_after}")
    monkeypatch.setenv("VAEPIPE_FAULT_MARKER", str(second))
    killer = _kill_when_paused(second)
    run_dir = tmp_path / "runs" / "killed"
    result = _train(overrides + ["dist.max_failures=1"], resume=str(run_dir))
    killer.join(timeout=5)
    assert second.read_text().strip().isdigit(), f"no worker paused after step {kill_after}"
    assert result.metrics["step"] == 12
    client = _client(result.tracking_uri)
    # the last restore: the worker's restart, from the newest checkpoint committed before its kill
    assert client.get_run(result.run_id).data.tags["vaepipe.resumed_from_step"] == ("10" if kill_after > 10 else "5"), \
        kill_after  # a worker paused after step 10 is killed before that step's checkpoint
    check_against_reference(uninterrupted["record"], read_record(client, result.run_id, result.run_dir))


def test_corrupt_jpeg_is_skipped_and_counted(corrupt_shards32, tmp_path):
    # one rank (local mode: the reader is the subject, not distribution) x batch 8 x 8 steps = 64
    # samples = the whole tiny train split, so the corrupt one is met
    result = _train(base_overrides(corrupt_shards32, tmp_path, **{"dist.num_workers": 0, "train.max_steps": 8,
                                                                   "train.log_every": 4, "train.checkpoint_every": 8,
                                                                   "train.image_every": 8, "data.val_batches": 0,
                                                                   "tracking.log_model": False}))
    assert result.metrics["step"] == 8
    assert result.metrics["corrupt_samples"] == 1


def test_bad_config_fails_before_workers_start(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "train", "model.latnt_dim=3"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "model.latnt_dim" in proc.stdout + proc.stderr
    assert not (tmp_path / "mlruns.db").exists()  # nothing was started or written


def test_resolution_above_stored_fails_in_preflight(shards32, tmp_path):
    from pipeline.train.trainer import preflight

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"data.resolution": 64}))
    with pytest.raises(ConfigError, match="data.resolution=64"):
        preflight(cfg)

"""The MLflow server going away mid-run: training goes on, what rank 0 logs waits in order and
reaches the server when it is back, and nothing is logged twice.

The suite's outage lasts 8 s. The long one (a minute, as a server restart or a network blip can):
``VAEPIPE_TEST_OUTAGE_S=60 pytest tests/integration/test_mlflow_outage.py -k going_away``; steps are slowed
in proportion, so the outage covers the same stretch of the run.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from conftest import base_overrides, free_port, start_mlflow_server, stop_process
from pipeline import logged_models
from pipeline.logger import RankZeroLogger, logged_images

OUTAGE_S = float(os.environ.get("VAEPIPE_TEST_OUTAGE_S", "8"))


class FlakyClient:
    """Fails ``down`` calls, then accepts; records what it accepted."""

    def __init__(self, down: int):
        self.down, self.accepted = down, []

    def _maybe_fail(self):
        if self.down > 0:
            self.down -= 1
            raise ConnectionError("connection refused")

    def log_batch(self, run_id, metrics):
        self._maybe_fail()
        self.accepted += [(m.key, m.step) for m in metrics]

    def set_tag(self, run_id, key, value):
        self._maybe_fail()
        self.accepted.append((key, value))


def test_queued_calls_are_delivered_once_in_order_after_an_outage(monkeypatch):
    logger = RankZeroLogger("http://127.0.0.1:1", "run", enabled=True, retry_every_s=0.0, flush_timeout_s=5)
    logger.client = FlakyClient(down=3)
    logger.metrics({"loss": 1.0}, step=1)  # fails: queued
    logger.tags({"stage": "a"})  # queued behind it, order kept
    logger.metrics({"loss": 0.5}, step=2)  # fails again (retry), then the server is back
    logger.metrics({"loss": 0.25}, step=3)
    logger.flush()
    assert logger.client.accepted == [("loss", 1), ("stage", "a"), ("loss", 2), ("loss", 3)]
    assert logger.pending == [] and logger.failures == 3


def test_a_disabled_logger_never_calls_the_server():
    logger = RankZeroLogger("http://127.0.0.1:1", "run", enabled=False)
    logger.metrics({"loss": 1.0}, 1)
    logger.tags({"a": 1})
    assert logger.pending == [] and logger.client is None


@pytest.mark.integration
def test_training_survives_the_tracking_server_going_away(ray_session, shards32, tmp_path, monkeypatch):
    from pipeline.config import load_config
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    root, port = tmp_path / "server", free_port()
    root.mkdir()
    server = {"proc": start_mlflow_server(root, port)}
    uri = f"http://127.0.0.1:{port}"
    # a LoggedModel at every checkpoint (20, 40, 60), every one kept: those whose step falls in
    # the outage are logged through the same queue once the server is back, each exactly once
    cfg = load_config(None, base_overrides(shards32, tmp_path, uri, **{
        "train.max_steps": 60, "train.log_every": 2, "train.val_every": 30, "train.image_every": 30,
        "train.checkpoint_every": 20, "tracking.log_model": True, "tracking.model_per_checkpoint": True,
        "tracking.keep_models": 0}))
    monkeypatch.setenv("VAEPIPE_FAULT_STEP_SLEEP", str(max(0.25, OUTAGE_S / 32)))  # ~32 steps in the outage

    def outage():
        client = make_client(uri)
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until the run has logged a few windows
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 3:
                break
            time.sleep(0.5)
        server["down_at"] = time.time()
        stop_process(server["proc"])
        time.sleep(OUTAGE_S)  # several log windows while the server is away
        server["restart_at"] = time.time()  # nothing reaches the server before this
        server["proc"] = start_mlflow_server(root, port)

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        result = run_training(cfg)
        thread.join(timeout=120)
        steps = [m.step for m in make_client(uri).get_metric_history(result.run_id, "loss")]
        assert steps == list(range(2, 61, 2))  # every window once, none lost, none twice
        client = make_client(uri)
        images = logged_images(client, result.run_id)
        samples = {key: paths for key, paths in images.items() if key[0] == "samples"}
        assert sorted(samples) == [("samples", 0), ("samples", 30), ("samples", 60)]
        assert all(len(paths) == 1 for paths in samples.values()), samples  # each once
        run = client.get_run(result.run_id)
        assert {k.split("/")[1].split("-")[0] for k in run.data.metrics if k.startswith("system/")} == {"rank0", "rank1"}
        assert run.info.status == "FINISHED"
        assert result.metrics["step"] == 60
        loss_at = {m.step: m.timestamp for m in client.get_metric_history(result.run_id, "loss")}  # stamped when queued
        models = logged_models.search(client, [run.info.experiment_id], [result.run_id])
        assert sorted(logged_models.step_of(m) for m in models) == [20, 40, 60]  # none lost, none twice
        deferred = [m for m in models
                    if server["down_at"] * 1000 <= loss_at[logged_models.step_of(m)] < server["restart_at"] * 1000]
        assert deferred, ({logged_models.step_of(m): loss_at[logged_models.step_of(m)] for m in models}, server)
        for model in deferred:  # reached its step while the server was away, logged once it was back
            assert model.creation_timestamp >= server["restart_at"] * 1000
            assert logged_models.metric_of(model, "loss") == dict(
                (m.step, m.value) for m in client.get_metric_history(result.run_id, "loss"))[logged_models.step_of(model)]
    finally:
        stop_process(server["proc"])

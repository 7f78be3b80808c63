"""S3 end to end on real local services: moto's S3 server and an ``mlflow server`` whose artifacts
go to it (``--artifacts-destination s3://...``), and a training job on a simulated two-node Ray
cluster whose run folder is on S3 (``train.storage_path=s3://...``, see ``s3_job.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BUCKET, free_port, start_mlflow_server, stop_process
from pipeline import logged_models
from pipeline.data import storage
from pipeline.train.checkpoint import commit_status, committed_checkpoints, marker_of
from pipeline.train.run_storage import file_sizes

pytestmark = pytest.mark.integration


@pytest.fixture
def mlflow_on_s3(s3_endpoint, tmp_path):
    """``mlflow server`` on 127.0.0.1 proxying artifacts to ``s3://BUCKET/mlartifacts`` on moto."""
    root = tmp_path / "mlflow"
    root.mkdir()
    proc = start_mlflow_server(root, free_port(), artifacts_destination=f"s3://{BUCKET}/mlartifacts")
    try:
        yield f"http://127.0.0.1:{proc.args[proc.args.index('--port') + 1]}"
    finally:
        stop_process(proc)


def _s3_keys(prefix: str) -> list[str]:
    pages = storage.s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _run_job(shards: str, work: Path, tracking_uri: str, storage_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    script = Path(__file__).resolve().parents[1] / "s3_job.py"
    proc = subprocess.run([sys.executable, str(script), shards, str(work), tracking_uri, storage_url], env=env,
                          capture_output=True, text=True, timeout=840)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1])


def test_two_node_training_checkpoints_to_s3_resumes_from_s3_and_logs_artifacts_to_s3(
        shards32, tmp_path, mlflow_on_s3):
    runs = f"s3://{BUCKET}/runs"
    out = _run_job(shards32, tmp_path, mlflow_on_s3, runs)
    first, by_url, by_run_id = out["first"], out["by_url"], out["by_run_id"]
    assert not (tmp_path / "runs").exists()  # nothing of the run folder went to a local disk

    # run 1: two workers on two nodes, one exited at step 4; the restarted group restored step 3 from S3
    assert first["step"] == 6 and first["resumed_from"] == "3"
    assert first["run_dir"] == f"{runs}/first" and first["checkpoint"].startswith(f"{runs}/first/checkpoint_")
    committed = committed_checkpoints(first["run_dir"])
    assert [marker_of(c)["step"] for c in committed] == [6, 3] and committed[0] == first["checkpoint"]
    assert all(marker_of(c)["world_size"] == 2 for c in committed)
    assert sum("optim_states" in rel for rel in file_sizes(committed[0])) == 2  # both nodes' shards, one folder

    # run 2: --resume <s3 run folder> continues the same MLflow run from step 6
    assert (by_url["run_id"], by_url["resumed_from"], by_url["step"]) == (first["run_id"], "6", 9)
    assert commit_status(by_url["checkpoint"]) == (True, "")
    # train.checkpoint_upload=auto on S3: Ray Train uploaded it in the background; run 3 restores it
    assert (marker_of(committed[0])["upload"], marker_of(by_url["checkpoint"])["upload"]) == ("sync", "async")

    # run 3: --resume <MLflow run id> -> its run folder on S3 -> step 9, continued on one rank (local mode)
    assert (by_run_id["run_id"], by_run_id["resumed_from"], by_run_id["step"]) == (first["run_id"], "9", 12)
    assert marker_of(by_run_id["checkpoint"])["world_size"] == 1
    assert marker_of(by_run_id["checkpoint"])["upload"] == "sync"  # local mode copies in report
    assert "universal/latest_universal" in file_sizes(by_url["checkpoint"])  # converted once, kept on S3

    _assert_artifacts_on_s3_and_served(mlflow_on_s3, first["run_id"], first["model_uri"], tmp_path)


def _assert_artifacts_on_s3_and_served(tracking_uri: str, run_id: str, model_uri: str, tmp_path: Path) -> None:
    """The run's images and its logged model are objects in the moto bucket, and what the MLflow
    server hands out for them is those objects' bytes."""
    import mlflow

    from pipeline.tracking import make_client

    client = make_client(tracking_uri)
    run = client.get_run(run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client needs no S3 access
    keys = _s3_keys("mlartifacts/")
    images = [k for k in keys if f"/{run_id}/artifacts/images/" in k and k.endswith(".png")]
    assert any("reconstructions+step+6+" in k for k in images), keys
    served = Path(client.download_artifacts(run_id, "images/" + images[0].rsplit("/", 1)[-1], str(tmp_path)))
    assert served.read_bytes() == storage.read_bytes(f"s3://{BUCKET}/{images[0]}")
    model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp_path / "model")))
    # run 1 logged a LoggedModel at each checkpoint (3, 6) and keeps the newest only (keep_models=1,
    # keep_best_models=0): the step-3 model's files are gone from the bucket, deleted through the server
    live = logged_models.search(client, [run.info.experiment_id], [run_id])
    assert [(m.model_id, logged_models.step_of(m)) for m in live] == [(model_uri.rsplit("/", 1)[-1], 6)]
    assert {k.split("/models/", 1)[1].split("/", 1)[0] for k in keys if k.endswith("/MLmodel")} == {live[0].model_id}
    (mlmodel,) = [k for k in keys if k.endswith("/MLmodel") and f"/{model_uri.rsplit('/', 1)[-1]}/" in k]
    assert (model_dir / "MLmodel").read_bytes() == storage.read_bytes(f"s3://{BUCKET}/{mlmodel}")
    assert any(k.endswith("weights.pt") for k in keys)

"""Planted secrets reach nothing a run writes: not stdout/stderr (vaepipe's lines, rank 0's,
MLflow's "View run ... at" lines), not a file of the run folder, the sweep folder, the
MLflow server (its database, artifacts, log) or Ray's session logs (every Ray process's
output, Train's structured logs), not a param or tag of a run, not the
registered model version. The tracking server is reached with the password all the same:
it moved from the URI into MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import base_overrides
from pipeline.config import load_config

pytestmark = pytest.mark.integration

SECRETS = {"MLFLOW_PW": "SECRETPW", "AWS_SECRET_ACCESS_KEY": "SECRETAWS", "AWS_SESSION_TOKEN": "SECRETSESSIONTOK",
           "RAY_ADDRESS_PW": "SECRETADDR"}


@pytest.fixture
def planted(monkeypatch):
    """Secret env vars set; MLflow's credential vars recorded so whatever the run sets is undone."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRETS["AWS_SECRET_ACCESS_KEY"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRETS["AWS_SESSION_TOKEN"])  # stands in for RAY_AUTH_TOKEN
    return monkeypatch


def _with_password(server: str) -> str:
    return server.replace("http://", f"http://vaeuser:{SECRETS['MLFLOW_PW']}@")


def _server_root(tmp_path_factory) -> Path:
    roots = sorted(tmp_path_factory.getbasetemp().glob("mlflow_server*"))
    assert roots and (roots[0] / "server.db").exists(), roots
    return roots[0]


def _ray_session_logs() -> Path:
    """The session Ray's log folder: every Ray process's stdout/stderr, Train's structured logs."""
    import ray._private.worker

    return Path(ray._private.worker._global_node.get_logs_dir_path())


def _files_holding_secrets(*folders: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    n = 0
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink():
                n += 1
                data = p.read_bytes()
                for name, value in SECRETS.items():
                    if value.encode() in data:
                        found.setdefault(name, []).append(str(p))
    assert n > 0, f"no files under {folders}"
    return found


def _texts_of_run(client, run_id: str) -> str:
    run = client.get_run(run_id)
    return repr(run.data.params) + repr(run.data.tags) + repr(run.info)


def _captured(capfd) -> str:
    time.sleep(3)  # Ray forwards the workers' lines to the driver asynchronously
    out, err = capfd.readouterr()
    return out + err


def _assert_nothing_leaked(text: str, files: dict) -> None:
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert not leaked, f"secrets {leaked} in output/params/tags"
    assert not files, f"secrets in files: {files}"


def test_training_with_password_in_tracking_uri_writes_no_secret(ray_session, shards32, tmp_path, mlflow_server,
                                                                 planted, capfd, tmp_path_factory):
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    # the reported case: credentials in MLFLOW_TRACKING_URI, and a dist.address with a password
    planted.setenv("MLFLOW_TRACKING_URI", _with_password(mlflow_server))
    overrides = [o for o in base_overrides(shards32, tmp_path, **{
        "dist.zero_stage": 2, "train.max_steps": 6, "train.checkpoint_every": 3, "train.val_every": 3,
        "train.image_every": 6, "tracking.register_name": "vae-secret", "tracking.register_alias": "champion",
        "dist.address": f"ray://raya:{SECRETS['RAY_ADDRESS_PW']}@127.0.0.1:1",  # unused: Ray is already up
    }) if not o.startswith("tracking.tracking_uri=")]
    result = run_training(load_config(None, overrides))
    assert result.tracking_uri == mlflow_server  # the URI everyone uses has no userinfo
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRETS["MLFLOW_PW"]
    client = make_client(mlflow_server)
    version = client.get_model_version_by_alias("vae-secret", "champion")
    assert result.checkpoint_path and list(Path(result.checkpoint_path).glob("ds/*model_states.pt"))
    output = _captured(capfd)
    # the lines that used to carry the password were printed, by the driver and by rank 0
    assert "View run" in output and mlflow_server.split("//")[1] in output, output[-3000:]
    assert output.count("[vaepipe] step 6/6") == 1, output[-3000:]  # once, from rank 0
    # tracking.verbose is off: none of Ray Train's per-report lines on any rank (test_console.py)
    assert "TrainingReport(" not in output and "Checkpoint successfully created" not in output, output[-3000:]
    texts = output + _texts_of_run(client, result.run_id) + repr(version) + repr(client.get_registered_model("vae-secret"))
    _assert_nothing_leaked(texts, _files_holding_secrets(tmp_path, _server_root(tmp_path_factory), _ray_session_logs()))
    # a saved config still resumes: the checkpoint's config is redacted, the URI comes from the driver
    assert "***" in Path(result.checkpoint_path, "config.yaml").read_text()


def test_sweep_with_password_in_config_writes_no_secret(ray_session, shards32, tmp_path, mlflow_server,
                                                        planted, capfd, tmp_path_factory):
    from pipeline.tracking import make_client
    from pipeline.tune import load_sweep, run_sweep

    doc: dict = {"space": {"optim.lr": {"grid": [1e-2]}}}
    # the trial trains in its own Tune process (local mode): Train's workers and their logs are
    # the training test's; the sweep's own paths (its state, the trial's config) are this one's
    for override in base_overrides(shards32, tmp_path, tracking_uri=_with_password(mlflow_server), **{
            "dist.num_workers": 0, "train.max_steps": 3, "train.checkpoint_every": 3, "train.val_every": 3, "train.image_every": 3,
            "tracking.log_model": False, "tune.num_samples": 1, "tune.scheduler": "fifo",
            "tune.max_concurrent": 1, "tune.storage_path": str(tmp_path / "tune")}):
        key, value = override.split("=", 1)
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    spec = tmp_path_factory.mktemp("sweep_spec") / "sweep.yaml"  # holds the password: kept out of the searched folders
    spec.write_text(yaml.safe_dump(doc))
    cfg, space = load_sweep(spec)
    summary = run_sweep(cfg, space)
    assert len(summary["trials"]) == 1 and summary["trials"][0]["status"] == "finished", summary
    client = make_client(mlflow_server)
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 1
    assert parent.data.params["tracking.tracking_uri"] == mlflow_server  # resolved and stripped in the driver
    output = _captured(capfd)
    assert "View run" in output, output[-3000:]
    texts = output + _texts_of_run(client, parent.info.run_id) + _texts_of_run(client, children[0].info.run_id)
    _assert_nothing_leaked(texts, _files_holding_secrets(tmp_path, _server_root(tmp_path_factory), _ray_session_logs()))

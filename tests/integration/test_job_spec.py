"""What `vaepipe submit` ships, without a cluster: the resolved config, the uploaded files, the env."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.job_spec import build_job_spec, project_root, staged_working_dir, upload_excludes
from pipeline.jobs import JobsError, enable_token_auth, resolve_address
from pipeline.tune import load_sweep

ROOT = Path(__file__).resolve().parents[2]


def _fake_project(root: Path) -> Path:
    for rel in ("pipeline/data/storage.py", "pipeline/cli.py", "models/conv_vae.py", "jobs/a.yaml", "data/shards/x.tar",
                "runs/r/ckpt.pt", ".venv/bin/python", ".git/HEAD", "mlartifacts/1/a.png", "mlruns.db", "mlruns/0/meta",
                "pipeline/__pycache__/cli.cpython-311.pyc", "debug.log", "pyproject.toml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x")
    (root / ".gitignore").write_text("__pycache__/\n*.log\n!keep.log\n")
    return root


def test_upload_holds_the_code_and_the_config_but_no_data_runs_venv_or_git(tmp_path):
    """Zipped with Ray's own packager, as `submit_job` does: excludes are anchored, so pipeline/data stays."""
    from ray._private.runtime_env.packaging import create_package

    root = _fake_project(tmp_path / "proj")
    excludes = upload_excludes(root)
    assert "*.log" in excludes and "!keep.log" not in excludes
    with staged_working_dir(root, {".vaepipe_submit/j.yaml": "a: 1\n"}, excludes) as stage:
        create_package(str(stage), tmp_path / "pkg.zip", include_gitignore=True, excludes=excludes)
    names = {n.rstrip("/") for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist()}
    assert {"pipeline/data/storage.py", "pipeline/cli.py", "models/conv_vae.py", "jobs/a.yaml", ".vaepipe_submit/j.yaml"} <= names
    leaked = [n for n in names if n.split("/")[0] in ("data", "runs", ".venv", ".git", "mlartifacts", "mlruns", "mlruns.db")
              or n.endswith((".pyc", ".log"))]
    assert leaked == []
    assert not (root / ".vaepipe_submit").exists()  # the checkout is never written to


def test_job_file_resolves_to_a_config_that_loads_back_the_same(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = build_job_spec(ROOT / "jobs/celeba64.yaml", ["model.latent_dim=64", "dist.address=ray://head:10001"])
    (rel, text), = spec.files.items()
    assert spec.kind == "train" and spec.entrypoint == f"vaepipe train --config {rel}"
    (tmp_path / "c.yaml").write_text(text)
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.model.latent_dim == 64 and cfg.dist.num_workers == 8 and cfg.dist.address is None
    assert any("data.path" in n for n in spec.notes) and any("no tracking URI" in n for n in spec.notes)


def test_sweep_file_becomes_a_tune_job_with_the_same_space(tmp_path):
    spec = build_job_spec(ROOT / "jobs/sweeps/beta_vae.yaml", ["tune.num_samples=3"])
    assert spec.kind == "tune" and spec.entrypoint.startswith("vaepipe tune --config .vaepipe_submit/")
    with staged_working_dir(ROOT, spec.files, []) as stage:
        cfg, space = load_sweep(stage / spec.entrypoint.split("--config ")[1])
    ref_cfg, ref_space = load_sweep(ROOT / "jobs/sweeps/beta_vae.yaml", ["tune.num_samples=3"])
    assert space == ref_space and cfg == ref_cfg


def test_credentials_never_travel_in_the_job(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://alice:s3cret-pw-123@mlflow.internal")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "ray-token-value-1")
    spec = build_job_spec(ROOT / "jobs/quickstart.yaml")
    assert spec.env_vars == {"MLFLOW_TRACKING_URI": "https://mlflow.internal", "AWS_ENDPOINT_URL": "http://minio:9000"}
    shipped = repr(spec.env_vars) + repr(spec.files) + spec.entrypoint + repr(spec.metadata(Path("x")))
    assert not any(s in shipped for s in ("s3cret-pw-123", "aws-secret-value-1", "ray-token-value-1", "alice"))
    assert any("MLFLOW_TRACKING_USERNAME" in n for n in spec.notes)


def test_database_uri_with_password_is_refused(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="holds a password") as err:
        build_job_spec(ROOT / "jobs/quickstart.yaml", ["tracking.tracking_uri=postgresql://u:dbpass-123@db/mlflow"])
    assert "dbpass-123" not in str(err.value)


def test_bad_key_names_the_key():
    with pytest.raises(ConfigError, match="model.latnt_dim"):
        build_job_spec(ROOT / "jobs/quickstart.yaml", ["model.latnt_dim=3"])
    with pytest.raises(ConfigError, match="'nope'"):
        build_job_spec(ROOT / "jobs/sweeps/beta_vae.yaml", ["nope=1"])


def test_address_precedence(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(JobsError, match="--address"):
        resolve_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a GCS address is not the dashboard
    assert resolve_address(None) == "http://127.0.0.1:1"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265/")
    assert resolve_address(None) == "http://head:8265"
    assert resolve_address("http://other:8265") == "http://other:8265"


def test_token_mode_is_turned_on_only_when_there_is_a_token(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    enable_token_auth()
    assert "RAY_AUTH_MODE" not in os.environ
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    enable_token_auth()
    assert os.environ["RAY_AUTH_MODE"] == "token"


def test_project_root_is_this_checkout():
    assert project_root() == ROOT


def test_followed_logs_end_with_what_the_stream_did_not_carry(monkeypatch):
    """Ray's tail can stop before a short job's last lines arrive: `submit --wait` and
    `jobs logs --follow` print the rest from the stored log, once, and redacted."""
    from pipeline import jobs

    full = "MLflow experiment: x\n[vaepipe] step 1 loss 1.0\nMLFLOW_TRACKING_PASSWORD=hunter2\nSUCCEEDED\n"

    class Client:
        def get_address(self):
            return "http://127.0.0.1:8265"

        async def tail_job_logs(self, job_id):
            yield full[:21]  # the stream ends after the first line

        def get_job_logs(self, job_id):
            return full

        def get_job_status(self, job_id):
            return type("S", (), {"value": "SUCCEEDED"})()

    written = []
    assert jobs.follow_logs(Client(), "vaepipe-1", written.append) == "SUCCEEDED"
    out = "".join(written)
    assert out.count("MLflow experiment: x") == 1 and "[vaepipe] step 1" in out and out.endswith("SUCCEEDED\n")
    assert "hunter2" not in out and "MLFLOW_TRACKING_PASSWORD=***" in out


def test_a_head_without_vaepipe_on_its_path_says_so_instead_of_a_shell_error(tmp_path):
    import subprocess

    from pipeline.job_spec import command_of, guarded

    line = guarded("vaepipe train --config .vaepipe_submit/x.yaml")
    assert command_of(line) == "vaepipe train --config .vaepipe_submit/x.yaml"
    bare = subprocess.run(["/bin/sh", "-c", line], env={"PATH": str(tmp_path)}, capture_output=True, text=True)
    assert bare.returncode == 127 and "vaepipe is not on the PATH of the Ray head" in bare.stderr
    assert "source .venv/bin/activate" in bare.stderr and "not found" not in bare.stderr
    fake = tmp_path / "vaepipe"  # a head whose environment has vaepipe runs the command itself
    fake.write_text('#!/bin/sh\necho "ran $*"\n')
    fake.chmod(0o755)
    ran = subprocess.run(["/bin/sh", "-c", line], env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.strip() == "ran train --config .vaepipe_submit/x.yaml"

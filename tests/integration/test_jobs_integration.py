"""`vaepipe submit` and `vaepipe jobs` against a real Ray head with token auth, on loopback.

The head is `ray start --head --block` in its own temp dir (its address file stays there, so
no other `ray.init()` on the machine finds it), in a process group of its own, and is stopped
by killing that group: never `ray stop`, which would kill every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.job_spec import guarded
from tests.conftest import base_overrides, free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
STRIPPED = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


@dataclass
class Head:
    url: str
    token: str
    temp_dir: str


def _http_status(url: str, token: str | None = None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _wait_jobs_api(head: Head, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"ray start exited with {proc.returncode}"
        try:
            if _http_status(f"{head.url}/api/jobs/", head.token) == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the Ray head's job API at {head.url} did not answer within {timeout}s")


def _head_env(token: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED + ("PYTHONPATH",)}
    # The job runs `vaepipe` from PATH (the image's entrypoint); the code itself is the uploaded working dir.
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}:{env.get('PATH', '')}",
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return env


@pytest.fixture(scope="module")
def ray_head():
    token = secrets.token_hex(24)
    temp_dir = tempfile.mkdtemp(prefix="vr", dir="/tmp")  # short: Ray's socket paths live under it
    dash = free_port()
    ports = ["--port", free_port(), "--dashboard-port", dash, "--ray-client-server-port", free_port(),
             "--dashboard-agent-listen-port", free_port(), "--dashboard-agent-grpc-port", free_port(),
             "--metrics-export-port", free_port(), "--runtime-env-agent-port", free_port()]
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--num-cpus", "4", "--temp-dir", temp_dir, "--disable-usage-stats", "--block", *map(str, ports)]
    log = open(Path(temp_dir) / "head.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_head_env(token), start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", token, temp_dir)
    try:
        _wait_jobs_api(head, proc)
        yield head
    finally:
        _stop_head(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_head(proc: subprocess.Popen) -> None:
    """SIGKILL to the head's process group: every process of this test's own cluster, nothing
    else. `ray start --block` on SIGTERM stops them one after another with a grace period each
    (30 s here), and with SIGTERM sent to the whole group it did not exit within a minute."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def client_env(token: str | None, home: Path | None = None) -> dict:
    """The user's shell: the token in RAY_AUTH_TOKEN only (no RAY_AUTH_MODE: vaepipe sets it)."""
    env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    if home:
        env["HOME"] = str(home)
    return env


def vaepipe(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def job_json(head: Head, job_id: str) -> dict:
    req = urllib.request.Request(f"{head.url}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def submitted_id(out: str) -> str:
    m = re.search(r"submitted (vaepipe-[\w-]+)", out)
    assert m, out
    return m.group(1)


def test_submit_wait_trains_into_mlflow(ray_head, shards32, mlflow_server, tmp_path):
    """A debug job runs to SUCCEEDED on the head, tracks into the MLflow server, and the token stays out of it all."""
    from mlflow.tracking import MlflowClient

    experiment = f"jobs-it-{secrets.token_hex(3)}"
    args = ["submit", "--config", "jobs/quickstart.yaml", "--address", ray_head.url, "--wait",
            *base_overrides(shards32, tmp_path, tracking_uri=mlflow_server, **{"tracking.experiment": experiment,
                                                                               "tracking.register_name": "null"})]
    t0, seen, lines = time.monotonic(), {}, []
    marks = {"accepted": "submitted vaepipe-", "first job log line": None, "first training step": "[vaepipe] step"}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=client_env(ray_head.token),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        lines.append(line)
        for name, marker in marks.items():
            started = marker is None and len(lines) > 1 and lines[-2].startswith("MLflow experiment:")
            if name not in seen and (started or (marker and marker in line)):
                seen[name] = time.monotonic() - t0
    rc, out = proc.wait(timeout=60), "".join(lines)
    print("\nsubmit -> " + ", ".join(f"{k}: {v:.1f} s" for k, v in seen.items()) + f", done: {time.monotonic() - t0:.1f} s")
    first_step = seen.get("first training step")
    assert rc == 0, out[-4000:]
    assert first_step is not None and "SUCCEEDED" in out
    job_id = submitted_id(out)
    assert f"{ray_head.url}/#/jobs/{job_id}" in out and experiment in out
    runs = MlflowClient(mlflow_server).search_runs([MlflowClient(mlflow_server).get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.metrics["loss"] > 0
    assert runs[0].data.params["train.max_steps"] == "12"
    info = job_json(ray_head, job_id)
    assert info["entrypoint"] == guarded(f"vaepipe train --config .vaepipe_submit/{job_id}.yaml")
    assert info["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": mlflow_server}
    assert ray_head.token not in json.dumps(info) + out + json.dumps(runs[0].data.params)


def test_jobs_list_status_logs_and_stop(ray_head, shards32, mlflow_server, tmp_path):
    env = client_env(ray_head.token)
    args = ["submit", "--config", "jobs/quickstart.yaml", "--address", ray_head.url,
            *base_overrides(shards32, tmp_path, tracking_uri=mlflow_server, **{"train.max_steps": 100000,
                                                                               "tracking.register_name": "null"})]
    sub = vaepipe(*args, env=env)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = submitted_id(sub.stdout)
    assert f"vaepipe jobs logs {job_id} --follow" in sub.stdout
    listed = vaepipe("jobs", "list", "--address", ray_head.url, env=env)
    assert listed.returncode == 0 and job_id in listed.stdout
    deadline = time.time() + 120
    while job_json(ray_head, job_id)["status"] == "PENDING" and time.time() < deadline:
        time.sleep(1)
    status = vaepipe("jobs", "status", job_id, "--address", ray_head.url, env=env)
    assert f"{job_id}: RUNNING" in status.stdout, status.stdout + status.stderr
    stopped = vaepipe("jobs", "stop", job_id, "--address", ray_head.url, env=env)
    assert stopped.returncode == 0 and f"{job_id}: STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr
    assert "STOPPED" in vaepipe("jobs", "status", job_id, "--address", ray_head.url, env=env).stdout
    logs = vaepipe("jobs", "logs", job_id, "--address", ray_head.url, env=env)
    assert logs.returncode == 0 and "vaepipe" in logs.stdout.lower()
    followed = vaepipe("jobs", "logs", job_id, "--follow", "--address", ray_head.url, env=env)
    assert followed.returncode == 1 and f"job {job_id}: STOPPED" in followed.stdout


@pytest.mark.parametrize("how", ["wrong token", "no token"])
def test_refused_without_the_token_names_what_to_set(ray_head, tmp_path, how):
    wrong = "not-the-token-" + secrets.token_hex(8)
    env = client_env(wrong if how == "wrong token" else None, home=tmp_path)  # HOME: no ~/.ray/auth_token either
    res = vaepipe("jobs", "list", "--address", ray_head.url, env=env)
    out = res.stdout + res.stderr
    assert res.returncode == 2, out
    assert "refused" in out and all(s in out for s in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token"))
    assert wrong not in out and ray_head.token not in out and "Traceback" not in out


def test_bad_config_key_fails_locally_without_submitting(ray_head, tmp_path):
    env = client_env(ray_head.token)
    before = vaepipe("jobs", "list", "--address", ray_head.url, env=env).stdout.count("vaepipe-")
    res = vaepipe("submit", "--config", "jobs/quickstart.yaml", "--address", ray_head.url, "model.latnt_dim=3", env=env)
    assert res.returncode == 2 and "model.latnt_dim" in res.stdout, res.stdout + res.stderr
    sweep = vaepipe("submit", "--config", "jobs/sweeps/beta_vae.yaml", "--address", ray_head.url, "tune.num_sampls=2", env=env)
    assert sweep.returncode == 2 and "tune.num_sampls" in sweep.stdout, sweep.stdout + sweep.stderr
    assert vaepipe("jobs", "list", "--address", ray_head.url, env=env).stdout.count("vaepipe-") == before

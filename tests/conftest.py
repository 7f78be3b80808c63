"""Shared fixtures: one local Ray for the whole session, a real MLflow server on loopback,
and one small synthetic shard set. Services are started here and stopped at the end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's controller polls its workers every 2 s by default, and a fit ends only at the poll
# after the one that takes the last report: 2-4 s of every fit was spent waiting for it, and a
# second ray.train.report within 2 s of the first waited in its 1-slot queue. Train hands these
# variables from the driver to its controller and workers (ENV_VARS_TO_PROPAGATE), so processes
# started by the tests (elastic_job.py, s3_job.py, the CLI) inherit them too.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
# Train's preemption watcher (one more actor process per fit) watches for nodes being drained;
# only the elastic drill drains a node, and it turns the watcher on for its own cluster.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor looks for new worker log files every 0.1 s while a session holds fewer than
# RAY_LOG_MONITOR_MANY_FILES_THRESHOLD (1,000) of them, and every 0.5 s past it; the suite's
# sessions collect hundreds. At 0 it looks every 0.5 s from the start: a worker's first line
# reaches the driver up to 0.4 s later, and an idle session with 124 worker logs spends 1.2
# instead of 2.8 core-seconds a minute on it (measured with psutil over 60 s).
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# xdist's worker processes start with COLUMNS=80 and LINES=24 set; a rich Console built while
# COLUMNS is set keeps that width for good, so the CLI tests' own COLUMNS (CliRunner's env) would
# not reach `vaepipe`'s console. Unset, rich reads the variable each time it prints.
for _var in ("COLUMNS", "LINES"):
    os.environ.pop(_var, None)

# `make test` runs two pytest processes (`-n 2 --dist loadscope --no-loadscope-reorder`): each
# test module goes whole to one process, so a module's fixtures run once, and each process starts
# the session's services (Ray, MLflow, moto) for itself when its first module asks. Modules are
# handed out costliest first, from the seconds each took in a measured run (MODULE_SECONDS,
# rewritten by `pytest --store-module-seconds`), so that no long module starts last and runs
# alone. A module that is not in the file yet goes last.
MODULE_SECONDS = Path(__file__).with_name("module_seconds.json")
_measured: dict[str, float] = {}


def pytest_addoption(parser):
    parser.addoption("--store-module-seconds", action="store_true",
                     help=f"record each module's seconds (setup, call, teardown) in {MODULE_SECONDS.name}")


def _module_seconds() -> dict[str, float]:
    return json.loads(MODULE_SECONDS.read_text()) if MODULE_SECONDS.exists() else {}


def pytest_collection_modifyitems(config, items):
    seconds = _module_seconds()
    items.sort(key=lambda item: -seconds.get(_module_of(item.nodeid), 0.0))  # stable: a module keeps its order


def _module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_runtest_logreport(report):
    _measured[_module_of(report.nodeid)] = _measured.get(_module_of(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session):
    # under xdist the controller sees every process's reports; only it writes the file
    if session.config.getoption("--store-module-seconds") and not hasattr(session.config, "workerinput"):
        seconds = _module_seconds()
        seconds.update(_measured)  # a run of some modules refreshes theirs and keeps the others'
        ranked = sorted(seconds.items(), key=lambda kv: -kv[1])
        MODULE_SECONDS.write_text(json.dumps({m: round(s, 1) for m, s in ranked}, indent=1) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every integration test: a 2-worker fit costs ~30 s of start-up."""
    import ray

    from ray._private.authentication_test_utils import reset_auth_token_state

    from pipeline.ray_local import start_local_ray

    # A test that ran earlier in this process (`jobs` token handling, Ray's packager) can leave
    # Ray's cached auth mode and token from its own environment; the new cluster's must be read.
    reset_auth_token_state()
    # 4 logical CPUs on a 2-core machine: 2 training workers plus Train's controller. Addressed
    # explicitly, so a vaepipe job running beside the suite cannot confuse either.
    start_local_ray(num_cpus=4)
    yield ray
    ray.shutdown()


SECOND_RAY = """
import signal, sys, time
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False)  # a new instance, never the session's
signal.signal(signal.SIGTERM, lambda *_: (ray.shutdown(), sys.exit(0)))
print("up", flush=True)
time.sleep(3600)
"""


@pytest.fixture
def second_local_ray():
    """Another local Ray instance on this machine, as another user's job or test suite would start."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-c", SECOND_RAY], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = proc.stdout.readline().strip()
        assert line == "up", f"the second Ray instance did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_all_cpus_free(ray, timeout: float = 60.0) -> dict:
    """Available resources once every CPU is free again (no placement group left behind)."""
    deadline = time.time() + timeout
    while True:
        free, total = ray.available_resources(), ray.cluster_resources()
        if free.get("CPU", 0) >= total.get("CPU", 0) or time.time() > deadline:
            return {"free": free.get("CPU", 0), "total": total.get("CPU", 0)}
        time.sleep(1)


@pytest.fixture(scope="session")
def synth_source(tmp_path_factory) -> Path:
    from pipeline.data.synth import generate_synthetic_celeba

    out = tmp_path_factory.mktemp("synth")
    return generate_synthetic_celeba(out / "celeba", n=300, seed=0, workers=2, progress=False)


@pytest.fixture(scope="session")
def shards32(synth_source, tmp_path_factory) -> str:
    """300 synthetic faces at 32 px; train split in uneven shards (100, 100, ~40)."""
    from pipeline.data.shards import write_shards

    out = tmp_path_factory.mktemp("shards") / "synth32"
    write_shards(str(synth_source), str(out), resolution=32, shard_size=100, workers=2, progress=False)
    return str(out)


BUCKET = "vaepipe-test"


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (free port) with dummy credentials in the environment and
    the bucket ``BUCKET``; processes started while it runs inherit the environment."""
    from moto.server import ThreadedMotoServer

    from pipeline.data import storage

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            mp.delenv(key, raising=False)
        storage.s3_client().create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


def start_mlflow_server(root: Path, port: int, artifacts_destination: str | None = None) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:``port`` with its SQLite store under ``root`` and its artifacts
    there too, or proxied to ``artifacts_destination`` (e.g. ``s3://bucket/prefix``)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--serve-artifacts",
           "--artifacts-destination", artifacts_destination or str(root / "artifacts"), "--workers", "1"]
    log = open(root / "server.log", "a")
    # no job runner: the tests use none, and MLflow never removes the job store it makes in /dev/shm
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    log.close()
    wait_http(f"http://127.0.0.1:{port}/health", timeout=120, proc=proc)
    return proc


def stop_process(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 with its own SQLite store and artifact root."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    proc = start_mlflow_server(root, port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


_MLFLOW_DB_TEMPLATE: Path | None = None


def fresh_sqlite_store(db: Path) -> str:
    """``sqlite:///<db>``, an empty MLflow store there unless ``db`` exists already (a resumed run
    keeps its store). Every store starts as a copy of one this process created once: MLflow builds
    a new SQLite store by running all its schema migrations, ~4 s of each test's fit here."""
    global _MLFLOW_DB_TEMPLATE
    import shutil

    if not db.exists():
        if _MLFLOW_DB_TEMPLATE is None:
            import atexit
            import tempfile

            from mlflow.store.tracking import DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            folder = Path(tempfile.mkdtemp(prefix="vaepipe-mlflow-template-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            template = folder / "mlruns.db"
            # the artifact root MLflow gives a store it creates itself (the Default experiment's)
            SqlAlchemyStore(f"sqlite:///{template}", DEFAULT_LOCAL_FILE_AND_ARTIFACT_PATH).engine.dispose()
            _MLFLOW_DB_TEMPLATE = template
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_MLFLOW_DB_TEMPLATE, db)
    return f"sqlite:///{db}"


def base_overrides(shards: str, tmp: Path, tracking_uri: str | None = None, **extra) -> list[str]:
    """A short debug-model job on the test shards, everything written under ``tmp``; tracked in
    ``tmp/mlruns.db`` (``fresh_sqlite_store``) unless ``tracking_uri`` names another store."""
    values = {
        "data.path": shards, "data.resolution": 32, "data.batch_size": 8, "data.loader_workers": 0,
        "data.val_batches": 1, "data.shuffle_buffer": 64,
        "model.flavor": "debug", "model.latent_dim": 8, "model.likelihood": "mse", "optim.lr": 1e-2,
        "train.max_steps": 12, "train.log_every": 3, "train.val_every": 6, "train.image_every": 12,
        "train.checkpoint_every": 6, "train.storage_path": str(tmp / "runs"),
        "dist.num_workers": 2, "dist.max_failures": 0,
        "tracking.tracking_uri": tracking_uri or fresh_sqlite_store(tmp / "mlruns.db"),
        "tracking.artifact_location": str(tmp / "mlartifacts"), "tracking.image_grid_size": 2,
        # one model at the end: a model per checkpoint (and its validation) is the subject of
        # test_logged_models and the S3 end-to-end test, which turn it on; elsewhere it only costs time
        "tracking.model_per_checkpoint": False,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="session")
def corrupt_shards32(shards32, tmp_path_factory) -> str:
    """A copy of the test shards whose train split is 64 samples, one of them an undecodable JPEG."""
    import hashlib
    import json
    import shutil
    import tarfile

    import webdataset as wds

    src = Path(shards32)
    manifest = json.loads((src / "manifest.json").read_text())
    out = tmp_path_factory.mktemp("corrupt") / "synth32"
    out.mkdir()
    urls = [str(src / s["name"]) for s in manifest["splits"]["train"]["shards"]]
    samples = []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        samples.append({k: v for k, v in sample.items() if k in ("__key__", "jpg", "json")})
        if len(samples) == 64:
            break
    samples[10]["jpg"] = b"\xff\xd8 this is not a jpeg"
    shards = []
    for i in range(2):
        name = f"train-{i:06d}.tar"
        with wds.TarWriter(str(out / name)) as sink:
            for s in samples[i * 32 : (i + 1) * 32]:
                sink.write(s)
        digest = hashlib.sha256((out / name).read_bytes()).hexdigest()
        shards.append({"name": name, "num_samples": 32, "sha256": digest})
    for split in ("valid", "test"):
        for s in manifest["splits"].get(split, {}).get("shards", []):
            shutil.copy(src / s["name"], out / s["name"])
    manifest["splits"]["train"] = {"num_samples": 64, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert tarfile.is_tarfile(out / shards[0]["name"])
    return str(out)


def logged_images(client, run_id: str) -> dict[tuple[str, int], str]:
    """``{(key, step): artifact path}`` of a run's images (the first file of each key and step)."""
    from pipeline.logger import logged_images as all_logged

    return {key: paths[0] for key, paths in all_logged(client, run_id).items()}

"""The driver side of training: check everything, start Ray, run a TorchTrainer, close the run.

The Ray boundary is thin: workers receive ``{"config": plain dict, "run_id", "env", ...}`` and
rebuild the typed config themselves (``pipeline.train.loop``). The config they get is redacted;
the live tracking URI and its credentials travel in ``env`` (a ``credentials.WorkerEnv``), whose
printed form, the only one Ray Train keeps in its run state, names variables but no values.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import ConfigError, VaepipeConfig, to_dict
from pipeline.credentials import CREDENTIAL_ENV, WorkerEnv
from pipeline.redact import is_redacted, redact_config_dict, redact_text
from pipeline.train import checkpoint_validation
from pipeline.train.checkpoint import MARKER_FILE, STATE_FILE, commit_status, committed_checkpoints, read_state
from pipeline.train.console import quiet_driver, train_logging
from pipeline.train.failures import fail_once, not_retried
from pipeline.train.loop import train_loop_per_worker
from pipeline.train.run_storage import Location, checkpoint_location, child, exists, location, ray_storage


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    checkpoint_path: Optional[str]
    metrics: dict
    run_dir: str
    model_uri: Optional[str]
    wall_s: float


def _absolute(path: str) -> str:
    """Local paths are made absolute for the workers; URLs (s3://, file://) pass through."""
    if "://" in path:
        return path
    return str(Path(path).resolve())


def preflight(cfg: VaepipeConfig) -> dict:
    """Fail before any worker starts: the shard set must exist and fit the requested shape."""
    from pipeline.data import storage
    from pipeline.data.shards import read_manifest, shard_urls

    try:
        manifest = read_manifest(cfg.data.path)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.path={cfg.data.path!r}: {exc}") from None
    missing = [u for u in shard_urls(cfg.data.path, "train", manifest)[:64] if not storage.exists(u)]
    if missing:
        raise ConfigError(f"data.path={cfg.data.path!r}: the manifest lists shards that are not there, e.g. {missing[0]}: "
                          "re-run `vaepipe data shard`")
    stored = int(manifest["resolution"])
    if cfg.data.resolution > stored:
        raise ConfigError(f"data.resolution={cfg.data.resolution} is larger than the shards' stored resolution "
                          f"{stored} at {cfg.data.path}; re-shard at a higher resolution or lower data.resolution")
    n_train = manifest["splits"].get("train", {}).get("num_samples", 0)
    needed = cfg.data.batch_size * cfg.dist.world_size
    if n_train < needed:
        raise ConfigError(f"data.path={cfg.data.path} has {n_train} training samples, fewer than one global batch "
                          f"(data.batch_size={cfg.data.batch_size} x {cfg.dist.world_size} ranks, dist.num_workers={cfg.dist.num_workers})")
    if storage.is_s3(cfg.train.storage_path):
        from pipeline.train.run_storage import check_bucket

        why = check_bucket(cfg.train.storage_path)
        if why:
            raise ConfigError(f"train.storage_path={cfg.train.storage_path!r}: {why}")
    return manifest


def has_validation_split(manifest: dict) -> bool:
    return manifest["splits"].get("valid", {}).get("num_samples", 0) > 0


def without_missing_validation(cfg: VaepipeConfig, manifest: dict) -> VaepipeConfig:
    """A shard set without a ``valid`` split trains without validation, said in one line, rather
    than failing at its first validation and again after every restart."""
    if not cfg.data.val_batches or has_validation_split(manifest):
        return cfg
    from pipeline.tracking import say

    say(f"data.path={cfg.data.path} has no 'valid' split (it has {', '.join(sorted(manifest['splits']))}): "
        "training without validation (data.val_batches=0); shard with a valid split to get val_* metrics")
    return replace(cfg, data=replace(cfg.data, val_batches=0))


def find_checkpoint(resume: str, uri: str) -> Location:
    """``--resume`` accepts a checkpoint folder, a Ray run folder (local or ``s3://``), or an MLflow
    run id (its ``vaepipe.run_dir`` tag names the run folder); a folder resolves to its newest
    committed checkpoint."""
    p = location(resume)
    if not exists(p):
        p = location(_run_dir_of(resume, uri))
    if exists(child(p, STATE_FILE)) or exists(child(p, MARKER_FILE)):
        ok, why = commit_status(p)
        if not ok:
            raise ConfigError(f"--resume {resume!r} is not a committed checkpoint: {why}; "
                              "pass its run folder to take the newest committed one")
        return p
    committed = committed_checkpoints(p, recursive=True)
    if not committed:
        raise ConfigError(f"--resume {resume!r}: no committed vaepipe checkpoint (a folder with {MARKER_FILE} "
                          f"whose files are all complete) under {p}")
    return committed[0]


def _run_dir_of(resume: str, uri: str) -> str:
    """The run folder an MLflow run id names; a URL or path with nothing there is refused as such."""
    if "://" in resume:
        raise ConfigError(f"--resume {resume!r}: nothing there (no object under that prefix)")
    from pipeline.tracking import make_client

    try:
        run = make_client(uri).get_run(resume)
    except Exception as exc:
        raise ConfigError(f"--resume {resume!r} is neither a folder nor an MLflow run id at {redact_text(uri)} ({exc})") from None
    run_dir = run.data.tags.get("vaepipe.run_dir")
    if not run_dir:
        raise ConfigError(f"MLflow run {resume} has no vaepipe.run_dir tag; pass the checkpoint folder instead")
    return run_dir


def attach_parent(cfg: VaepipeConfig, uri: str) -> tuple[VaepipeConfig, dict]:
    """Second-stage families (vq_prior) model a trained parent's codes: fetch the parent once
    in the driver, put its architecture into the config and ship its weights to the workers."""
    from pipeline.serving import load_logged_weights
    from pipeline.tracking import make_client

    make_client(uri)
    try:
        blob = load_logged_weights(cfg.model.ar.parent_uri)
    except Exception as exc:
        raise ConfigError(f"model.ar.parent_uri={cfg.model.ar.parent_uri!r} could not be loaded from {redact_text(uri)}: {exc}") from None
    ar = replace(cfg.model.ar, parent_config=dict(blob["model_config"]))
    parent_res = blob["model_config"].get("resolution")
    if parent_res and parent_res != cfg.data.resolution:
        raise ConfigError(f"data.resolution={cfg.data.resolution} differs from the parent model's resolution {parent_res}")
    return replace(cfg, model=replace(cfg.model, ar=ar)), blob["state_dict"]


def check_fits_cluster(cfg: VaepipeConfig) -> None:
    """Refuse a worker group larger than the whole cluster before any worker starts (unless the run
    waits for an autoscaler: ``dist.start_retries=-1``)."""
    import ray

    d, total = cfg.dist, ray.cluster_resources()
    if d.start_retries == -1:
        return
    fewest, which = (d.num_workers, "dist.num_workers") if d.min_workers is None else (d.min_workers, "dist.min_workers")
    for key, per_worker, name in (("CPU", d.cpus_per_worker, "dist.cpus_per_worker"), ("GPU", d.gpus_per_worker, "dist.gpus_per_worker")):
        need = fewest * per_worker
        if need > total.get(key, 0):
            raise ConfigError(f"{which}={fewest} x {name}={per_worker} needs {need:g} {key}s but the Ray "
                              f"cluster has {total.get(key, 0):g}: lower dist.num_workers (or set dist.start_retries=-1 "
                              "on an autoscaling cluster)")
    need, task = fewest * d.cpus_per_worker, cfg.train.val_cpus
    if cfg.train.off_loop and need + task > total.get("CPU", 0):  # Ray would wait for it forever
        raise ConfigError(f"train.val_cpus={task:g}: the validation task beside {which}={fewest} workers ({need:g} "
                          f"CPUs) needs {need + task:g} CPUs but the Ray cluster has {total.get('CPU', 0):g}: lower "
                          "train.val_cpus or the workers, or use train.validation=in_loop")


def _child_tags(parent_run_id: Optional[str], extra: Optional[dict] = None) -> dict:
    return {**({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}), **(extra or {})}


def init_ray(cfg: VaepipeConfig, spare_cpus: int = 0) -> None:
    """Connect to ``dist.address`` / RAY_ADDRESS, or start a local Ray sized to this machine.

    ``spare_cpus`` adds logical CPUs to a local Ray: Tune's trial drivers each hold a sliver
    of a CPU while they only wait on their trainers, and without the spare a machine's
    worth of Train workers could never be placed beside them.
    """
    import ray

    if ray.is_initialized():
        return
    address = cfg.dist.address or os.environ.get("RAY_ADDRESS")
    if is_redacted(address):  # from a saved config: the live address is the environment's
        address = os.environ.get("RAY_ADDRESS")
        if not address:
            raise ConfigError(f"dist.address={cfg.dist.address!r} was saved redacted: set RAY_ADDRESS or dist.address")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        from pipeline.ray_local import start_local_ray

        start_local_ray((os.cpu_count() or 1) + spare_cpus)


def _raise_if_unplaceable(exc: BaseException, cfg: VaepipeConfig) -> None:
    """Ray's worker-group start timeout, retried ``dist.start_retries`` times, as a message that says
    what was asked and what the cluster had free."""
    import ray
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    failure = getattr(exc, "controller_failure", None)
    if not isinstance(failure, WorkerGroupStartupTimeoutError):
        return
    d = cfg.dist
    raise RuntimeError(
        f"the {d.num_workers} training workers ({d.cpus_per_worker} CPU, {d.gpus_per_worker} GPU each) could not be "
        f"placed after {d.start_retries + 1} tries; the cluster has {ray.available_resources()} free of "
        f"{ray.cluster_resources()}: lower dist.num_workers, wait for other jobs, or raise dist.start_retries "
        "on an autoscaling cluster") from exc


def run_training(cfg: VaepipeConfig, resume: Optional[str] = None, parent_run_id: Optional[str] = None,
                 callbacks: tuple = (), run_tags: Optional[dict] = None,
                 mlflow_run_id: Optional[str] = None, credential_env: Sequence[str] = CREDENTIAL_ENV,
                 report_to_tune: bool = False) -> TrainResult:
    """Train ``cfg`` on Ray Train + DeepSpeed, tracked in MLflow; optionally resume a run.

    Everything that can be refused (data, resume target, parent model, cluster size) is checked
    before the MLflow run is opened and before any worker starts. ``parent_run_id`` makes the
    MLflow run a child (a sweep's trial); ``callbacks`` are Ray Train ``UserCallback``s (a sweep
    passes Tune's ``TuneReportCallback``); ``mlflow_run_id`` continues that run instead of the
    one the resumed checkpoint names (PBT segments); ``credential_env`` names the variables the
    workers get from this process (a sweep's trial adds the AWS ones Tune used to hand over).
    In local mode (``dist.num_workers=0``) the rank trains in this process and no Train callback
    runs: a sweep's trial sets ``report_to_tune`` instead, and each report goes to ``ray.tune.report``.
    """
    from pipeline import tracking

    t0 = time.perf_counter()
    cfg = replace(cfg, data=replace(cfg.data, path=_absolute(cfg.data.path)),
                  train=replace(cfg.train, storage_path=_absolute(cfg.train.storage_path)),
                  tracking=replace(cfg.tracking, artifact_location=_absolute(cfg.tracking.artifact_location)))
    cfg = without_missing_validation(cfg, preflight(cfg))
    uri = tracking.resolve_tracking_uri(cfg)
    ckpt_dir = find_checkpoint(resume, uri) if resume else None
    parent_state = None
    if cfg.model.ar.parent_uri:
        cfg, parent_state = attach_parent(cfg, uri)
    if cfg.dist.local and callbacks:
        raise ValueError("local mode (dist.num_workers=0) runs no Ray Train callbacks: pass report_to_tune for Tune")
    if cfg.dist.local:
        tracking.say("dist.num_workers=0: training in this process (local mode: one rank, no restarts)")
    else:
        # off the loop, a validation task runs beside the workers: a local Ray gets its CPUs on top
        init_ray(cfg, spare_cpus=math.ceil(cfg.train.val_cpus) if cfg.train.off_loop else 0)
        check_fits_cluster(cfg)
    run_id = _open_run(cfg, uri, ckpt_dir, mlflow_run_id, _child_tags(parent_run_id, run_tags))
    name = cfg.train.run_name or f"vaepipe-{time.strftime('%Y%m%d-%H%M%S')}-{run_id[:8]}"
    run_dir = str(child(location(cfg.train.storage_path), name))
    tracking.make_client(uri).set_tag(run_id, "vaepipe.run_dir", run_dir)
    loop_config = {
        "config": redact_config_dict(to_dict(cfg)), "run_id": run_id, "run_dir": run_dir,
        "env": WorkerEnv.capture(tracking_uri=uri, names=credential_env),  # live URI and credentials, never written anywhere
        # Train V2 dropped resume_from_checkpoint: the workers load this folder themselves
        "resume_from": str(ckpt_dir) if ckpt_dir else None,
        "parent_state": parent_state,
        "fault": {k: v for k, v in os.environ.items() if k.startswith("VAEPIPE_FAULT_")},
    }
    if cfg.dist.local:
        metrics, checkpoint = _fit_local(cfg, loop_config, uri, run_id, report_to_tune)
    else:
        metrics, checkpoint = _fit(build_trainer(cfg, loop_config, name, callbacks), cfg, uri, run_id)
    model_uri = _register(cfg, uri, run_id)
    return TrainResult(run_id=run_id, tracking_uri=uri, checkpoint_path=checkpoint, metrics=metrics, run_dir=run_dir,
                       model_uri=model_uri, wall_s=time.perf_counter() - t0)


def _open_run(cfg: VaepipeConfig, uri: str, ckpt_dir: Optional[Location], mlflow_run_id: Optional[str], tags: dict) -> str:
    """The MLflow run this training writes into: the resumed one, the given one, or a new one."""
    from pipeline import tracking

    if ckpt_dir is None:
        return mlflow_run_id or tracking.start_run(cfg, uri, tags)
    saved = read_state(ckpt_dir)
    run_id = mlflow_run_id or saved.get("mlflow_run_id") or tracking.start_run(cfg, uri, tags)
    tracking.make_client(uri).update_run(run_id, status="RUNNING")
    tracking.say(f"resuming from {ckpt_dir} (step {saved['train_state']['step']})")
    return run_id


_START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
_START_TIMEOUT_MARK = "VAEPIPE_SET_START_TIMEOUT"  # set beside it: the value is vaepipe's, not the user's
# a value set by vaepipe (here or in the process that started this one) is not the user's
_START_TIMEOUT_SET_BY_USER = _START_TIMEOUT_VAR in os.environ and _START_TIMEOUT_MARK not in os.environ


def worker_count(cfg: VaepipeConfig):
    """``num_workers``, or ``(min_workers, num_workers)`` for an elastic run."""
    d = cfg.dist
    return d.num_workers if d.min_workers is None else (d.min_workers, d.num_workers)


def build_trainer(cfg: VaepipeConfig, loop_config: dict, name: str, callbacks: tuple):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = ray_storage(cfg.train.storage_path)

    use_gpu = cfg.dist.gpus_per_worker > 0
    resources = {"CPU": cfg.dist.cpus_per_worker, **({"GPU": cfg.dist.gpus_per_worker} if use_gpu else {})}
    if not _START_TIMEOUT_SET_BY_USER:  # Ray Train reads it in the driver and hands it to its controller
        os.environ[_START_TIMEOUT_VAR] = str(cfg.dist.start_timeout_s)
        os.environ[_START_TIMEOUT_MARK] = "1"
    quiet_driver(cfg.tracking.verbose)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=worker_count(cfg), use_gpu=use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cfg.dist.resize_interval_s),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=cfg.dist.max_failures,
                                         max_preemption_failures=cfg.dist.max_preemption_failures,
                                         controller_failure_limit=cfg.dist.start_retries),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=[fail_once(), *callbacks],
            logging_config=train_logging(cfg.tracking.verbose),
        ),
        validation_config=checkpoint_validation.validation_config(cfg, loop_config),
    )


@contextlib.contextmanager
def _closing_run(cfg: VaepipeConfig, uri: str, run_id: str):
    """Close the MLflow run FINISHED or FAILED around a fit; a fit error becomes vaepipe's own where
    it has one (workers that cannot be placed, an error a restart would repeat)."""
    from pipeline import tracking

    try:
        yield
    except BaseException as exc:
        tracking.end_run(uri, run_id, "FAILED")
        _raise_if_unplaceable(exc, cfg)
        failure = not_retried(exc)
        if failure is not None:
            raise failure from None
        raise
    tracking.end_run(uri, run_id, "FINISHED")


def _fit(trainer, cfg: VaepipeConfig, uri: str, run_id: str) -> tuple[dict, Optional[str]]:
    """``trainer.fit()``; (last reported metrics, the last checkpoint's location)."""
    with _closing_run(cfg, uri, run_id):
        result = trainer.fit()
    ckpt = result.checkpoint
    return dict(result.metrics or {}), str(checkpoint_location(ckpt) or ckpt.path) if ckpt else None


def _fit_local(cfg: VaepipeConfig, loop_config: dict, uri: str, run_id: str,
               report_to_tune: bool) -> tuple[dict, Optional[str]]:
    """Local mode: the rank's loop in this process (``local_mode``), a ``ray.tune.report`` of each
    checkpoint's metrics when it is a sweep's trial; returns as ``_fit``."""
    from pipeline.train.local_mode import one_rank_group
    from pipeline.train.rank_context import LocalRank

    sink = None
    if report_to_tune:
        from ray import tune

        sink = tune.report
    validator = checkpoint_validation.validator(loop_config) if cfg.train.off_loop else None
    ctx = LocalRank(loop_config["run_dir"], cfg.train.keep_checkpoints, sink, validator)
    with _closing_run(cfg, uri, run_id), one_rank_group():
        train_loop_per_worker(loop_config, ctx)
    return ctx.metrics, str(ctx.checkpoint) if ctx.checkpoint else None


def _register(cfg: VaepipeConfig, uri: str, run_id: str) -> Optional[str]:
    """Register the run's logged model when ``tracking.register_name`` is set; returns the model URI."""
    from pipeline import tracking

    model_uri = tracking.make_client(uri).get_run(run_id).data.tags.get("vaepipe.model_uri")
    if cfg.tracking.register_name and model_uri:
        version = tracking.register_model(uri, run_id, cfg.tracking.register_name, cfg.tracking.register_alias)
        alias = f"@{cfg.tracking.register_alias}" if cfg.tracking.register_alias else f"/{version}"
        tracking.say(f"registered models:/{cfg.tracking.register_name}{alias} (version {version})")
    return model_uri

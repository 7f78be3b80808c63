"""MLflow, the only way vaepipe records anything.

The driver owns a run's life (create, params, resolved config, end status); rank 0 of the
workers logs metrics, images and the model into that run through ``RankZeroLogger``
(``pipeline.logger``: one ``log_batch`` per log window, queued while the server is away).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from pipeline.config import ConfigError, VaepipeConfig, flatten, to_yaml
from pipeline.credentials import move_userinfo_to_env
from pipeline.redact import is_redacted, redact_text

DEFAULT_DB = "mlruns.db"


def resolve_tracking_uri(cfg: VaepipeConfig) -> str:
    """Config > MLFLOW_TRACKING_URI > the embedded SQLite file in the working directory.

    Made absolute here, in the driver, because Ray workers do not share its cwd. An http(s)
    URI's ``user:password@`` moves into MLflow's basic-auth env vars (``credentials``), so
    the URI returned, which MLflow prints in its "View run" lines, holds no password. A
    config saved redacted (a checkpoint, a sweep state) takes its live URI from the env.
    """
    uri = cfg.tracking.tracking_uri
    if is_redacted(uri):
        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri or is_redacted(uri):
            raise ConfigError(f"tracking.tracking_uri={cfg.tracking.tracking_uri!r} was saved redacted: set MLFLOW_TRACKING_URI "
                              "to the live URI (credentials in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{(Path.cwd() / DEFAULT_DB).resolve()}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return move_userinfo_to_env(uri)


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def make_client(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client, name: str, artifact_location: str, uri: str) -> str:
    """Experiment id for ``name``, created on first use.

    With the embedded SQLite store artifacts go to ``artifact_location`` beside it; a
    tracking server chooses its own artifact store (e.g. S3), so none is imposed there.
    """
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local_store(uri):
        location = Path(artifact_location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(cfg: VaepipeConfig, uri: str, tags: Optional[dict] = None) -> str:
    """Create the run of a training job; log its params, resolved config and lineage (the shard
    set as its dataset input, config hash, code version: ``pipeline.lineage``). Returns run id."""
    from mlflow.entities import Param

    from pipeline.config import to_dict
    from pipeline.lineage import log_run_lineage

    client = make_client(uri)
    exp_id = ensure_experiment(client, cfg.tracking.experiment, cfg.tracking.artifact_location, uri)
    run = client.create_run(exp_id, run_name=cfg.tracking.run_name, tags={"vaepipe.model": cfg.model.name, **{k: redact_text(str(v)) for k, v in (tags or {}).items()}})
    run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, to_yaml(cfg), "config/resolved.yaml")
    log_run_lineage(client, run_id, cfg.data.path, "train", to_dict(cfg))
    return run_id


def say(message: str) -> None:
    """The one way vaepipe prints a progress line: prefixed, redacted, flushed.

    Written to the stream, not through ``print``: inside a Ray Train worker ``print`` is patched
    to go to Train's logger *and*, because Ray wraps the worker's stdout, to the stream as well,
    so every line reached the driver's console twice."""
    sys.stdout.write(f"[vaepipe] {redact_text(message)}\n")
    sys.stdout.flush()


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    make_client(uri).set_terminated(run_id, status=status)


def register_model(uri: str, run_id: str, name: str, alias: Optional[str] = None, artifact_path: str = "model",
                   best: Optional[str] = None, mode: str = "min", among: Optional[list[str]] = None) -> int:
    """Register a model that ``run_id`` logged under ``name``; point ``alias`` at it. Returns the version.

    Which model: the newest checkpoint's, or with ``best`` the checkpoint model with the best
    value (``mode`` min or max) of that validation metric, among the models of ``run_id`` or of
    the runs ``among`` (a sweep's trials). The version carries the lineage tags (data digest,
    config hash, code version) of the run that trained it, and a short model card naming the
    checkpoint's step and metrics as its description."""
    import mlflow

    from pipeline import logged_models
    from pipeline.lineage import VERSION_TAGS, model_card

    client = make_client(uri)
    run = client.get_run(run_id)  # raises with the id in the message if it does not exist
    models = logged_models.search(client, [run.info.experiment_id], among or [run_id])
    if best:
        where = f"run {run_id}" if not among else f"the {len(among)} runs of the sweep"
        model = logged_models.best(models, best, mode, where)
    else:
        model = logged_models.newest(models)
    if model is not None and model.source_run_id != run_id:
        run = client.get_run(model.source_run_id)
    source = f"models:/{model.model_id}" if model is not None else _logged_model_uri(run, artifact_path)
    mv = mlflow.register_model(source, name)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    client.set_model_version_tag(name, mv.version, "vaepipe.run_id", run.info.run_id)
    if model is not None:
        client.set_model_version_tag(name, mv.version, logged_models.STEP_TAG, str(logged_models.step_of(model)))
    for key in VERSION_TAGS:
        if key in run.data.tags:
            client.set_model_version_tag(name, mv.version, key, run.data.tags[key])
    client.update_model_version(name, mv.version, description=model_card(name, mv.version, run, model))
    return int(mv.version)


def _logged_model_uri(run, artifact_path: str) -> str:
    """The model URI a run tagged (runs older than one LoggedModel per checkpoint), or an error
    saying the run logged none."""
    tag = run.data.tags.get("vaepipe.model_uri")
    if tag:
        return tag
    raise ValueError(
        f"run {run.info.run_id} has no logged model at '{artifact_path}': was it trained with tracking.log_model=true and did it finish?"
    )

"""Which data and which code a run saw: the shard set as an MLflow dataset input, the config
hash, the code version, and the model card a registered version carries.

The data version is the manifest's content hash: sha256 of its canonical JSON (sorted keys).
The manifest lists every shard's sha256, so the hash changes when any shard changes. The two
fields that record *when* and *how fast* the set was written (``created``, ``last_run``) are
left out: re-sharding the same images into the same bytes is the same data.

MLflow stores a dataset digest in 36 characters (``MAX_DATASET_DIGEST_SIZE``), so the dataset
input's digest is the hash's first 36 hex digits (144 bits); the full hash travels in the
dataset's profile and in the ``vaepipe.data_sha256`` tags of the run and the model version.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any, Optional

from pipeline.redact import redact_config_dict, redact_text

DIGEST_LEN = 36  # mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE
_VOLATILE = ("created", "last_run")  # when the set was written, not what it holds
_NOT_MODEL = {"tracking": None, "tune": None, "train": ("storage_path", "run_name"), "dist": ("address",)}


def _canonical_sha256(d: Any) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_hash(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON, without the write-time fields."""
    return _canonical_sha256({k: v for k, v in manifest.items() if k not in _VOLATILE})


def dataset_digest(manifest: dict) -> str:
    """The manifest hash as MLflow's dataset digest (its first 36 hex digits)."""
    return manifest_hash(manifest)[:DIGEST_LEN]


def config_hash(config: dict) -> str:
    """sha256 of what decides the model (data, model, optim, schedule, train, dist), redacted;
    where it runs and is tracked (tracking, tune, storage paths, run names) is left out, so
    a sweep's trial and a plain run with the same values have the same hash."""
    kept = {}
    for section, values in redact_config_dict(config).items():
        drop = _NOT_MODEL.get(section, ())
        if drop is None:
            continue
        kept[section] = {k: v for k, v in values.items() if k not in drop} if isinstance(values, dict) else values
    return _canonical_sha256(kept)


def code_version() -> str:
    """``git:<commit>`` (``-dirty`` with uncommitted changes) of the checkout vaepipe runs from,
    else the installed package version."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty", "--abbrev=40"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"vaepipe=={version('vaepipe')}"
    except PackageNotFoundError:
        return "unknown"


def _source_type(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url and not url.startswith("file://") else "local"


def _schema(manifest: dict) -> str:
    """One row per sample: id, image, split, then each attribute and ground-truth factor."""
    from mlflow.types import ColSpec, Schema

    cols = [ColSpec("string", "__key__"), ColSpec("binary", manifest.get("image_format", "jpg")),
            ColSpec("string", "split")]
    cols += [ColSpec("integer", f"attrs.{a}") for a in manifest.get("attr_names", [])]
    cols += [ColSpec("double", f"factors.{f}") for f in manifest.get("factor_names", [])]
    return json.dumps({"mlflow_colspec": Schema(cols).to_dict()})


def _profile(manifest: dict) -> str:
    splits = manifest.get("splits", {})
    return json.dumps({
        "manifest_sha256": manifest_hash(manifest),
        "resolution": manifest.get("resolution"), "image_format": manifest.get("image_format"),
        "num_samples": {s: v.get("num_samples", 0) for s, v in splits.items()},
        "num_shards": {s: len(v.get("shards", [])) for s, v in splits.items()},
        "attr_names": manifest.get("attr_names", []), "factor_names": manifest.get("factor_names", []),
        "origin": redact_text(str(manifest.get("source", "?"))),
    })


def dataset_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1] or "shards"


def dataset_input(manifest: dict, url: str, context: str):
    """The shard set at ``url`` as an MLflow ``DatasetInput`` (digest = manifest hash), tagged
    with its ``mlflow.data.context`` (train, valid, test)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=dataset_name(url), digest=dataset_digest(manifest), source_type=_source_type(url),
                      source=json.dumps({"uri": redact_text(url)}), schema=_schema(manifest), profile=_profile(manifest))
    return DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])


def lineage_tags(manifest: dict, config: Optional[dict] = None) -> dict[str, str]:
    """Run tags naming the data, the config and the code (copied onto a registered version)."""
    tags = {"vaepipe.data_sha256": manifest_hash(manifest), "vaepipe.data_digest": dataset_digest(manifest),
            "vaepipe.code_version": code_version()}
    if config is not None:
        tags["vaepipe.config_hash"] = config_hash(config)
    # what the MLflow UI shows as the run's source and creator (a client-created run has neither)
    tags.update({"mlflow.source.name": "vaepipe", "mlflow.source.type": "JOB", "mlflow.user": _user()})
    if tags["vaepipe.code_version"].startswith("git:"):
        tags["mlflow.source.git.commit"] = tags["vaepipe.code_version"].removeprefix("git:").removesuffix("-dirty")
    return tags


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def log_run_lineage(client, run_id: str, data_url: str, context: str, config: Optional[dict] = None) -> dict:
    """Log the shard set at ``data_url`` as the run's dataset input and tag the run; returns the manifest."""
    from pipeline.data.shards import read_manifest

    manifest = read_manifest(data_url)
    client.log_inputs(run_id, datasets=[dataset_input(manifest, data_url, context)])
    for key, value in lineage_tags(manifest, config).items():
        client.set_tag(run_id, key, value)
    return manifest


VERSION_TAGS = ("vaepipe.data_digest", "vaepipe.data_sha256", "vaepipe.config_hash", "vaepipe.code_version")
CARD_METRICS = ("val_neg_elbo", "val_neg_objective", "val_code_nll", "val_loss", "val_active_units", "loss",
                "images_per_sec")


def model_card(name: str, version: int | str, run, model=None) -> str:
    """A short Markdown model card for a registered version, from the run that trained it and the
    checkpoint's LoggedModel ``model`` (its step and linked metrics) where there is one."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    inputs = getattr(getattr(run, "inputs", None), "dataset_inputs", None) or []
    data = inputs[0].dataset if inputs else None
    profile = json.loads(data.profile) if data is not None and data.profile else {}
    source = json.loads(data.source).get("uri", "?") if data is not None else params.get("data.path", "?")
    family = f"{params.get('model.name', tags.get('vaepipe.model', '?'))} ({params.get('model.flavor', 'default')} flavor)"
    lines = [f"### {name} v{version}", "",
             f"**Family:** {family}, latent_dim {params.get('model.latent_dim', '?')}, "
             f"likelihood {params.get('model.likelihood', '?')}, beta {params.get('model.beta', '?')}", "",
             f"**Data:** `{redact_text(source)}` (digest `{tags.get('vaepipe.data_digest', '?')}`), "
             f"{profile.get('resolution', params.get('data.resolution', '?'))} px, "
             + ", ".join(f"{s} {n}" for s, n in profile.get("num_samples", {}).items()), "",
             f"**Weights:** {tags.get('vaepipe.weights', 'the trained weights at the last step')}", "",
             *_checkpoint_lines(model),
             "**Metrics (last logged):** " + (", ".join(f"{k} {metrics[k]:.4g}" for k in CARD_METRICS if k in metrics) or "-"),
             "", f"**Trained by run** `{run.info.run_id}`; config hash `{tags.get('vaepipe.config_hash', '?')[:12]}`, "
             f"code `{tags.get('vaepipe.code_version', '?')}`", "",
             "**Load:** `mlflow.pyfunc.load_model(\"models:/" + f"{name}/{version}\")`, then "
             "`predict(x)` reconstructs; `params={\"method\": \"encode\"|\"decode\"|\"sample\"}`; "
             f"or `vaepipe sample --model models:/{name}/{version}`"]
    return "\n".join(lines)


def _checkpoint_lines(model) -> list[str]:
    """The card's line on the checkpoint a version was registered from (none for older runs)."""
    from pipeline.logged_models import metric_of, step_of

    if model is None:
        return []
    keys = sorted({m.key for m in model.metrics or [] if m.key.startswith("val_")})
    shown = ", ".join(f"{k} {metric_of(model, k):.4g}" for k in keys) or "none linked"
    step = step_of(model)
    return [f"**Checkpoint:** step {step if step >= 0 else '?'}, logged model `{model.model_id}`; "
            f"its validation metrics: {shown}", ""]

"""A run's MLflow LoggedModels, one per checkpoint: find the newest or the best, keep a few.

Every checkpoint of a run logs its weights as a pyfunc (``train.export``) tagged with its step;
MLflow links the run's metrics of that step to it (the shard set is in its params), so
``search_logged_models`` and ``best`` can order them. Each model is a full copy of the weights: ``prune``
keeps the newest N, the best K and every registered one, and deletes the rest with their files.
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional

STEP_TAG = "vaepipe.step"


def search(client, experiment_ids: list[str], run_ids: Iterable[str]) -> list:
    """The live (not deleted) LoggedModels that ``run_ids`` logged, every page of each search."""
    found = []
    for run_id in dict.fromkeys(run_ids):
        token = None
        while True:
            page = client.search_logged_models(experiment_ids, filter_string=f"source_run_id = '{run_id}'",
                                               max_results=100, page_token=token)
            found += list(page)
            token = page.token
            if not token:
                break
    return found


def step_of(model) -> int:
    return int(model.tags.get(STEP_TAG, -1))


def at_step(client, experiment_id: str, run_id: str, step: int):
    """The live model ``run_id`` logged at ``step``, or None."""
    found = [m for m in search(client, [experiment_id], [run_id]) if step_of(m) == step]
    return found[0] if found else None


def metric_of(model, key: str) -> Optional[float]:
    """The value of ``key`` linked to ``model`` (the latest step's, if linked more than once)."""
    values = [(m.step, m.timestamp, m.value) for m in (model.metrics or []) if m.key == key]
    return max(values)[2] if values else None


def newest(models: list):
    return max(models, key=step_of) if models else None


def ranked(models: list, metric: str, mode: str) -> list:
    """``models`` that carry ``metric``, best first (ties: the later step first)."""
    scored = [(metric_of(m, metric), step_of(m), m) for m in models]
    scored = [s for s in scored if s[0] is not None]
    scored.sort(key=lambda s: (s[0] if mode == "min" else -s[0], -s[1]))
    return [m for _, _, m in scored]


def best(models: list, metric: str, mode: str, where: str):
    """The best of ``models`` under ``metric``, or an error naming what the models do carry."""
    order = ranked(models, metric, mode)
    if order:
        return order[0]
    carried = sorted({m.key for model in models for m in (model.metrics or [])})
    raise ValueError(f"{where}: no logged model carries metric {metric!r} "
                     f"({len(models)} models; their metrics: {', '.join(carried) or 'none'})")


def to_keep(models: list, keep_last: int, keep_best: int, metric: Optional[str], mode: str,
            registered: set[str]) -> set[str]:
    """Model ids retention keeps: the newest ``keep_last``, the best ``keep_best``, and the registered."""
    by_step = sorted(models, key=step_of, reverse=True)
    keep = {m.model_id for m in by_step[:keep_last]} | {m.model_id for m in models if m.model_id in registered}
    if metric and keep_best:
        keep |= {m.model_id for m in ranked(models, metric, mode)[:keep_best]}
    return keep


def registered_ids(client, run_id: str) -> set[str]:
    return {v.model_id for v in client.search_model_versions(f"run_id = '{run_id}'") if getattr(v, "model_id", None)}


def prune(client, experiment_id: str, run_id: str, keep_last: int, keep_best: int,
          metric: Optional[str], mode: str) -> list[str]:
    """Delete the run's models that retention does not keep (``keep_last`` 0: none); their ids."""
    if keep_last <= 0:
        return []
    models = search(client, [experiment_id], [run_id])
    keep = to_keep(models, keep_last, keep_best, metric, mode, registered_ids(client, run_id))
    dropped = [m for m in models if m.model_id not in keep]
    for model in dropped:
        delete(client, model)
    return [m.model_id for m in dropped]


def delete(client, model) -> None:
    """Mark the model deleted, then remove its files (where the artifact store allows it)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    client.delete_logged_model(model.model_id)
    try:
        get_artifact_repository(model.artifact_location).delete_artifacts()
    except Exception as exc:  # a store without deletes: the model is gone from searches, its files stay
        warnings.warn(f"logged model {model.model_id} deleted, but its files at {model.artifact_location} "
                      f"were not ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)

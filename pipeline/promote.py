"""Metric-gated promotion: alias ``champion`` moves to the ``challenger`` version only when the
challenger wins on the configured metrics, both scored on the same data with the same seeds.

A challenger wins when it improves the first metric by more than its margin and is not
worse than the champion by more than the margin on any other metric. Every decision is
logged as an MLflow run (experiment ``vaepipe-promotions``) with tag ``vaepipe.decision``:
a first promotion (no champion yet) scores the challenger and logs its metrics too.

``nll`` is only a metric for models whose likelihood is a probability of the stored data
(:func:`pipeline.evaluate.likelihood.likelihood_is_density`); ``neg_iwae_nats`` is the same
importance-weighted bound under its own name and works for every model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.evaluate.likelihood import IWAE_METRIC, likelihood_is_density
from pipeline.evaluate.runner import EvalSpec, data_config, evaluate

# metric name -> (result key, higher is better)
DIRECTIONS = {
    "nll": ("nll", False), IWAE_METRIC: (IWAE_METRIC, False), "elbo": ("elbo", True), "fid": ("fid", False),
    "au": ("active_units_cov", True), "mig": ("mig", True), "sap": ("sap", True),
}
NO_CHAMPION = "promoted: no champion yet"
ALREADY_CHAMPION = "kept: the challenger is already the champion"


@dataclass
class Comparison:
    metric: str
    champion: float
    challenger: float
    improvement: float  # positive = challenger better
    margin: float
    ok: bool


def compare(champion: dict, challenger: dict, metrics: list[str], margins: list[float]) -> tuple[bool, list[Comparison]]:
    rows = []
    for i, (name, margin) in enumerate(zip(metrics, margins)):
        key, higher = DIRECTIONS[name]
        a, b = champion.get(key), challenger.get(key)
        if a is None or b is None:
            raise ValueError(f"metric {name!r} could not be computed for both models (champion={a}, challenger={b})")
        improvement = (b - a) if higher else (a - b)
        ok = improvement > margin if i == 0 else improvement >= -margin
        rows.append(Comparison(name, float(a), float(b), float(improvement), margin, ok))
    return all(r.ok for r in rows), rows


def check_metrics_defined(metrics: list[str], blobs: dict[str, dict], name: str) -> None:
    """Refuse ``nll`` for a model whose likelihood is not a probability of the stored data."""
    if "nll" not in metrics:
        return
    for alias, blob in blobs.items():
        ok, reason = likelihood_is_density(blob["model_config"], data_config(blob))
        if not ok:
            raise ValueError(f"promotion metric 'nll' is not defined for models:/{name}@{alias} ({reason}); "
                             f"use --metrics {IWAE_METRIC} (the same importance-weighted bound, in nats) instead")


def check_gate_before_sweep(cfg, metrics: list[str]) -> None:
    """``tune --promote``: refuse a gate that cannot be scored before any trial runs."""
    from pipeline.config import to_dict

    bad = [m for m in metrics if m not in DIRECTIONS]
    if bad:
        raise ValueError(f"promotion metric(s) {bad} unknown; choose from {sorted(DIRECTIONS)}")
    plain = to_dict(cfg)
    ok, reason = likelihood_is_density(plain["model"], plain["data"])
    if "nll" in metrics and not ok:
        raise ValueError(f"promotion metric 'nll' is not defined for this sweep's models ({reason}); "
                         f"use --metrics {IWAE_METRIC} (the same importance-weighted bound, in nats) instead")


def _is_missing_alias(err: Exception) -> bool:
    """MLflow's answer for an alias that is not set: INVALID_PARAMETER_VALUE from the SQL store
    ('Registered model alias champion not found.'), RESOURCE_DOES_NOT_EXIST from some servers."""
    from mlflow.exceptions import MlflowException

    text = str(err).lower()
    return (isinstance(err, MlflowException)
            and err.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
            and "alias" in text and "not found" in text)


def current_champion(client, name: str):
    """The champion version, or None when the alias is not set; any other error propagates."""
    try:
        return client.get_model_version_by_alias(name, "champion")
    except Exception as err:
        if _is_missing_alias(err):
            return None
        raise


@dataclass
class DecisionContext:
    """Where a decision is logged and what it is linked to."""

    tracking_uri: str
    experiment: str
    data_url: str
    split: str
    links: dict  # extra tags, e.g. the sweep that produced the challenger


def _log_decision(client, ctx: DecisionContext, name: str, challenger, champion,
                  decision: str, scores: dict[str, dict], rows: list[Comparison]) -> str:
    from pipeline.evaluate.job import scalar_metrics
    from pipeline.lineage import log_run_lineage
    from pipeline.tracking import ensure_experiment

    exp_id = ensure_experiment(client, ctx.experiment, "mlartifacts", ctx.tracking_uri)
    run = client.create_run(exp_id, run_name=f"promote-{name}-v{challenger.version}", tags={
        "vaepipe.model_name": name, "vaepipe.challenger_version": str(challenger.version),
        "vaepipe.champion_version": str(champion.version) if champion is not None else "none",
        "vaepipe.decision": decision, **ctx.links})
    run_id = run.info.run_id
    log_run_lineage(client, run_id, ctx.data_url, ctx.split)  # the data both models were scored on
    for alias, result in scores.items():
        for key, value in scalar_metrics(result).items():
            client.log_metric(run_id, f"{alias}/{key}", value)
    if rows:
        table = "metric,champion,challenger,improvement,margin,ok\n" + "".join(
            f"{r.metric},{r.champion},{r.challenger},{r.improvement},{r.margin},{r.ok}\n" for r in rows)
        client.log_text(run_id, table, "promotion/comparison.csv")
    client.set_terminated(run_id)
    return run_id


def promote(name: str, data_url: str, spec: EvalSpec, margins: list[float], tracking_uri: str,
            workers: int = 1, experiment: str = "vaepipe-promotions",
            links: Optional[dict] = None) -> tuple[bool, list[Comparison], Optional[int]]:
    """Evaluate champion and challenger of ``name``; move ``champion`` when the challenger wins.

    ``links``: tags put on the decision run (``vaepipe.sweep_run_id`` for ``tune --promote``)."""
    from pipeline.serving import load_logged_weights
    from pipeline.tracking import make_client

    bad = [m for m in spec.metrics if m not in DIRECTIONS]
    if bad:
        raise ValueError(f"promotion metric(s) {bad} unknown; choose from {sorted(DIRECTIONS)}")
    if len(margins) not in (1, len(spec.metrics)):
        raise ValueError(f"--margins has {len(margins)} values for {len(spec.metrics)} metrics: give one or one per metric")
    margins = margins * len(spec.metrics) if len(margins) == 1 else margins
    ctx = DecisionContext(tracking_uri, experiment, data_url, spec.split, dict(links or {}))
    client = make_client(tracking_uri)
    challenger = client.get_model_version_by_alias(name, "challenger")
    champion = current_champion(client, name)
    if champion is not None and champion.version == challenger.version:
        _log_decision(client, ctx, name, challenger, champion, ALREADY_CHAMPION, {}, [])
        return True, [], int(challenger.version)
    aliases = ("challenger",) if champion is None else ("champion", "challenger")
    blobs = {alias: load_logged_weights(f"models:/{name}@{alias}") for alias in aliases}
    check_metrics_defined(spec.metrics, blobs, name)
    scores = {alias: evaluate(blob, data_url, spec, workers) for alias, blob in blobs.items()}
    if champion is None:
        _log_decision(client, ctx, name, challenger, None, NO_CHAMPION, scores, [])
        client.set_model_version_tag(name, challenger.version, "vaepipe.promotion", NO_CHAMPION)
        client.set_registered_model_alias(name, "champion", challenger.version)
        return True, [], int(challenger.version)
    wins, rows = compare(scores["champion"], scores["challenger"], spec.metrics, margins)
    decision = "promoted" if wins else "refused"
    _log_decision(client, ctx, name, challenger, champion, decision, scores, rows)
    client.set_model_version_tag(name, challenger.version, "vaepipe.promotion", decision)
    if wins:
        client.set_registered_model_alias(name, "champion", challenger.version)
    return wins, rows, int(challenger.version) if wins else int(champion.version)


def decision_run(client, links: dict, experiment: str = "vaepipe-promotions"):
    """The newest decision run carrying ``links`` as tags, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in links.items())
    runs = client.search_runs([exp.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def promote_sweep(summary: dict, spec: EvalSpec, margins: list[float], tracking_uri: str,
                  workers: int = 1) -> tuple[bool, list[Comparison], Optional[int], Optional[str]]:
    """``tune --promote``: gate the challenger a sweep just registered against the champion on the
    sweep's shard set, exactly as ``promote`` does; link sweep and decision both ways.

    Returns (wins, rows, champion version after, decision run id)."""
    from pipeline.tracking import make_client

    name, parent = summary["registered_name"], summary["parent_run_id"]
    if not name:
        raise ValueError(f"sweep {parent} registered no challenger (no trial finished with a model): nothing to promote")
    links = {"vaepipe.sweep_run_id": parent, "vaepipe.best_run_id": str(summary["best"]["run_id"])}
    wins, rows, version = promote(name, summary["data_path"], spec, margins, tracking_uri, workers, links=links)
    client = make_client(tracking_uri)
    run = decision_run(client, links)
    tags = {"vaepipe.promotion.name": name, "vaepipe.promotion.challenger_version": str(summary["registered_version"]),
            "vaepipe.promotion.champion_version": str(version),
            "vaepipe.promotion.decision": run.data.tags["vaepipe.decision"] if run else ("promoted" if wins else "refused"),
            "vaepipe.promotion.run_id": run.info.run_id if run else "none"}
    for key, value in tags.items():
        client.set_tag(parent, key, value)
    return wins, rows, version, run.info.run_id if run else None

"""Metric-gated promotion: alias ``champion`` moves to the ``challenger`` version only when the
challenger wins on the configured metrics, both scored on the same data with the same seeds.

A challenger wins when it improves the first metric by more than its margin and is not
worse than the champion by more than the margin on any other metric. The comparison table
and the decision are logged as an MLflow run either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pipeline.evaluate.runner import EvalSpec, evaluate

# metric name -> (result key, higher is better)
DIRECTIONS = {
    "nll": ("nll", False), "elbo": ("elbo", True), "fid": ("fid", False),
    "au": ("active_units_cov", True), "mig": ("mig", True), "sap": ("sap", True),
}


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


def promote(name: str, data_url: str, spec: EvalSpec, margins: list[float], tracking_uri: str,
            workers: int = 1, experiment: str = "vaepipe-promotions") -> tuple[bool, list[Comparison], Optional[int]]:
    """Evaluate champion and challenger of ``name``; move ``champion`` when the challenger wins."""
    from pipeline.serving import load_logged_weights
    from pipeline.tracking import ensure_experiment, make_client

    bad = [m for m in spec.metrics if m not in DIRECTIONS]
    if bad:
        raise ValueError(f"promotion metric(s) {bad} unknown; choose from {sorted(DIRECTIONS)}")
    if len(margins) not in (1, len(spec.metrics)):
        raise ValueError(f"--margins has {len(margins)} values for {len(spec.metrics)} metrics: give one or one per metric")
    margins = margins * len(spec.metrics) if len(margins) == 1 else margins
    client = make_client(tracking_uri)
    challenger = client.get_model_version_by_alias(name, "challenger")
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except Exception:
        champion = None
    if champion is None or champion.version == challenger.version:
        client.set_registered_model_alias(name, "champion", challenger.version)
        return True, [], int(challenger.version)
    scores = {alias: evaluate(load_logged_weights(f"models:/{name}@{alias}"), data_url, spec, workers)
              for alias in ("champion", "challenger")}
    wins, rows = compare(scores["champion"], scores["challenger"], spec.metrics, margins)
    exp_id = ensure_experiment(client, experiment, "mlartifacts", tracking_uri)
    run = client.create_run(exp_id, run_name=f"promote-{name}-v{challenger.version}", tags={
        "vaepipe.model_name": name, "vaepipe.champion_version": str(champion.version),
        "vaepipe.challenger_version": str(challenger.version), "vaepipe.decision": "promoted" if wins else "refused"})
    table = "metric,champion,challenger,improvement,margin,ok\n" + "".join(
        f"{r.metric},{r.champion},{r.challenger},{r.improvement},{r.margin},{r.ok}\n" for r in rows)
    client.log_text(run.info.run_id, table, "promotion/comparison.csv")
    client.set_terminated(run.info.run_id)
    client.set_model_version_tag(name, challenger.version, "vaepipe.promotion", "promoted" if wins else "refused")
    if wins:
        client.set_registered_model_alias(name, "champion", challenger.version)
    return wins, rows, int(challenger.version) if wins else int(champion.version)

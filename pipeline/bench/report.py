"""What every benchmark does with its figures: a rich table, a JSON file, a PNG chart, an MLflow run.

A benchmark returns a :class:`BenchReport`: its name, the table rows (the same dicts that go
into the JSON), the scalar results worth comparing across runs (logged as MLflow metrics)
and how to draw its chart. ``publish`` does the rest, so the four outputs never disagree.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.table import Table

BENCH_EXPERIMENT = "vaepipe-bench"


@dataclass
class BenchReport:
    name: str  # "overhead", "data", ...: the MLflow run name and the file stem
    title: str
    rows: list[dict]  # one per table line; keys are the columns, in order
    summary: dict  # scalars logged as MLflow metrics (and printed under the table)
    params: dict = field(default_factory=dict)  # what was measured: model, resolution, batch, ...
    chart: Optional[Callable] = None  # draws on a matplotlib Axes: chart(ax, report)
    notes: list[str] = field(default_factory=list)  # assumptions printed under the table


def spread(values: list[float]) -> dict:
    """Median, min, max and the relative half-range of repeated measurements."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values),
            "spread_pct": 100.0 * (max(values) - min(values)) / 2 / med if med else 0.0, "n": len(values)}


def render_table(report: BenchReport) -> Table:
    table = Table(title=report.title)
    columns = list(report.rows[0]) if report.rows else []
    for col in columns:
        table.add_column(col, justify="left" if col == columns[0] else "right")
    for row in report.rows:
        table.add_row(*(_fmt(row.get(c)) for c in columns))
    return table


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.1f}"
    return "-" if v is None else str(v)


def write_chart(report: BenchReport, path: Path) -> Optional[Path]:
    if report.chart is None:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    ax = fig.add_subplot()
    report.chart(ax, report)
    ax.set_title(report.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def to_json(report: BenchReport) -> dict:
    return {"name": report.name, "title": report.title, "params": report.params, "summary": report.summary,
            "rows": report.rows, "notes": report.notes}


def log_to_mlflow(report: BenchReport, files: list[Path], tracking_uri: str) -> str:
    """One run per benchmark invocation in the ``vaepipe-bench`` experiment; returns its id."""
    from mlflow.entities import Metric, Param

    from pipeline.tracking import ensure_experiment, make_client

    client = make_client(tracking_uri)
    exp = ensure_experiment(client, BENCH_EXPERIMENT, "mlartifacts", tracking_uri)
    run = client.create_run(exp, run_name=f"bench-{report.name}", tags={"vaepipe.bench": report.name})
    rid = run.info.run_id
    metrics = [Metric(k, float(v), 0, 0) for k, v in report.summary.items() if isinstance(v, (int, float))]
    params = [Param(k, str(v)[:6000]) for k, v in report.params.items()]
    for i in range(0, max(len(metrics), len(params)), 100):
        client.log_batch(rid, metrics=metrics[i:i + 100], params=params[i:i + 100])
    for f in files:
        client.log_artifact(rid, str(f))
    client.set_terminated(rid)
    return rid


def publish(report: BenchReport, out_dir: Path, tracking_uri: Optional[str], console: Console) -> dict:
    """Print the table, write ``<name>.json`` and ``<name>.png`` under ``out_dir``, log to MLflow."""
    console.print(render_table(report))
    for k, v in report.summary.items():
        console.print(f"  {k}: {_fmt(v)}")
    for note in report.notes:
        console.print(f"  [dim]{note}[/]")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{report.name}.json"
    json_path.write_text(json.dumps(to_json(report), indent=2, default=str))
    files = [json_path] + [p for p in [write_chart(report, out_dir / f"{report.name}.png")] if p]
    where = {"json": str(json_path), "png": str(files[1]) if len(files) > 1 else None}
    if tracking_uri:
        where["mlflow_run_id"] = log_to_mlflow(report, files, tracking_uri)
    console.print(f"  wrote {', '.join(str(f) for f in files)}" + (f"; MLflow run {where['mlflow_run_id']}" if tracking_uri else ""))
    return where

"""``vaepipe bench checkpoint``: what a checkpoint costs the training, uploaded sync or async.

For each storage given (a local folder, an ``s3://`` prefix), the job runs ``steps`` steps three
ways, alternating over the repetitions: with no checkpoint but the last, and with a checkpoint
every ``every`` steps uploaded synchronously and asynchronously (``train.checkpoint_upload``).
A step's time is read from rank 0's metric timestamps: from the first log window's end to the
last one's, so start-up and the final checkpoint are outside the span and every checkpoint in it
is a periodic one. A checkpoint's cost to the training is then
(mean step with checkpoints - mean step without) x steps in the span / checkpoints in the span.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from pipeline.bench.overhead import bench_config, resolved_precision
from pipeline.bench.report import BenchReport, spread
from pipeline.config import VaepipeConfig
from pipeline.train.run_storage import is_remote

MODES = ("none", "sync", "async")


def run_config(cfg: VaepipeConfig, steps: int, every: int, storage: str, mode: str) -> VaepipeConfig:
    base = bench_config(cfg, steps, system_metrics=False)
    return replace(base, train=replace(base.train, log_every=every, storage_path=storage,
                                       checkpoint_every=steps if mode == "none" else every,
                                       checkpoint_upload="sync" if mode == "none" else mode))


def timed_run(cfg: VaepipeConfig) -> dict:
    """One run: its mean ms per step between the first and the last log window, and its wall time."""
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    result = run_training(cfg)
    history = sorted(make_client(result.tracking_uri).get_metric_history(result.run_id, "loss"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    return {"ms_per_step": (last.timestamp - first.timestamp) / (last.step - first.step),
            "span": (first.step, last.step), "wall_s": result.wall_s}


def checkpoint_bench(cfg: VaepipeConfig, storages: list[str], steps: int, every: int, repeats: int) -> BenchReport:
    if steps < 3 * every:
        raise ValueError(f"--steps {steps} needs at least 3 x --every {every}: the span holds the checkpoints measured")
    cfg = resolved_precision(cfg)
    runs = {(s, m): [] for s in storages for m in MODES}
    for _ in range(repeats):
        for storage in storages:
            for mode in MODES:
                runs[(storage, mode)].append(timed_run(run_config(cfg, steps, every, storage, mode)))
    rows, summary = [], {}
    for storage in storages:
        rows += _rows(storage, runs, every, summary)
    return BenchReport(
        name="checkpoint", title=f"Step time around checkpoints, every {every} steps ({steps} steps, {repeats} repeats)",
        rows=rows, summary=summary,
        params={"model": cfg.model.name, "flavor": cfg.model.flavor, "resolution": cfg.data.resolution,
                "workers": cfg.dist.num_workers, "zero_stage": cfg.dist.zero_stage, "precision": cfg.train.precision,
                "steps": steps, "every": every, "repeats": repeats},
        notes=["ms/step: rank 0's mean from its first to its last log window (medians over repeats);",
               "per checkpoint: (ms/step - ms/step without) x steps in that span / checkpoints in it."])


def _rows(storage: str, runs: dict, every: int, summary: dict) -> list[dict]:
    tag = "s3" if is_remote(storage) else "local"
    none = spread([r["ms_per_step"] for r in runs[(storage, "none")]])["median"]
    rows = []
    for mode in MODES:
        per = runs[(storage, mode)]
        ms = spread([r["ms_per_step"] for r in per])
        first, last = per[0]["span"]
        # a checkpoint at the first window's step comes after its log line; the last one's, after the span
        n = 0 if mode == "none" else sum(1 for s in range(first, last) if s % every == 0)
        cost = (ms["median"] - none) * (last - first) / n if n else 0.0
        rows.append({"storage": tag, "upload": mode, "ms/step": ms["median"], "spread %": ms["spread_pct"],
                     "checkpoints in span": n, "ms per checkpoint": cost,
                     "wall s": statistics.median(r["wall_s"] for r in per)})
        summary[f"{tag}_{mode}_ms_per_step"] = ms["median"]
        if n:
            summary[f"{tag}_{mode}_ms_per_checkpoint"] = cost
    return rows

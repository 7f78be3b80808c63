"""``vaepipe bench validation``: what validating each checkpoint costs the training, in the loop
or off it (``train.validation``).

The job runs ``steps`` steps three ways, alternating over the repetitions, with the same checkpoint
every ``every`` steps: no validation; ``in_loop`` (the ranks validate ``data.val_batches`` batches
each at every checkpoint); ``off_loop`` (a Ray Train validation task scores each checkpoint on as
many samples, ``val_batches x batch size x ranks``, while the ranks train on). A step's time is rank
0's, from the first log window's end to the last one's (``bench checkpoint``'s ``timed_run``), so
start-up and the final checkpoint are outside it; the wall time includes the wait for the last
validation task. Images/s is the global batch over the step time.
"""

from __future__ import annotations

import math
from dataclasses import replace

from pipeline.bench.checkpoint import timed_run
from pipeline.bench.overhead import bench_config, resolved_precision
from pipeline.bench.report import BenchReport, spread
from pipeline.config import VaepipeConfig

MODES = ("none", "in_loop", "off_loop")


def run_config(cfg: VaepipeConfig, steps: int, every: int, val_batches: int, mode: str) -> VaepipeConfig:
    base = bench_config(cfg, steps, system_metrics=False)
    samples = val_batches * cfg.data.batch_size * max(cfg.dist.num_workers, 1)
    return replace(base,
                   train=replace(base.train, log_every=every, checkpoint_every=every, val_every=every,
                                 validation="off_loop" if mode == "off_loop" else "in_loop", val_max_samples=samples),
                   data=replace(base.data, val_batches=val_batches if mode == "in_loop" else 0))


def validation_bench(cfg: VaepipeConfig, steps: int, every: int, val_batches: int, repeats: int) -> BenchReport:
    if steps < 3 * every:
        raise ValueError(f"--steps {steps} needs at least 3 x --every {every}: the span holds the checkpoints measured")
    if val_batches < 1:
        raise ValueError(f"--val-batches {val_batches}: validate at least one batch per rank")
    cfg = resolved_precision(cfg)
    if cfg.dist.num_workers:  # a local Ray with the validation task's CPUs on top, as an off-loop run starts one
        from pipeline.train.trainer import init_ray

        init_ray(cfg, spare_cpus=math.ceil(cfg.train.val_cpus))
    runs = {m: [] for m in MODES}
    for _ in range(repeats):
        for mode in MODES:
            runs[mode].append(timed_run(run_config(cfg, steps, every, val_batches, mode)))
    global_batch = cfg.data.batch_size * cfg.train.grad_accum_steps * max(cfg.dist.num_workers, 1)
    rows, summary = _rows(runs, global_batch)
    return BenchReport(
        name="validation", title=f"Training throughput with checkpoint validation in and off the loop "
                                 f"(every {every} steps, {steps} steps, {repeats} repeats)",
        rows=rows, summary=summary,
        params={"model": cfg.model.name, "flavor": cfg.model.flavor, "resolution": cfg.data.resolution,
                "workers": cfg.dist.num_workers, "zero_stage": cfg.dist.zero_stage, "precision": cfg.train.precision,
                "steps": steps, "every": every, "val_batches": val_batches, "val_cpus": cfg.train.val_cpus,
                "repeats": repeats},
        notes=["ms/step: rank 0's mean from its first to its last log window (medians over repeats);",
               "images/s = global batch / ms per step; wall s includes start-up and the last validation task."])


def _rows(runs: dict, global_batch: int) -> tuple[list[dict], dict]:
    rows, summary = [], {}
    for mode in MODES:
        ms = spread([r["ms_per_step"] for r in runs[mode]])
        rate = 1000.0 * global_batch / ms["median"]
        wall = spread([r["wall_s"] for r in runs[mode]])["median"]
        rows.append({"validation": mode, "ms/step": ms["median"], "spread %": ms["spread_pct"], "images/s": rate,
                     "wall s": wall})
        summary[f"{mode}_images_per_sec"] = rate
        summary[f"{mode}_wall_s"] = wall
    for mode in ("in_loop", "off_loop"):
        summary[f"{mode}_vs_none"] = summary[f"{mode}_images_per_sec"] / summary["none_images_per_sec"]
    summary["off_loop_vs_in_loop"] = summary["off_loop_images_per_sec"] / summary["in_loop_images_per_sec"]
    return rows, summary

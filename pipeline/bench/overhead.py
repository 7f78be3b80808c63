"""``vaepipe bench overhead``: a real ``vaepipe train`` run against the bare loop, alternating.

Each repetition runs the bare single-process loop (``baseline``), the loop's engine and step on
the job's ranks without Ray (``engine_ranks``: where the gap between the other two comes from),
and then the pipeline (Ray Train workers, DeepSpeed, streaming from shards, MLflow) on the same
model, global batch, precision and total threads; with ``system_metrics="both"`` the pipeline runs once with
MLflow's system metrics off and once on. Medians and spreads over the repetitions, the
ratios of the medians, and where a step's time goes on each side (the pipeline's from its
``time_ms/*`` metrics, the baseline's from the same clock).

The pipeline's images/s is its steady state: the mean of its ``images_per_sec`` log windows
after the first (start-up, Ray placement, DeepSpeed init and the first window are excluded);
its start-up cost is reported apart as the run's wall time.
"""

from __future__ import annotations

import statistics
from dataclasses import replace

from pipeline.bench.baseline import global_batch, load_in_memory, run_baseline, total_threads
from pipeline.bench.engine_ranks import run_engine_ranks
from pipeline.bench.report import BenchReport, spread
from pipeline.config import VaepipeConfig
from pipeline.train.timers import PHASES

SHORT = {"data_wait": "data", "forward": "fwd", "backward": "bwd", "optimizer": "opt", "auxiliary": "aux",
         "communication": "comm", "observe": "obs"}  # table columns, ms per optimizer step


def resolved_precision(cfg: VaepipeConfig) -> VaepipeConfig:
    """``precision=auto`` made explicit, so both sides run what the workers will run."""
    from pipeline.train.engine import DeviceFacts, resolve_precision

    facts = DeviceFacts.detect(cfg.dist.gpus_per_worker > 0)
    return replace(cfg, train=replace(cfg.train, precision=resolve_precision(cfg.train.precision, facts)))


def bench_config(cfg: VaepipeConfig, steps: int, system_metrics: bool) -> VaepipeConfig:
    """The job as given, for ``steps`` steps, nothing saved but the final checkpoint."""
    log_every = max(1, steps // 8)
    return replace(
        cfg,
        train=replace(cfg.train, max_steps=steps, log_every=log_every, checkpoint_every=steps, image_every=steps,
                      val_every=steps, phase_timers="on"),
        data=replace(cfg.data, val_batches=0),
        tracking=replace(cfg.tracking, log_model=False, register_name=None, system_metrics=system_metrics,
                         experiment="vaepipe-bench-runs"),
    )


def pipeline_run(cfg: VaepipeConfig) -> dict:
    """One ``vaepipe train`` run; its steady-state images/s and per-phase ms from MLflow."""
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    result = run_training(cfg)
    client = make_client(result.tracking_uri)
    steady = {}
    for key in ("images_per_sec",) + tuple(f"time_ms/{p}" for p in PHASES):
        history = sorted(client.get_metric_history(result.run_id, key), key=lambda m: m.step)
        values = [m.value for m in history][1:] or [m.value for m in history]
        steady[key] = statistics.mean(values) if values else 0.0
    return {"images_per_sec": steady.pop("images_per_sec"), "ms": {k.split("/", 1)[1]: v for k, v in steady.items()},
            "wall_s": result.wall_s, "run_id": result.run_id}


def overhead(cfg: VaepipeConfig, steps: int, repeats: int, system_metrics: str = "off",
             max_images: int = 4096, compiled_baseline: bool = False) -> BenchReport:
    cfg = resolved_precision(cfg)
    data = load_in_memory(cfg, max_images)
    variants = {"off": [False], "on": [True], "both": [False, True]}[system_metrics]
    base, layout, compiled, engines, pipes = [], [], [], [], {sm: [] for sm in variants}
    for _ in range(repeats):
        base.append(run_baseline(cfg, data, steps))
        if cfg.train.channels_last:  # the plain loop with vaepipe's layout: what the layout alone is worth
            layout.append(run_baseline(cfg, data, steps, channels_last=True))
        if compiled_baseline:
            compiled.append(run_baseline(cfg, data, steps, compiled=True))
        engines.append(run_engine_ranks(cfg, data, steps))
        for sm in variants:
            pipes[sm].append(pipeline_run(bench_config(cfg, steps, sm)))
    return build_report(cfg, steps, base, pipes, engines, compiled, layout)


def build_report(cfg: VaepipeConfig, steps: int, base: list, pipes: dict, engines: list = (),
                 compiled: list = (), layout: list = ()) -> BenchReport:
    b = spread([r.images_per_sec for r in base])
    rows = [_row(f"bare loop, {base[0].threads} threads", b, _median_ms([r.ms_per_step for r in base]))]
    summary = {"baseline_images_per_sec": b["median"]}
    for runs, what, key in ((layout, "channels-last", "layout"), (compiled, "torch.compile", "compiled")):
        if runs:
            v = spread([r.images_per_sec for r in runs])
            rows.append(_row(f"bare loop, {runs[0].threads} threads, {what}", v,
                             _median_ms([r.ms_per_step for r in runs]), ratio=v["median"] / b["median"]))
            summary.update({f"{key}_baseline_images_per_sec": v["median"], f"ratio_{key}_baseline": v["median"] / b["median"]})
    if engines:
        e = spread([r["images_per_sec"] for r in engines])
        rows.append(_row(f"engine {cfg.dist.num_workers}x{cfg.dist.cpus_per_worker:g} ranks, no Ray", e,
                         _median_ms([r["ms"] for r in engines]), ratio=e["median"] / b["median"]))
        summary.update(engine_ranks_images_per_sec=e["median"], ratio_engine_ranks=e["median"] / b["median"])
    for sm, runs in pipes.items():
        p = spread([r["images_per_sec"] for r in runs])
        tag = "_sysmetrics" if sm else ""
        label = f"vaepipe {cfg.dist.num_workers}w ZeRO-{cfg.dist.zero_stage}" + (" +sysmetrics" if sm else "")
        rows.append(_row(label, p, _median_ms([r["ms"] for r in runs]), ratio=p["median"] / b["median"]))
        summary[f"pipeline{tag}_images_per_sec"] = p["median"]
        summary[f"ratio{tag}"] = p["median"] / b["median"]
        summary[f"pipeline{tag}_wall_s"] = statistics.median(r["wall_s"] for r in runs)
    plain_key = "pipeline_images_per_sec" if False in pipes else "pipeline_sysmetrics_images_per_sec"
    summary.update(achieved_flops(cfg, summary[plain_key]))
    if layout and False in pipes:  # the pipeline against a bare loop that runs the same layout
        summary["ratio_to_layout_baseline"] = summary["pipeline_images_per_sec"] / summary["layout_baseline_images_per_sec"]
    if engines and False in pipes:  # the gap split: engine and layout, then Ray, streaming and observation
        summary["ray_stream_cost_pct"] = 100.0 * (1 - summary["pipeline_images_per_sec"]
                                                  / summary["engine_ranks_images_per_sec"])
    if len(pipes) == 2:
        summary["system_metrics_cost_pct"] = 100.0 * (1 - summary["pipeline_sysmetrics_images_per_sec"]
                                                      / summary["pipeline_images_per_sec"])
    params = {"model": cfg.model.name, "latent_dim": cfg.model.latent_dim, "resolution": cfg.data.resolution,
              "global_batch": global_batch(cfg), "precision": cfg.train.precision, "steps": steps,
              "repeats": len(base), "threads_total": total_threads(cfg), "workers": cfg.dist.num_workers,
              "zero_stage": cfg.dist.zero_stage, "loader_workers": cfg.data.loader_workers}
    notes = ["img/s: median over repetitions (±% = half the range); data..obs: ms per optimizer step by phase, median",
             "pipeline images/s: log windows after the first (start-up excluded; its wall time includes it)",
             "engine ranks: the loop's DeepSpeed engine and train step on the job's ranks and threads, "
             "data in memory, no Ray, stream or MLflow (bench/engine_ranks.py)",
             "ratio: against the plain bare loop (what a user writes); channels-last: the same loop with "
             "vaepipe's NHWC convolutions (train.channels_last), so ratio_to_layout_baseline is the pipeline's "
             "cost on equal kernels",
             "torch.compile (--compiled-baseline): the bare loop's model under inductor, compiled in its warm-up",
             "bf16 on both sides: bf16 weights and activations, Adam on an fp32 master copy (DeepSpeed; the baseline does the same by hand)"]
    return BenchReport("overhead", f"overhead at {cfg.data.resolution}px, global batch {global_batch(cfg)}, "
                       f"{cfg.train.precision}", rows, summary, params, chart=_chart, notes=notes)


def achieved_flops(cfg: VaepipeConfig, images_per_sec: float) -> dict:
    """The model's FLOPs per image and what the pipeline achieved; against the card's peak on CUDA."""
    from pipeline.bench.flops import device_peak, flops_per_image

    per_image = flops_per_image(cfg)
    out = {"model_gflop_per_image": per_image / 1e9, "pipeline_achieved_tflops": per_image * images_per_sec / 1e12}
    peak = device_peak()
    if peak is not None:  # per GPU: the pipeline's rate is over all its workers
        out["pipeline_pct_of_dense_bf16_peak"] = 100.0 * out["pipeline_achieved_tflops"] * 1e12 / (
            peak[1] * max(cfg.dist.num_workers, 1))
    return out


def _row(label: str, s: dict, ms: dict, ratio: float = 1.0) -> dict:
    row = {"setup": label, "img/s": s["median"], "±%": s["spread_pct"], "ratio": ratio}
    row.update({SHORT[p]: ms.get(p, 0.0) for p in PHASES})
    return row


def _median_ms(per_run: list[dict]) -> dict:
    return {p: statistics.median(ms.get(p, 0.0) for ms in per_run) for p in PHASES}


def _chart(ax, report: BenchReport) -> None:
    """Stacked ms per step by phase, one bar per setup."""
    labels = [r["setup"].replace(" +", "\n+") for r in report.rows]
    bottom = [0.0] * len(report.rows)
    for p in PHASES:
        vals = [r[SHORT[p]] for r in report.rows]
        ax.bar(labels, vals, bottom=bottom, label=p)
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax.set_ylabel("ms per optimizer step")
    ax.legend(fontsize=7)

"""``vaepipe bench scaling``: measured on this machine, predicted past it.

Measured (real ``vaepipe train`` runs, steady-state images/s and per-phase ms):

- *weak scaling*: 1, 2, ... workers of one CPU each at a fixed micro-batch, every ZeRO stage;
  efficiency(n) = images/s(n) / (n * images/s(1));
- *layouts*: the machine's cores split as (workers x threads) at a fixed global batch, so the
  fastest way to use this machine is read off the table (``recommended``).

Predicted (a model, printed with its assumptions): per optimizer step a rank computes for
``t_c = micro_batch * seconds_per_image`` and ZeRO moves, per rank, ``k * (n-1)/n * P * b`` bytes
(P trainable parameters, b bytes per element: 2 in bf16): k = 2 for ZeRO 0-2 (an all-reduce,
or a reduce-scatter plus an all-gather), 3 for ZeRO-3 (parameters gathered for forward and
backward, gradients reduce-scattered). Bytes cross NVLink within a node and the node's NICs
between nodes (ring: the slowest link sets the pace); each collective also pays
``2 * log2(n) * latency`` (tree) per bucket. Efficiency = t_c / (t_c + exposed comm), with no
overlap and with the communication hidden behind backward (2/3 of the compute) where it fits.
Seconds per image come from this machine's measurement (a cluster of these CPUs) or, for
GPUs, from the model's FLOPs at an assumed fraction of the card's dense bf16 peak.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from pipeline.bench.report import BenchReport
from pipeline.config import VaepipeConfig

GPU_COUNTS = (8, 64, 256)


@dataclass
class Links:
    gpus_per_node: int = 8
    intra_gbps: float = 2400.0  # NVLink 4 per GPU, ~300 GB/s
    inter_gbps: float = 400.0  # one 400 Gb/s NIC per GPU (100-400 Gb/s is common)
    latency_us: float = 10.0  # per hop of a collective between nodes
    bucket_mb: float = 500.0  # DeepSpeed's default reduce bucket (elements ~ MB at 1 byte)


def comm_factor(zero_stage: int) -> float:
    return 3.0 if zero_stage == 3 else 2.0


def comm_seconds(params: int, n: int, zero_stage: int, links: Links, bytes_per_elem: int = 2) -> float:
    """Per-rank communication time of one optimizer step on ``n`` ranks (0 for one rank)."""
    if n <= 1:
        return 0.0
    volume = comm_factor(zero_stage) * (n - 1) / n * params * bytes_per_elem
    gbps = links.intra_gbps if n <= links.gpus_per_node else links.inter_gbps
    buckets = max(1, math.ceil(params * bytes_per_elem / (links.bucket_mb * 1e6)))
    collectives = buckets * (3 if zero_stage == 3 else 2 if zero_stage else 1)
    latency = collectives * 2 * math.log2(n) * links.latency_us * 1e-6
    return volume * 8 / (gbps * 1e9) + latency


def efficiency(t_compute: float, t_comm: float, overlap: bool) -> float:
    exposed = max(0.0, t_comm - (2 / 3) * t_compute) if overlap else t_comm
    return t_compute / (t_compute + exposed)


def predict(params: int, seconds_per_image: float, micro_batch: int, links: Links, label: str) -> list[dict]:
    rows = []
    t_c = micro_batch * seconds_per_image
    for stage in (0, 1, 2, 3):
        row = {"what": label, "zero": stage, "compute ms": 1000 * t_c,
               f"comm ms @{GPU_COUNTS[-1]}": 1000 * comm_seconds(params, GPU_COUNTS[-1], stage, links)}
        for n in GPU_COUNTS:
            t = comm_seconds(params, n, stage, links)
            row[f"eff @{n}"] = efficiency(t_c, t, overlap=False)
            row[f"eff @{n} ovl"] = efficiency(t_c, t, overlap=True)
        rows.append(row)
    return rows


def measure(cfg: VaepipeConfig, steps: int, stages: tuple[int, ...]) -> dict:
    """Real runs: weak scaling per ZeRO stage, and the core-layouts at a fixed global batch."""
    from pipeline.bench.overhead import bench_config, pipeline_run

    cores = int(cfg.dist.cpus_per_worker * cfg.dist.num_workers) or os.cpu_count() or 1

    def run(workers: int, cpus: float, batch: int, stage: int) -> dict:
        c = replace(cfg, dist=replace(cfg.dist, num_workers=workers, cpus_per_worker=cpus, zero_stage=stage),
                    data=replace(cfg.data, batch_size=batch))
        return pipeline_run(bench_config(c, steps, system_metrics=False))

    micro = cfg.data.batch_size
    weak = {(1, stages[0]): run(1, 1, micro, stages[0])}
    for n in range(2, cores + 1):
        for stage in stages:
            weak[(n, stage)] = run(n, 1, micro, stage)
    layouts = {}
    for n in (d for d in range(1, cores + 1) if cores % d == 0):
        threads = cores // n
        reuse = weak.get((n, cfg.dist.zero_stage)) if threads == 1 else None  # the same run as a weak point
        layouts[(n, threads)] = reuse or run(n, threads, micro * cores // n, cfg.dist.zero_stage)
    return {"weak": weak, "layouts": layouts, "cores": cores}


def measured_rows(m: dict, micro: int) -> list[dict]:
    base = next(iter(m["weak"].values()))["images_per_sec"]
    rows = []
    for (n, stage), r in m["weak"].items():
        rows.append({"what": f"weak: {n} worker(s) x 1 thread, ZeRO-{stage}, micro-batch {micro}",
                     "img/s": r["images_per_sec"], "efficiency": r["images_per_sec"] / (n * base),
                     "comm ms": r["ms"].get("communication", 0.0), "compute ms": _compute_ms(r)})
    for (n, threads), r in m["layouts"].items():
        rows.append({"what": f"layout: {n} worker(s) x {threads} thread(s), global batch {micro * m['cores']}",
                     "img/s": r["images_per_sec"], "efficiency": None,
                     "comm ms": r["ms"].get("communication", 0.0), "compute ms": _compute_ms(r)})
    return rows


def _compute_ms(r: dict) -> float:
    return sum(r["ms"].get(p, 0.0) for p in ("forward", "backward", "optimizer"))


def scaling(cfg: VaepipeConfig, steps: int, stages: tuple[int, ...], links: Links, gpu: str, mfu: float,
            predict_cfg: VaepipeConfig, predict_batch: int) -> tuple[BenchReport, BenchReport]:
    """The measured report and the prediction report."""
    from pipeline.bench.overhead import resolved_precision

    cfg = resolved_precision(cfg)
    m = measure(cfg, steps, stages)
    single = m["weak"][(1, stages[0])]
    best = max(m["layouts"].items(), key=lambda kv: kv[1]["images_per_sec"])
    summary = {"recommended_workers": best[0][0], "recommended_threads_per_worker": best[0][1],
               "recommended_images_per_sec": best[1]["images_per_sec"],
               **{f"weak_efficiency_{n}w_zero{s}": r["images_per_sec"] / (n * single["images_per_sec"])
                  for (n, s), r in m["weak"].items() if n > 1}}
    params = {"model": cfg.model.name, "resolution": cfg.data.resolution, "micro_batch": cfg.data.batch_size,
              "precision": cfg.train.precision, "steps": steps, "cores": m["cores"]}
    measured = BenchReport("scaling", f"scaling on this machine: {cfg.model.name} at {cfg.data.resolution}px",
                           measured_rows(m, cfg.data.batch_size), summary, params,
                           notes=[f"recommended layout here: {best[0][0]} worker(s) x {best[0][1]} thread(s)"])
    cpu_s_per_img = _compute_ms(single) / 1000 / cfg.data.batch_size
    return measured, prediction(cfg, cpu_s_per_img, links, gpu, mfu, predict_cfg, predict_batch)


def prediction(cfg: VaepipeConfig, cpu_s_per_img: float, links: Links, gpu: str, mfu: float,
               predict_cfg: VaepipeConfig, predict_batch: int) -> BenchReport:
    from pipeline.bench.flops import DENSE_BF16_PEAK, flops_per_image, param_count

    gpu_flops = flops_per_image(predict_cfg)
    gpu_s_per_img = gpu_flops / (DENSE_BF16_PEAK[gpu] * mfu)
    gpu_label = f"{gpu}: {predict_cfg.model.name} {predict_cfg.data.resolution}px"
    rows = (predict(param_count(cfg), cpu_s_per_img, cfg.data.batch_size, links, f"this CPU: {cfg.data.resolution}px")
            + predict(param_count(predict_cfg), gpu_s_per_img, predict_batch, links, gpu_label))
    summary = {f"predicted_eff_{n}gpu_zero{r['zero']}": r[f"eff @{n}"] for r in rows[4:] for n in GPU_COUNTS}
    notes = [f"links: {links.gpus_per_node} GPUs/node, NVLink {links.intra_gbps:.0f} Gb/s, between nodes "
             f"{links.inter_gbps:.0f} Gb/s per GPU, {links.latency_us:.0f} us per hop, buckets {links.bucket_mb:.0f} MB",
             f"GPU compute: {gpu_flops / 1e9:.2f} GFLOP/image (fwd+bwd) at {mfu:.0%} of {gpu}'s dense bf16 peak, "
             f"micro-batch {predict_batch}",
             f"this CPU: {1000 * cpu_s_per_img:.2f} ms/image compute (fwd+bwd+opt, 1 thread, measured)",
             "eff: no overlap; 'ovl': communication hidden behind backward (2/3 of compute) where it fits"]
    params = {"gpu": gpu, "mfu": mfu, "predict_resolution": predict_cfg.data.resolution, "predict_batch": predict_batch,
              **{f"link_{k}": v for k, v in links.__dict__.items()}}
    return BenchReport("scaling-prediction", "predicted weak-scaling efficiency past this machine", rows, summary,
                       params, chart=_chart, notes=notes)


def _chart(ax, report: BenchReport) -> None:
    for row in report.rows:
        ax.plot(GPU_COUNTS, [row[f"eff @{n}"] for n in GPU_COUNTS], marker="o", label=f"{row['what']}, ZeRO-{row['zero']}")
    ax.axhline(0.9, color="k", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("GPUs")
    ax.set_ylabel("weak-scaling efficiency (no overlap)")
    ax.legend(fontsize=6)

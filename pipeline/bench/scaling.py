"""``vaepipe bench scaling``: measured on this machine, predicted past it.

Measured (real ``vaepipe train`` runs, steady-state images/s and per-phase ms):

- *weak scaling*: 1, 2, ... workers of one CPU each at a fixed micro-batch, every ZeRO stage;
  efficiency(n) = images/s(n) / (n * images/s(1));
- *layouts*: the machine's cores split as (workers x threads) at a fixed global batch, so the
  fastest way to use this machine is read off the table (``recommended``).

Predicted (a model, printed with its assumptions): an optimizer step of ``a`` micro-batches of
``m`` images computes for ``t_c = a * m * seconds_per_image`` per rank, and ZeRO moves, per rank,
``(n-1)/n * P * b`` bytes per pass (P trainable parameters, b bytes per element: 2 in bf16), as
DeepSpeed schedules its collectives: ZeRO-0 all-reduces the gradients (2 passes) and ZeRO-1
reduce-scatters them and all-gathers the updated partitions (2), once per optimizer step; ZeRO-2
reduce-scatters the gradients after every micro-batch and all-gathers once per step (a + 1);
ZeRO-3 gathers the parameters for forward and for backward and reduce-scatters the gradients on
every micro-batch (3a). So gradient accumulation amortises ZeRO-0/1's communication and not
ZeRO-2/3's. Bytes cross NVLink within a node and the node's NICs between nodes (ring: the
slowest link sets the pace); each collective also pays ``2 * log2(n) * latency`` (tree) per
bucket. Efficiency = t_c / (t_c + exposed comm), with no overlap and with the communication
hidden behind backward (2/3 of the compute) where it fits; for each stage the prediction also
gives the fewest micro-batches per step (accumulation) that reach 90% at 64 GPUs without
overlap, or none where more accumulation cannot get there. Seconds per image come from this
machine's measurement (a cluster of these CPUs) or, for GPUs, from the model's FLOPs at an
assumed fraction of the card's dense bf16 peak.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Optional

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


TARGET_EFFICIENCY, TARGET_GPUS = 0.9, 64
ACCUM_COLUMN = f"accum for {TARGET_EFFICIENCY:.0%} @{TARGET_GPUS}"
MICRO_BATCH_COLUMN = f"micro-batch for {TARGET_EFFICIENCY:.0%} @{TARGET_GPUS}"

# Collectives of one optimizer step per ZeRO stage, as (passes over the parameters, collectives):
# those once per step, and those after every micro-batch (see the module docstring).
SCHEDULE = {0: ((2, 1), (0, 0)), 1: ((2, 2), (0, 0)), 2: ((1, 1), (1, 1)), 3: ((0, 0), (3, 3))}


def comm_seconds(params: int, n: int, zero_stage: int, links: Links, bytes_per_elem: int = 2, accum: int = 1) -> float:
    """Per-rank communication time of one optimizer step of ``accum`` micro-batches on ``n`` ranks
    (0 for one rank)."""
    if n <= 1:
        return 0.0
    (step_passes, step_calls), (micro_passes, micro_calls) = SCHEDULE[zero_stage]
    volume = (step_passes + accum * micro_passes) * (n - 1) / n * params * bytes_per_elem
    gbps = links.intra_gbps if n <= links.gpus_per_node else links.inter_gbps
    buckets = max(1, math.ceil(params * bytes_per_elem / (links.bucket_mb * 1e6)))
    collectives = buckets * (step_calls + accum * micro_calls)
    latency = collectives * 2 * math.log2(n) * links.latency_us * 1e-6
    return volume * 8 / (gbps * 1e9) + latency


def efficiency(t_compute: float, t_comm: float, overlap: bool) -> float:
    exposed = max(0.0, t_comm - (2 / 3) * t_compute) if overlap else t_comm
    return t_compute / (t_compute + exposed)


def accumulation_for(params: int, t_micro: float, zero_stage: int, links: Links, n: int = TARGET_GPUS,
                     target: float = TARGET_EFFICIENCY) -> Optional[int]:
    """The fewest micro-batches per optimizer step reaching ``target`` at ``n`` ranks without
    overlap, or None where no accumulation does. With communication ``c_step + a * c_micro`` (the
    part once per step and the part per micro-batch), ``a * t >= k * (c_step + a * c_micro)`` with
    ``k = target / (1 - target)``: ``a >= k * c_step / (t - k * c_micro)`` when ``t > k * c_micro``."""
    k = target / (1 - target)
    c_step = comm_seconds(params, n, zero_stage, links, accum=0)
    c_micro = comm_seconds(params, n, zero_stage, links, accum=1) - c_step
    headroom = t_micro - k * c_micro
    if headroom <= 0:
        return None  # ZeRO-2/3: what every micro-batch communicates already keeps it below
    return max(1, math.ceil(k * c_step / headroom))


def micro_batch_for(params: int, seconds_per_image: float, zero_stage: int, links: Links, n: int = TARGET_GPUS,
                    target: float = TARGET_EFFICIENCY) -> int:
    """The smallest micro-batch (one per optimizer step) reaching ``target`` at ``n`` ranks without
    overlap: compute grows with it, communication does not, so ``m * s >= target / (1 - target) * comm``."""
    return max(1, math.ceil(target / (1 - target) * comm_seconds(params, n, zero_stage, links) / seconds_per_image))


def predict(params: int, seconds_per_image: float, micro_batch: int, links: Links, label: str) -> list[dict]:
    rows = []
    t_c = micro_batch * seconds_per_image
    for stage in (0, 1, 2, 3):
        accum = accumulation_for(params, t_c, stage, links)
        row = {"what": label, "zero": stage, "compute ms": 1000 * t_c,
               f"comm ms @{GPU_COUNTS[-1]}": 1000 * comm_seconds(params, GPU_COUNTS[-1], stage, links)}
        for n in GPU_COUNTS:
            t = comm_seconds(params, n, stage, links)
            row[f"eff @{n}"] = efficiency(t_c, t, overlap=False)
            row[f"eff @{n} ovl"] = efficiency(t_c, t, overlap=True)
        row[ACCUM_COLUMN] = accum
        row[MICRO_BATCH_COLUMN] = micro_batch_for(params, seconds_per_image, stage, links)
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
    target = f"{100 * TARGET_EFFICIENCY:.0f}pct_{TARGET_GPUS}gpu"
    summary.update({f"predicted_accum_for_{target}_zero{r['zero']}": r[ACCUM_COLUMN]
                    for r in rows[4:] if r[ACCUM_COLUMN] is not None})
    summary.update({f"predicted_micro_batch_for_{target}_zero{r['zero']}": r[MICRO_BATCH_COLUMN] for r in rows[4:]})
    notes = [f"links: {links.gpus_per_node} GPUs/node, NVLink {links.intra_gbps:.0f} Gb/s, between nodes "
             f"{links.inter_gbps:.0f} Gb/s per GPU, {links.latency_us:.0f} us per hop, buckets {links.bucket_mb:.0f} MB",
             f"GPU compute: {gpu_flops / 1e9:.2f} GFLOP/image (fwd+bwd) at {mfu:.0%} of {gpu}'s dense bf16 peak, "
             f"micro-batch {predict_batch} per GPU; eff columns at one micro-batch per optimizer step",
             f"'{ACCUM_COLUMN}': fewest micro-batches per optimizer step (gradient accumulation) that reach "
             f"{TARGET_EFFICIENCY:.0%} at {TARGET_GPUS} GPUs without overlap; none where ZeRO's per-micro-batch "
             "collectives keep it below at any accumulation; 'micro-batch for ...': the images per GPU per "
             "micro-batch that reach it with no accumulation (memory permitting)",
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

"""``vaepipe bench memory``: peak memory and step time per worker for ZeRO 0-3, offload and
activation checkpointing, beside the model-state bytes each rank holds and DeepSpeed's estimate.

Every configuration runs on its own fresh pair (``--workers``) of processes joined by gloo
(NCCL on GPUs), built as a Ray Train worker builds its rank (``worker.build_rank_modules``:
zero.Init at stage 3, the same DeepSpeed config) and stepped by the training step itself
(``step.train_step``). Peak memory is read inside each worker: CUDA's peak allocated bytes on a
GPU, the process's peak RSS (``ru_maxrss``) on a CPU; fresh processes make the RSS peak belong
to that configuration alone. The RSS after imports (torch, DeepSpeed) is reported too, so the
training's own share is ``peak - baseline``. Inputs are random images of the configured batch
and resolution: the data pipeline is ``bench data``'s subject, not this one's.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import torch

from pipeline.bench.report import BenchReport
from pipeline.config import VaepipeConfig

MB = 2**20


@dataclass(frozen=True)
class MemoryCase:
    zero_stage: int
    activation_checkpointing: bool
    offload_optimizer: bool = False
    offload_params: bool = False

    @property
    def label(self) -> str:
        off = [k for k, on in (("opt", self.offload_optimizer), ("param", self.offload_params)) if on]
        return f"ZeRO-{self.zero_stage}" + (f" offload {'+'.join(off)}" if off else "") + \
            (" ckpt" if self.activation_checkpointing else "")


def default_cases(stages: list[int], offload: bool) -> list[MemoryCase]:
    """Each stage with and without activation checkpointing, then the offload variants."""
    cases = [MemoryCase(s, ckpt) for s in stages for ckpt in (False, True)]
    if offload:
        cases += [MemoryCase(s, False, True, s == 3) for s in stages if s >= 1]
    return cases


def case_config(cfg: VaepipeConfig, case: MemoryCase, workers: int) -> VaepipeConfig:
    return replace(cfg,
                   dist=replace(cfg.dist, zero_stage=case.zero_stage, num_workers=workers,
                                offload_optimizer=case.offload_optimizer, offload_params=case.offload_params),
                   train=replace(cfg.train, activation_checkpointing=case.activation_checkpointing))


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory_bytes(device: torch.device) -> tuple[str, int]:
    """("cuda_peak_allocated", bytes) on a GPU, ("peak_rss", bytes) on a CPU, for this process."""
    if device.type == "cuda":
        return "cuda_peak_allocated", torch.cuda.max_memory_allocated(device)
    import resource

    return "peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_rank(rank: int, world: int, cfg_dict: dict, steps: int, warmup: int) -> dict:
    """One configuration on one rank (a fresh process): step times, held bytes, peak memory."""
    import warnings

    from pipeline.bench.engine_ranks import rank_worker
    from pipeline.bench.model_state import held_bytes
    from pipeline.config import from_dict
    from pipeline.train.step import train_step

    warnings.filterwarnings("ignore", category=FutureWarning)
    baseline = current_rss_bytes()
    w = rank_worker(from_dict(cfg_dict), rank, world, steps_per_epoch=10**6)
    d = w.cfg.data
    gen = torch.Generator().manual_seed(1000 + rank)
    batch = {"image": torch.rand(d.batch_size, d.channels, d.resolution, d.resolution, generator=gen)}
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(w, batch)
        if w.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        w.state.step += 1
    # one more forward and backward: gradients exist, and Adam's state from the steps above
    from pipeline.train.engine import input_dtype

    loss = w.engine(batch["image"].to(w.device).to(input_dtype(w.precision)))["loss"]
    w.engine.backward(loss)
    held = held_bytes(w.engine)
    w.engine.step()
    kind, peak = peak_memory_bytes(w.device)
    return {"rank": rank, "step_s": statistics.median(times[warmup:]), "peak_kind": kind, "peak_bytes": peak,
            "baseline_rss_bytes": baseline, "precision": w.precision, **held}


def measure_case(cfg: VaepipeConfig, case: MemoryCase, steps: int, warmup: int, workers: int) -> list[dict]:
    """Every rank's figures for one configuration, on fresh processes."""
    from pipeline.bench.ranks import run_fresh_ranks
    from pipeline.config import to_dict

    run_cfg = case_config(cfg, case, workers)
    return run_fresh_ranks(measure_rank, workers, args=(to_dict(run_cfg), steps, warmup), timeout=1200.0)


def case_row(case: MemoryCase, ranks: list[dict], estimate: dict) -> dict:
    """The table line: the larger rank's peak and bytes (ranks differ by ZeRO padding at most)."""
    top = max(ranks, key=lambda r: r["peak_bytes"])
    state = {k: max(r[k] for r in ranks) for k in ("param_bytes", "grad_bytes", "optimizer_bytes")}
    device_est, host_est = estimate["ds_estimate_device_bytes"], estimate["ds_estimate_host_bytes"]
    rss = top["peak_kind"] == "peak_rss"
    return {
        "configuration": case.label,
        "peak_MiB": top["peak_bytes"] / MB,
        "peak_MiB_per_rank": "/".join(f"{r['peak_bytes'] / MB:.0f}" for r in ranks),
        "above_imports_MiB": (top["peak_bytes"] - top["baseline_rss_bytes"]) / MB if rss else None,
        "step_s": statistics.median(r["step_s"] for r in ranks),
        "params_MiB": state["param_bytes"] / MB, "grads_MiB": state["grad_bytes"] / MB,
        "optim_MiB": state["optimizer_bytes"] / MB, "model_state_MiB": sum(state.values()) / MB,
        "ds_estimate_MiB": device_est / MB if device_est is not None else None,
        "ds_estimate_host_MiB": host_est / MB if host_est is not None else None,
    }


def memory_report(cfg: VaepipeConfig, cases: list[MemoryCase], steps: int = 5, warmup: int = 2,
                  workers: int = 2, progress: Optional[Callable[[str], None]] = None) -> BenchReport:
    from models import build_model
    from pipeline.bench.model_state import deepspeed_estimate, parameter_counts

    total, largest = parameter_counts(build_model(cfg.model))  # the driver counts once; workers never hold it all
    rows, per_rank = [], []
    for case in cases:
        ranks = measure_case(cfg, case, steps, warmup, workers)
        est = deepspeed_estimate(total, largest, workers, case.zero_stage, case.offload_optimizer, case.offload_params)
        rows.append(case_row(case, ranks, est))
        if progress:
            progress(f"{case.label}: peak {rows[-1]['peak_MiB']:.0f} MiB, step {rows[-1]['step_s']:.3g} s")
        per_rank.append({"case": asdict(case), "ranks": ranks})
    first = per_rank[0]["ranks"][0]
    return BenchReport(
        name="memory", rows=rows, summary=memory_summary(cases, rows), chart=draw_memory,
        title=f"memory per worker: {cfg.model.name} ({cfg.model.flavor}) at {cfg.data.resolution}px, "
              f"batch {cfg.data.batch_size}/worker, {workers} workers, {first['precision']}",
        params={"model": cfg.model.name, "flavor": cfg.model.flavor, "resolution": cfg.data.resolution,
                "batch_size_per_worker": cfg.data.batch_size, "workers": workers, "steps": steps, "warmup": warmup,
                "precision": first["precision"], "peak_kind": first["peak_kind"],
                "parameters": total, "largest_layer_parameters": largest, "per_rank": per_rank},
        notes=[f"peak: {first['peak_kind']} inside each worker process (fresh processes per configuration); "
               "above_imports = peak - RSS after importing torch and DeepSpeed; step_s: median over ranks "
               "of each rank's median step",
               "bytes held per rank, read from the engine after a backward (params: ZeRO-3 partitions; grads: "
               ".grad and ZeRO gradient buffers; optim: fp32 masters + Adam moments), once per storage",
               "ds_estimate: DeepSpeed's estimate_zero{2,3}_model_states_mem_needs (what the *_all_live "
               "variants print) per accelerator, no estimator for ZeRO 0/1; host figure per node, 1.5x buffer"],
    )


def memory_summary(cases: list[MemoryCase], rows: list[dict]) -> dict:
    """Scalars for MLflow: each configuration's peak and step time, and ZeRO-3's parameter share."""
    out = {}
    for r in rows:
        key = r["configuration"].lower().replace(" ", "_").replace("+", "_").replace("-", "")
        out[f"peak_MiB.{key}"] = r["peak_MiB"]
        out[f"step_s.{key}"] = r["step_s"]
    plain = {c.zero_stage: r for c, r in zip(cases, rows)
             if not (c.activation_checkpointing or c.offload_optimizer or c.offload_params)}
    if 0 in plain and 3 in plain:
        out["zero3_over_zero0_param_bytes"] = plain[3]["params_MiB"] / plain[0]["params_MiB"]
        out["zero3_over_zero0_model_state_bytes"] = plain[3]["model_state_MiB"] / plain[0]["model_state_MiB"]
    return out


def draw_memory(ax, report: BenchReport) -> None:
    """Peak memory per configuration, the model-state part shaded."""
    rows = report.rows
    x = range(len(rows))
    ax.bar(x, [r["peak_MiB"] for r in rows], color="#9ecae1", label=f"{report.params['peak_kind']} (MiB)")
    ax.bar(x, [r["model_state_MiB"] for r in rows], color="#3182bd", label="model states held (MiB)")
    ax.set_xticks(list(x), [r["configuration"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("MiB per worker")
    ax.legend(fontsize=7)

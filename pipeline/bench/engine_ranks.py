"""The middle setup of ``vaepipe bench overhead``: the loop's own engine and step, without Ray.

The same ranks × threads as the job, on fresh processes joined by a process group (gloo on the
CPU, with the shared-memory all-reduce where the worker would use it), each building its engine
with ``engine.build_engine`` and running ``step.train_step`` under the worker's phase clock, on
its share of the in-memory images. No Ray Train, no shard stream, no MLflow, no checkpoints.

Between the bare loop and a real ``vaepipe train`` run it splits the gap in two: bare → this is
what DeepSpeed, ZeRO's collectives and the rank layout cost; this → ``vaepipe train`` is what Ray
Train, streaming and the run's observation cost (and, on a small machine, Ray's own processes
taking CPU from the ranks).
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import torch

from pipeline.bench.baseline import global_batch
from pipeline.config import VaepipeConfig


def run_engine_ranks(cfg: VaepipeConfig, data: torch.Tensor, steps: int, warmup: int = 5) -> dict:
    """``{"images_per_sec", "ms"}`` of ``steps`` optimizer steps after ``warmup`` untimed ones,
    timed on rank 0 (the ranks run in lockstep: every step all-reduces)."""
    from pipeline.bench.ranks import run_fresh_ranks

    if len(data) < global_batch(cfg):
        raise ValueError(f"the engine ranks need one global batch ({global_batch(cfg)} images); "
                         f"{cfg.data.path} gave {len(data)}")
    threads = max(1, int(cfg.dist.cpus_per_worker))
    results = run_fresh_ranks(_rank, cfg.dist.num_workers, (cfg, data, steps, warmup), threads=threads,
                              backend="nccl" if _use_cuda(cfg) else "gloo")
    return results[0]


def _use_cuda(cfg: VaepipeConfig) -> bool:
    return cfg.dist.gpus_per_worker > 0 and torch.cuda.is_available()


def _rank(rank: int, world: int, cfg: VaepipeConfig, data: torch.Tensor, steps: int, warmup: int) -> dict:
    """One rank: the worker's process set-up (``worker.prepare_rank_process``), its engine, then
    ``train_step`` on this rank's slice of ``data``."""
    from pipeline.train import local_allreduce
    from pipeline.train.timers import PhaseClock, activate
    from pipeline.train.worker import prepare_rank_process

    use_cuda = _use_cuda(cfg)
    proc = prepare_rank_process(cfg, use_cuda, world, world)  # the ranks share this machine
    try:
        w = rank_worker(cfg, rank, world)
        if proc.shm:
            local_allreduce.install()
        batches = _batches(data[rank::world], cfg.data.batch_size)
        _steps(w, batches, warmup)
        w.clock = PhaseClock(sync=use_cuda)
        activate(w.clock)
        t0 = time.perf_counter()
        _steps(w, batches, steps)
        elapsed = time.perf_counter() - t0
        activate(None)
        return {"images_per_sec": steps * global_batch(cfg) / elapsed, "ms": w.clock.take(steps)}
    finally:
        if proc.shm:
            local_allreduce.release_segment()


def rank_worker(cfg: VaepipeConfig, rank: int, world: int, steps_per_epoch: int = 1) -> SimpleNamespace:
    """What ``train_step`` reads of a worker, with the engine the worker would build, on a rank of
    ``run_fresh_ranks`` (which sets each CUDA rank's device). ``steps_per_epoch``: the stream's,
    read only by an epoch-based KL schedule. ``bench memory`` builds its ranks here too."""
    from pipeline.train.engine import DeviceFacts, resolve_precision
    from pipeline.train.worker import TrainState, build_rank_engine

    use_cuda = _use_cuda(cfg)
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, DeviceFacts.detect(use_cuda))
    engine, aux = build_rank_engine(cfg, {}, rank, world, device, precision)
    return SimpleNamespace(cfg=cfg, engine=engine, aux=aux, device=device, precision=precision, state=TrainState(),
                           stream=SimpleNamespace(steps_per_epoch=steps_per_epoch), clock=None)


def _batches(share: torch.Tensor, batch: int):
    """This rank's micro-batches, round and round its share, as the stream would hand them over."""
    starts = range(0, len(share) - batch + 1, batch)
    while True:
        for s in starts:
            yield {"image": share[s:s + batch]}


def _steps(w: SimpleNamespace, batches, steps: int) -> None:
    from pipeline.train.step import train_step
    from pipeline.train.timers import phase

    done = 0
    while done < steps:
        with phase(w.clock, "data_wait"):
            batch = next(batches)
        out = train_step(w, batch)
        if out["boundary"]:
            done += 1
            w.state.step += 1

"""Benchmarks behind ``vaepipe bench``: measured against a baseline in the same invocation.

``throughput`` trains the configured model twice on the same shards and batch size:
a plain single-process PyTorch loop (the baseline), then the full pipeline (Ray Train
workers + DeepSpeed). Both exclude start-up: the baseline times steps after a warm-up,
the pipeline's figure is the mean of its ``images_per_sec`` windows after the first.

``asha`` runs one sweep's trials twice on the same Ray instance: with ASHA, then with
every trial run to the end (FIFO, no early stopping), and compares the wall times.

``read`` streams the same shard set from several places (a local folder, its copy on S3)
through one rank's ``ShardStream``, without a model, and compares images/s.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from pipeline.config import VaepipeConfig


def plain_pytorch_images_per_sec(cfg: VaepipeConfig, steps: int, warmup: int = 5) -> float:
    """Single process, no Ray, no DeepSpeed: the same model, optimizer, clipping and data stream."""
    from models import build_model
    from pipeline.data.stream import ShardStream

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    stream = ShardStream(cfg.data.path, "train", cfg.data.batch_size, cfg.data.resolution, 0, 1,
                         seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         num_workers=cfg.data.loader_workers, channels=cfg.data.channels,
                         binarize=cfg.data.binarize)
    done, epoch, t0 = 0, 0, None
    while done < warmup + steps:
        for batch in stream.iter_epoch(epoch):
            if done == warmup:
                t0 = time.perf_counter()
            loss = model(batch["image"], beta=cfg.model.beta, free_bits=cfg.schedule.free_bits)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            done += 1
            if done == warmup + steps:
                break
        epoch += 1
    return steps * cfg.data.batch_size / (time.perf_counter() - t0)


def pipeline_images_per_sec(cfg: VaepipeConfig, steps: int) -> tuple[float, str]:
    """The full pipeline for ``steps`` steps; mean images/s over log windows after the first."""
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    log_every = max(1, steps // 6)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=steps, log_every=log_every, checkpoint_every=steps,
                                     image_every=steps, val_every=steps),
                  data=replace(cfg.data, val_batches=0), tracking=replace(cfg.tracking, log_model=False, register_name=None))
    result = run_training(cfg)
    history = make_client(result.tracking_uri).get_metric_history(result.run_id, "images_per_sec")
    values = [m.value for m in sorted(history, key=lambda m: m.step)][1:] or [history[-1].value]
    return statistics.mean(values), result.run_id


def throughput(cfg: VaepipeConfig, steps: int) -> dict:
    baseline = plain_pytorch_images_per_sec(cfg, steps)
    distributed, run_id = pipeline_images_per_sec(cfg, steps)
    return {
        "resolution": cfg.data.resolution, "batch_size_per_worker": cfg.data.batch_size, "steps": steps,
        "model": cfg.model.name, "latent_dim": cfg.model.latent_dim,
        "plain_pytorch_images_per_sec": baseline,
        "pipeline_images_per_sec": distributed,
        "pipeline_workers": cfg.dist.num_workers, "zero_stage": cfg.dist.zero_stage,
        "ratio": distributed / baseline, "pipeline_run_id": run_id,
        "torch_threads_baseline": torch.get_num_threads(),
    }


def read_images_per_sec(url: str, batch_size: int, resolution: int, repeats: int,
                        loader_workers: int = 0) -> list[float]:
    """images/s of each of ``repeats`` whole epochs of the train split through one rank's
    ``ShardStream`` (open or GET, untar, decode, resize, shuffle, batch); no model."""
    from pipeline.data.stream import ShardStream

    stream = ShardStream(url, "train", batch_size, resolution, 0, 1, num_workers=loader_workers)
    rates = []
    for epoch in range(repeats):
        n, t0 = 0, time.perf_counter()
        for batch in stream.iter_epoch(epoch):
            n += int(batch["image"].shape[0])
        rates.append(n / (time.perf_counter() - t0))
    return rates


def asha_speedup(cfg: VaepipeConfig, space: dict, seed: int = 0) -> dict:
    """Wall time of a sweep under ASHA against the same trials all run to ``train.max_steps``.

    The trials are drawn once (:func:`pipeline.tune.draw_trials`), so both sweeps train the
    same configurations with the same concurrency. ASHA runs first: whatever the first sweep
    pays for cold caches counts against ASHA, not for it.
    """
    from pipeline.tune import draw_trials, run_sweep

    trials = draw_trials(space, cfg.tune.num_samples, seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"trials": len(trials), "max_steps": cfg.train.max_steps, "workers_per_trial": cfg.dist.num_workers}
    for scheduler in ("asha", "fifo"):
        run_cfg = replace(cfg, tune=replace(cfg.tune, scheduler=scheduler, search="random", register_best=False,
                                            name=f"bench-{scheduler}-{stamp}"))
        t0 = time.perf_counter()
        summary = run_sweep(run_cfg, space, points=trials)
        wall = time.perf_counter() - t0
        rows = summary["trials"]
        out[scheduler] = {
            "wall_s": wall,
            "trial_steps": sum(int(r["last_step"]) for r in rows),
            "stopped": sorted(int(r["last_step"]) for r in rows if r["status"] == "stopped"),
            "failed": summary["failed"],
            "best": summary["best"][cfg.tune.metric],
            "parent_run_id": summary["parent_run_id"],
        }
    out["speedup"] = out["fifo"]["wall_s"] / out["asha"]["wall_s"]
    out["trial_steps_ratio"] = out["fifo"]["trial_steps"] / max(out["asha"]["trial_steps"], 1)
    return out

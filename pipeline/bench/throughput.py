"""``vaepipe bench throughput``: trains the configured model twice on the same shards and batch size:
a plain single-process PyTorch loop (the baseline), then the full pipeline (Ray Train
workers + DeepSpeed). Both exclude start-up: the baseline times steps after a warm-up,
the pipeline's figure is the mean of its ``images_per_sec`` windows after the first.
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

"""The bare single-process PyTorch loop every pipeline figure is compared with.

What a user writes by hand (and what pythae's trainer does): the data set decoded once into
one in-memory tensor, a random permutation per epoch, the model, ``torch.optim.Adam``,
gradient clipping, no Ray, no DeepSpeed, no streaming, no logging. It runs in one process
with as many threads as the pipeline's workers have CPUs in total, at the pipeline's global
batch, so both sides do the same arithmetic on the same cores. bf16 is done as DeepSpeed does
it (bf16 weights and activations, an fp32 master copy that Adam updates), not with
``torch.autocast``, which on CPU casts per op and is several times slower here.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from pipeline.config import VaepipeConfig
from pipeline.train.timers import PhaseClock


@dataclass
class BaselineResult:
    images_per_sec: float
    ms_per_step: dict  # forward, backward, optimizer, data_wait (indexing the tensor)
    threads: int
    global_batch: int
    compiled: bool = False
    channels_last: bool = False


def load_in_memory(cfg: VaepipeConfig, max_images: int) -> torch.Tensor:
    """The train split decoded and resized once, as the stream would hand it over (float in [0, 1])."""
    from pipeline.data.stream import ShardStream

    stream = ShardStream(cfg.data.path, "train", 64, cfg.data.resolution, 0, 1, seed=cfg.train.seed,
                         shuffle_buffer=0, num_workers=0, channels=cfg.data.channels, binarize=cfg.data.binarize)
    images, n = [], 0
    for batch in stream.iter_epoch(0):
        images.append(batch["image"])
        n += len(batch["image"])
        if n >= max_images:
            break
    return torch.cat(images)[:max_images].contiguous()


def global_batch(cfg: VaepipeConfig) -> int:
    return cfg.data.batch_size * cfg.train.grad_accum_steps * cfg.dist.num_workers


def total_threads(cfg: VaepipeConfig) -> int:
    return max(1, int(cfg.dist.num_workers * cfg.dist.cpus_per_worker))


def run_baseline(cfg: VaepipeConfig, data: torch.Tensor, steps: int, warmup: int = 5,
                 compiled: bool = False, channels_last: bool = False) -> BaselineResult:
    """Time ``steps`` optimizer steps after ``warmup`` untimed ones; ``compiled``: the model under
    ``torch.compile`` (inductor, compiled during the first warm-up step); ``channels_last``: its
    convolutions on NHWC input as vaepipe runs them (``train.channels_last``), which a plain
    loop does not do."""
    with bare_threads(cfg):
        model, opt = build_bare(cfg, channels_last)
        if compiled:
            model.compile()  # in place: the parameters (and Adam's references to them) stay the same
        batch = global_batch(cfg)
        train_steps(cfg, model, opt, data, batch, warmup, PhaseClock())
        clock = PhaseClock()
        t0 = time.perf_counter()
        train_steps(cfg, model, opt, data, batch, steps, clock)
        elapsed = time.perf_counter() - t0
        return BaselineResult(steps * batch / elapsed, clock.take(steps), total_threads(cfg), batch, compiled,
                              channels_last)


@contextlib.contextmanager
def bare_threads(cfg: VaepipeConfig) -> Iterator[None]:
    """The loop's threads: as many as the pipeline's workers have CPUs in total; put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(total_threads(cfg))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_bare(cfg: VaepipeConfig, channels_last: bool = False) -> tuple[torch.nn.Module, "PlainAdam"]:
    """The model from ``train.seed`` and its optimizer, as a user's loop builds them."""
    from models import build_model
    from pipeline.train.memory_format import apply_channels_last

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if channels_last:
        apply_channels_last(model)
    return model, MasterWeights(model, cfg) if cfg.train.precision == "bf16" else PlainAdam(model, cfg)


class PlainAdam:
    """fp32: Adam on the model's own parameters, gradients clipped by their global norm."""

    def __init__(self, model: torch.nn.Module, cfg: VaepipeConfig) -> None:
        self.params, self.clip = list(model.parameters()), cfg.optim.grad_clip
        self.opt = torch.optim.Adam(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=cfg.optim.fused)
        self.dtype = torch.float32

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()


class MasterWeights(PlainAdam):
    """bf16 the way DeepSpeed does it: the model in bf16, Adam on an fp32 copy written back."""

    def __init__(self, model: torch.nn.Module, cfg: VaepipeConfig) -> None:
        from pipeline.train.engine import match_norm_buffers

        self.model = model.to(torch.bfloat16)
        match_norm_buffers(model, "bf16")
        self.master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
        self.opt = torch.optim.Adam(self.master, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), fused=cfg.optim.fused)
        self.params, self.clip, self.dtype = self.master, cfg.optim.grad_clip, torch.bfloat16

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        for m, p in zip(self.master, self.model.parameters()):
            m.grad = None if p.grad is None else p.grad.float()
        super().step()
        with torch.no_grad():
            for m, p in zip(self.master, self.model.parameters()):
                p.copy_(m)


def train_steps(cfg, model, opt, data: torch.Tensor, batch: int, steps: int, clock: PhaseClock,
                fresh_bits: bool = False) -> None:
    """``steps`` optimizer steps on random permutations of ``data``; ``fresh_bits``: a new Bernoulli
    draw of each batch's grey levels (dynamic binarisation, which the stream draws per epoch)."""
    if len(data) < batch:
        raise ValueError(f"the baseline needs at least one global batch ({batch} images); {cfg.data.path} gave {len(data)}")
    perm, pos = torch.randperm(len(data)), 0
    for _ in range(steps):
        with clock.phase("data_wait"):
            if pos + batch > len(data):
                perm, pos = torch.randperm(len(data)), 0
            x = data[perm[pos:pos + batch]]
            x = (torch.bernoulli(x) if fresh_bits else x).to(opt.dtype)
            pos += batch
        with clock.phase("forward"):
            loss = model(x, beta=cfg.model.beta, free_bits=cfg.schedule.free_bits)["loss"]
        with clock.phase("backward"):
            opt.zero_grad()
            loss.backward()
        with clock.phase("optimizer"):
            opt.step()

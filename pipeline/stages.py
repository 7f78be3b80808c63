"""The progressive-growing stage schedule: which stage, alpha and batch a run is at, from images seen.

Pure arithmetic on the typed config (no torch, no DeepSpeed), so the schedule is testable and
the same on every rank. Lengths are in *images* summed over workers, never steps: the batch
changes from stage to stage, so a step is different work in each.

A stage trains ``progressive.stage_images`` images (the last ``final_stage_images`` when set). Every stage but the first opens with a
fade-in of ``fade_fraction`` of its length during which alpha rises linearly 0 -> 1, and its
first ``freeze_images`` images train only the new blocks. A *phase* is what the engine is
built for: (stage, frozen); the engine is rebuilt exactly when the phase changes.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the config computes max_steps from here, so no import back
    from pipeline.config import VaepipeConfig


@dataclass(frozen=True)
class Stage:
    index: int
    resolution: int
    start_image: int
    images: int
    fade_images: int
    batch_size: int
    grad_accum: int
    lr: float

    @property
    def end_image(self) -> int:
        return self.start_image + self.images


@dataclass(frozen=True)
class Phase:
    stage: Stage
    alpha: float
    frozen: bool

    @property
    def key(self) -> tuple[int, bool]:
        """What the engine is built for: a change of key means a rebuild."""
        return self.stage.index, self.frozen


def build_stages(cfg: VaepipeConfig) -> list[Stage]:
    """Stages start_resolution -> data.resolution with ProGAN-style per-resolution batch and lr."""
    p = cfg.progressive
    stages, start = [], 0
    n = int(math.log2(cfg.data.resolution // p.start_resolution)) + 1
    for i in range(n):
        res = p.start_resolution * 2**i
        slot = int(math.log2(res // 4))
        micro = p.batch_size[slot]
        accum = max(1, round(p.effective_batch / micro)) if p.effective_batch else 1
        length = p.final_stage_images if i == n - 1 and p.final_stage_images else p.stage_images
        fade = int(p.fade_fraction * length) if i > 0 else 0
        stages.append(Stage(i, res, start, length, fade, micro, accum, p.lr[slot]))
        start += length
    return stages


def total_images(stages: list[Stage]) -> int:
    return stages[-1].end_image


def images_per_step(stage: Stage, world_size: int) -> int:
    return stage.batch_size * stage.grad_accum * world_size


def phase_at(stages: list[Stage], images_seen: int, freeze_images: int = 0) -> Phase:
    """The phase after ``images_seen`` images (past the end: the last stage, alpha 1)."""
    stage = next((s for s in stages if images_seen < s.end_image), stages[-1])
    into = images_seen - stage.start_image
    alpha = min(1.0, into / stage.fade_images) if stage.fade_images else 1.0
    frozen = stage.index > 0 and into < freeze_images
    return Phase(stage, alpha, frozen)


def count_steps(stages: list[Stage], world_size: int) -> int:
    """Optimizer steps until every stage is done: a step's images count for the stage it ran in."""
    seen, steps = 0, 0
    for stage in stages:
        per_step = images_per_step(stage, world_size)
        n = max(0, math.ceil((stage.end_image - seen) / per_step))
        seen, steps = seen + n * per_step, steps + n
    return max(steps, 1)


def stage_config(cfg: VaepipeConfig, stage: Stage) -> VaepipeConfig:
    """``cfg`` as one stage sees it: its resolution, micro-batch, accumulation and learning rate.

    Everything downstream (DeepSpeed config, stream, logs) reads these fields, so the rest of
    the pipeline needs no notion of stages. ``model.resolution`` stays the final one.
    """
    out = copy.deepcopy(cfg)
    out.data.resolution, out.data.batch_size = stage.resolution, stage.batch_size
    out.train.grad_accum_steps, out.optim.lr = stage.grad_accum, stage.lr
    return out

"""VDVAE's gradient skipping: an update whose global gradient norm exceeds ``optim.skip_threshold``
is skipped on every rank together, and counted.

Deep hierarchical VAEs see rare huge gradients (a posterior far from its prior in one group, a
bad batch). Clipping still applies a step in that direction; VDVAE (Child 2021, §5) instead drops
the whole update when the norm is over a threshold, and counts how often that happens.

The norm that decides is the one DeepSpeed already computes for clipping, so the gate costs no
extra pass and no extra collective, and every rank sees the same value:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer.scaled_global_norm``) and ZeRO-3
  (``DeepSpeedZeroOptimizer_Stage3._get_norm_groups``): the gate wraps that method of this
  optimizer instance and reports an infinite norm when the real one is over the threshold.
  DeepSpeed treats a non-finite norm as an overflow: it zeroes the gradients, leaves weights and
  Adam's moments untouched, and counts the step in ``engine.skipped_steps``, exactly as for a NaN.
* Without ZeRO the all-reduced gradients sit in ``.grad`` on every rank: the training step asks
  ``over_threshold`` and drops them (``step.drop_nonfinite_grads``'s path).

Private DeepSpeed methods are reached here and in ``zero_step`` only; ``SUPPORTED`` names the
DeepSpeed versions this was written against and anything else fails loudly at install.
"""

from __future__ import annotations

import math
from typing import Any

import torch

SUPPORTED = ("0.19.",)


class GradSkipGate:
    """Counts the updates it vetoed and keeps the last pre-clip norm it saw (for logging)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = float(threshold)
        self.skips = 0
        self.last_norm = math.nan

    def veto(self, norm: float) -> bool:
        """Record ``norm`` (already unscaled); True when the update must be skipped."""
        self.last_norm = norm
        if math.isfinite(norm) and norm > self.threshold:
            self.skips += 1
            return True
        return False

    def state_dict(self) -> dict:
        return {"skips": self.skips}

    def load_state_dict(self, state: dict) -> None:
        self.skips = int(state.get("skips", 0))


def install(engine: Any, threshold: float) -> GradSkipGate | None:
    """Put a gate on ``engine``'s optimizer (this instance only); None when ``threshold`` is 0.

    Raises RuntimeError on a DeepSpeed version or optimizer the gate was not written for, rather
    than train with a threshold that silently does nothing.
    """
    if not threshold:
        return None
    import deepspeed

    if not deepspeed.__version__.startswith(SUPPORTED):
        raise RuntimeError(f"optim.skip_threshold needs DeepSpeed {' or '.join(SUPPORTED)}x; "
                           f"{deepspeed.__version__} is installed (pipeline/train/grad_skip.py)")
    gate = GradSkipGate(threshold)
    opt = getattr(engine, "optimizer", None)
    kind = _optimizer_kind(opt)
    if kind == "zero12":
        _wrap_scalar_norm(opt, gate)
    elif kind == "zero3":
        _wrap_group_norms(opt, gate)
    elif getattr(engine, "zero_optimization_stage", lambda: 0)() != 0:
        raise RuntimeError(f"optim.skip_threshold: no gate for optimizer {type(opt).__name__}; set it to 0")
    return gate


def _optimizer_kind(opt: Any) -> str:
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(opt, DeepSpeedZeroOptimizer):
        return "zero12"
    if isinstance(opt, DeepSpeedZeroOptimizer_Stage3):
        return "zero3"
    return "none"


def _wrap_scalar_norm(opt: Any, gate: GradSkipGate) -> None:
    """ZeRO-1/2: ``step`` reads a non-finite ``scaled_global_norm()`` as an overflow and skips
    (under bf16 only with ``check_grad_overflow``, DeepSpeed's default there)."""
    if opt.dtype == torch.bfloat16 and not opt.check_grad_overflow:
        raise RuntimeError("optim.skip_threshold needs DeepSpeed's bf16 check_grad_overflow (its default)")
    inner = opt.scaled_global_norm

    def gated(*args, **kwargs):
        norm = inner(*args, **kwargs)
        vetoed = gate.veto(float(norm) / float(opt.loss_scale))
        return torch.full_like(norm, math.inf) if vetoed else norm

    opt.scaled_global_norm = gated


def _wrap_group_norms(opt: Any, gate: GradSkipGate) -> None:
    """ZeRO-3: ``step`` combines ``_get_norm_groups()`` and skips on a non-finite result."""
    inner = opt._get_norm_groups

    def gated(*args, **kwargs):
        norms = inner(*args, **kwargs)
        total = math.sqrt(sum(float(n) ** 2 for n in norms))
        if gate.veto(total / float(opt.loss_scale)):
            return [torch.full_like(torch.as_tensor(n), math.inf) for n in norms]
        return norms

    opt._get_norm_groups = gated


def over_threshold(gate: GradSkipGate | None, params: list[torch.nn.Parameter]) -> bool:
    """Without ZeRO: the global norm of the (already all-reduced, so equal on every rank)
    ``.grad`` tensors, recorded by ``gate``; True when the update must be dropped."""
    if gate is None:
        return False
    local = torch.zeros((), dtype=torch.float32)
    for p in params:
        local += torch.linalg.vector_norm(p.grad, 2.0, dtype=torch.float32).square().cpu()
    return gate.veto(float(local.sqrt()))

"""One training step on one rank: forward, agreement on finiteness, backward, optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.train.collectives import any_rank
from pipeline.train.engine import backward_scale, input_dtype
from pipeline.train.grad_skip import over_threshold
from pipeline.train.schedules import kl_weight
from pipeline.train.timers import phase


def train_step(w: Any, batch: dict) -> dict[str, Any]:
    """One micro-batch: forward, finite check agreed by all ranks, backward, (boundary) step."""
    x = batch["image"].to(w.device).to(input_dtype(w.precision))
    beta = current_kl_weight(w)
    kwargs = {"beta": beta, "free_bits": w.cfg.schedule.free_bits}
    if w.cfg.schedule.target_kl:
        kwargs["target_kl"] = w.cfg.schedule.target_kl
    if w.aux is not None:
        kwargs["aux"] = w.aux.module
    with phase(getattr(w, "clock", None), "forward"):
        out = w.engine(x, **kwargs)
        loss = out["loss"]
        # A NaN on one rank must stop every rank's backward, or the others would apply a
        # poisoned gradient (bf16 ZeRO does not check it): agree first, then skip together.
        bad = any_rank(not torch.isfinite(loss).item(), w.device)
    if bad:
        # No rank ran backward or step, so DeepSpeed's micro-step counter did not move and
        # the next batch takes this one's place.
        return {"skipped": 1.0, "boundary": False}
    boundary = w.engine.is_gradient_accumulation_boundary()
    with phase(getattr(w, "clock", None), "backward"):
        scale = backward_scale(w.engine)
        w.engine.backward(loss if scale == 1.0 else loss * scale)
    gate = getattr(w.engine, "vaepipe_grad_gate", None)
    skips_before = gate.skips if gate is not None else 0
    with phase(getattr(w, "clock", None), "optimizer"):
        optimizer_step(w, boundary)
    outputs = step_outputs(w, out, beta, boundary)
    if boundary and gate is not None:
        w.state.grad_norm_skips += gate.skips - skips_before
        if math.isfinite(gate.last_norm):
            outputs["extras"]["grad_norm"] = gate.last_norm
    return outputs


def optimizer_step(w: Any, boundary: bool) -> None:
    """DeepSpeed's step. Without ZeRO a gradient the loop dropped (non-finite, or over
    ``optim.skip_threshold``) is stepped with clipping off for that call: DeepSpeed's fp32 clip
    fails on a model without a single gradient, and there is nothing to clip."""
    if not (boundary and w.cfg.dist.zero_stage == 0 and drop_nonfinite_grads(w)):
        w.engine.step()
        return
    config = w.engine._config
    clip, config.gradient_clipping = config.gradient_clipping, 0.0
    try:
        w.engine.step()
    finally:
        config.gradient_clipping = clip


def step_outputs(w: Any, out: dict, beta: float, boundary: bool) -> dict[str, Any]:
    """The step's figures as detached device tensors: the metric window sums them where they
    are and reads them back once per log, so no step waits on a device-to-host copy."""
    extras = {k: v.detach() if torch.is_tensor(v) else float(v) for k, v in out.get("metrics", {}).items()}
    if w.aux is not None:
        with phase(getattr(w, "clock", None), "auxiliary"):
            extras.update(w.aux.step(w.engine.module, out))
    return {
        "extras": extras,
        "boundary": boundary,
        "loss": out["loss"].detach(),
        "recon": out["recon"].detach(),
        "kl": out["kl"].detach(),
        "elbo": out["elbo"].detach(),
        "beta": beta,
        "kl_per_dim": out["kl_per_dim"].detach(),
        "skipped": 0.0,
    }


def current_kl_weight(w: Any) -> float:
    """The schedule's KL weight now, in steps or fractional epochs as configured."""
    sc, total_steps = w.cfg.schedule, w.cfg.train.max_steps
    if sc.unit == "epoch":
        per_epoch = max(w.stream.steps_per_epoch // w.cfg.train.grad_accum_steps, 1)
        return kl_weight(w.state.step / per_epoch, sc, w.cfg.model.beta, total_steps / per_epoch)
    return kl_weight(w.state.step, sc, w.cfg.model.beta, total_steps)


def drop_nonfinite_grads(w: Any) -> bool:
    """Without ZeRO, DeepSpeed applies any gradient: drop a non-finite one, or one whose norm is
    over ``optim.skip_threshold``, so Adam skips the step; True when dropped (and counted).

    Every rank holds the same all-reduced gradient here, so every rank decides the same.
    ZeRO 1-3 optimizers check overflow themselves and count it in ``engine.skipped_steps``.
    """
    params = [p for p in w.engine.module.parameters() if p.grad is not None]
    if not params:
        return False
    # the gate first: VDVAE's gradient skipping is a skipped update, as DeepSpeed counts it under ZeRO
    drop = over_threshold(getattr(w.engine, "vaepipe_grad_gate", None), params)
    if drop or not all(torch.isfinite(p.grad).all() for p in params):
        for p in params:
            p.grad = None
        w.state.skipped_steps += 1
        return True
    return False

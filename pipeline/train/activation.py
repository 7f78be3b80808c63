"""Activation checkpointing applied to a model from outside (the model stays unaware of it)."""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each block of ``model.checkpoint_blocks()`` in backward; returns how many.

    The per-instance ``forward`` is replaced rather than the module wrapped, so parameter
    names, state dicts and checkpoints are identical with and without checkpointing.
    Non-reentrant checkpointing is used: it works with ZeRO-3's parameter hooks and with
    inputs that do not require grad. BatchNorm running stats see the block twice per step
    (forward and recompute), which only changes their momentum slightly.
    """
    if not hasattr(model, "checkpoint_blocks"):
        raise ValueError(
            f"train.activation_checkpointing=true but model {type(model).__name__} has no "
            "checkpoint_blocks(); set it to false or add the method to the family"
        )
    count = 0
    for blocks in model.checkpoint_blocks():
        for block in blocks:
            original = block.forward
            block.forward = functools.partial(_checkpointed, original)
            count += 1
    return count


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)

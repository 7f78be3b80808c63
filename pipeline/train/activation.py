"""Activation checkpointing applied to a model from outside (the model stays unaware of it).

Which checkpointing vaepipe ships, and why (tests/integration/test_activation_checkpointing.py):

- torch's **non-reentrant** ``torch.utils.checkpoint`` on every block ``checkpoint_blocks()``
  names (every conv of the conv families' encoders and decoders). It works with ZeRO-3's
  parameter hooks, with inputs that do not require grad, and with frozen parameters.
- Not torch's reentrant variant, and not ``deepspeed.checkpointing.checkpoint`` (an autograd
  Function of the same reentrant kind): their output requires grad only when an *input* does,
  so a block behind a frozen one (progressive growing freezes earlier blocks) or fed the raw
  image silently gets no weight gradients at all.
- ZeRO-3 + non-reentrant + frozen parameters *inside* a checkpointed block: the recompute
  re-fires ZeRO-3's forward hooks, which re-partition the frozen weights in place while torch
  still holds them ("Recomputed values ... have different metadata", shape [0]). DeepSpeed
  0.19.8 (the pinned version) keeps frozen parameters gathered through a recompute
  (deepspeedai/DeepSpeed#8148); an older DeepSpeed crashes there. The 2-rank ZeRO-3 test
  freezes checkpointed blocks to keep this path covered.
"""

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

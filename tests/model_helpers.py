"""Shared helpers for the model-family tests (a plain module, imported by them)."""

from __future__ import annotations

import torch


def rectangles(n: int, channels: int = 1, resolution: int = 32) -> torch.Tensor:
    """Binary images of random axis-aligned rectangles: structured enough to overfit quickly."""
    x = torch.zeros(n, channels, resolution, resolution)
    for i in range(n):
        top, left = torch.randint(0, resolution // 2, (2,)).tolist()
        height, width = torch.randint(6, resolution // 2, (2,)).tolist()
        x[i, :, top:top + height, left:left + width] = 1.0
    return x


def like_deepspeed_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """What a bf16 DeepSpeed engine does: parameters to bf16, buffers (masks, codebooks) left as they are."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model

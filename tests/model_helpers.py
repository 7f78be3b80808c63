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

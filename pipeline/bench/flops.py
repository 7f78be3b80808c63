"""FLOPs per training image, counted by torch's own ``FlopCounterMode`` on one forward+backward,
and the dense peaks of the accelerators vaepipe reports utilisation against."""

from __future__ import annotations

from typing import Optional

import torch

from pipeline.config import VaepipeConfig

# dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, FLOP/s
DENSE_BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def flops_per_image(cfg: VaepipeConfig, batch: int = 2) -> float:
    """Forward + backward FLOPs of one image of ``cfg.model`` at ``cfg.data.resolution`` (matmuls
    and convolutions, as FlopCounterMode counts them; elementwise work is left out)."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model

    model = build_model(cfg.model)
    x = torch.rand(batch, cfg.data.channels, cfg.data.resolution, cfg.data.resolution)
    with FlopCounterMode(display=False) as counter:
        model(x, beta=1.0, free_bits=0.0)["loss"].backward()
    return counter.get_total_flops() / batch


def param_count(cfg: VaepipeConfig) -> int:
    from models import build_model

    return sum(p.numel() for p in build_model(cfg.model).parameters() if p.requires_grad)


def device_peak() -> Optional[tuple[str, float]]:
    """(name, dense bf16 FLOP/s) of this machine's CUDA device when it is one we know; else None."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in DENSE_BF16_PEAK.items():
        if key in name:
            return name, peak
    return None

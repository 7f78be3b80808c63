"""How a per-sample log-density is summed from its per-element terms.

Training sums in the terms' own dtype. Scoring (an importance-weighted bound, bits/dim) needs
more: a log-weight adds up thousands of per-pixel terms, and a float32 sum of 3,072 of them is
off by ~1e-7 relative (~1e-4 nats), more than the differences the bound ranks. Inside
``float64_sums()`` every per-sample sum of the likelihoods and of ``kl.diag_gaussian_log_prob``
accumulates in float64 while the network itself runs in its own precision, so evaluation does
not need a float64 copy of the model (several times slower on every kind of hardware).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_SUM_DTYPE: Optional[torch.dtype] = None  # None: the terms' own dtype


@contextlib.contextmanager
def float64_sums() -> Iterator[None]:
    """Per-sample sums accumulate in float64 inside the block (the result is float64 too)."""
    global _SUM_DTYPE
    before, _SUM_DTYPE = _SUM_DTYPE, torch.float64
    try:
        yield
    finally:
        _SUM_DTYPE = before


def sum_last(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-1)``, in float64 inside ``float64_sums()``."""
    return t.sum(dim=-1) if _SUM_DTYPE is None else t.sum(dim=-1, dtype=_SUM_DTYPE)


def sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    """The sum over every dim but the first, in float64 inside ``float64_sums()``."""
    return sum_last(t.flatten(start_dim=1))

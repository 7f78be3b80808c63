"""The few collectives the training loop issues itself (DeepSpeed issues the gradient ones).

Every helper is a no-op outside an initialised process group, so the same code runs in a
single-process test and on N Ray Train workers.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

# A blocking in-place SUM over every rank through DeepSpeed's shared-memory kernel, falling back
# to gloo for what the kernel cannot take (``local_allreduce.install`` sets it on one CPU node).
_sum_route: Optional[Callable] = None


def route_sums(fn: Optional[Callable]) -> None:
    """Send ``any_rank``'s SUM through ``fn`` (``fn(tensor)``, in place, blocking); None: gloo."""
    global _sum_route
    _sum_route = fn


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def all_reduce_values(values: list[float], device, op: str = "sum") -> list[float]:
    """Sum (or max) a short list of floats over ranks in one float64 collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist = _dist()
    if dist is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``t`` over ranks (VQ-VAE's EMA codebook statistics)."""
    dist = _dist()
    if dist is not None:
        dist.all_reduce(t)
    return t


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    dist = _dist()
    if dist is None:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, device) -> bool:
    """True on every rank when ``flag`` is true on any rank: one SUM of 0/1 flags in fp32 (exact),
    through the shared-memory kernel where it is installed (the loop asks this every micro-batch)."""
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float32, device=device)
    dist = _dist()
    if dist is not None:
        (_sum_route or dist.all_reduce)(t)
    return bool(t.item() > 0)


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1

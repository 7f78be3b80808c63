"""Where a training step's time goes: wall time per phase, summed over a log window.

Phases: ``data_wait`` (the stream's next batch), ``forward``, ``backward``, ``optimizer``
(DeepSpeed's step), ``communication`` and ``observe`` (logging, validation, images,
checkpoints, reports). Communication is not a phase of the loop but happens inside
``backward`` (gradient reduction) and ``optimizer`` (ZeRO's gathers, overflow flags): every
``torch.distributed`` collective is timed while a clock is active and its time is moved out
of the phase it ran in, so the phases add up to the wall time without counting it twice.
An asynchronous collective (DeepSpeed's ``overlap_comm``) is timed only while it is issued,
which is what it costs the loop.

CPU kernels are synchronous, so the figures are exact there. On CUDA they are only right when
the clock synchronises the device at each phase end, which itself costs time: ``sync=True``
(``train.phase_timers=on``); ``auto`` leaves the clock off on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Optional

import torch

PHASES = ("data_wait", "forward", "backward", "optimizer", "auxiliary", "communication", "observe")
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "all_gather", "all_gather_into_tensor", "broadcast", "all_to_all_single", "barrier",
               "all_gather_object", "broadcast_object_list")

_active: Optional["PhaseClock"] = None


class PhaseClock:
    """Per-phase wall time of one rank; ``take()`` returns ms per optimizer step and resets."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.current: Optional[str] = None
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(PHASES, 0.0)
        self.comm_in = dict.fromkeys(PHASES, 0.0)  # collective time spent inside each phase

    @contextlib.contextmanager
    def phase(self, name: str):
        outer, self.current = self.current, name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync and torch.cuda.is_available():
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.current = outer
            self.sums[name] += dt
            if outer is not None:  # a nested phase's time belongs to it, not to the outer one
                self.sums[outer] -= dt

    def add_comm(self, dt: float) -> None:
        if self.current is not None:
            self.comm_in[self.current] += dt

    def take(self, steps: int) -> dict[str, float]:
        """Milliseconds per optimizer step over the window, communication moved out; resets."""
        comm = sum(self.comm_in.values())
        ms = {p: 1000.0 * (self.sums[p] - self.comm_in[p]) / max(steps, 1) for p in PHASES}
        ms["communication"] = 1000.0 * comm / max(steps, 1)
        self.reset()
        return ms


def activate(clock: Optional[PhaseClock]) -> None:
    """Make ``clock`` the one collectives report to (None stops timing them)."""
    global _active
    _active = clock
    if clock is not None:
        patch_collectives()


def record_comm(seconds: float) -> None:
    """Count a collective issued outside ``torch.distributed`` (e.g. a shared-memory kernel)."""
    if _active is not None:
        _active.add_comm(seconds)


def phase(clock: Optional[PhaseClock], name: str):
    return clock.phase(name) if clock is not None else contextlib.nullcontext()


@functools.cache
def patch_collectives() -> None:
    """Wrap torch.distributed's collectives once per process; they count only while a clock is
    active. DeepSpeed looks most of them up at each call, but keeps ``all_gather_into_tensor``
    and ``reduce_scatter_tensor`` from when it creates its comm backend: call this before
    ``deepspeed.initialize``, or ZeRO's parameter all-gather is counted in the optimizer phase."""
    import torch.distributed as dist

    for name in COLLECTIVES:
        fn = getattr(dist, name, None)
        if fn is not None:
            setattr(dist, name, _timed(fn))


def _timed(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        clock = _active
        if clock is None:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.add_comm(time.perf_counter() - t0)
    return wrapper


def clock_for(setting: str, use_cuda: bool) -> Optional[PhaseClock]:
    """``train.phase_timers``: ``auto`` (on for CPU, off on CUDA), ``on`` (syncs on CUDA), ``off``."""
    if setting == "off" or (setting == "auto" and use_cuda):
        return None
    return PhaseClock(sync=use_cuda)


def timed_iter(batches, clock: Optional[PhaseClock]):
    """``batches`` with the wait for each one counted as ``data_wait``."""
    if clock is None:
        yield from batches
        return
    it = iter(batches)
    while True:
        with clock.phase("data_wait"):
            batch = next(it, None)
        if batch is None:
            return
        yield batch

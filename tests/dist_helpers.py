"""Run a function on N real processes joined by a gloo process group on 127.0.0.1 (no Ray).

For the collectives the training path issues itself: tests that must see two ranks disagree
(different data, a NaN on one rank) and agree again. Each rank's return value comes back
through a queue; an exception on any rank fails the test with that rank's traceback. The
processes are the ones ``vaepipe bench memory`` uses (``pipeline.bench.ranks``), on gloo and
the CPU even where a GPU exists.
"""

from __future__ import annotations

from pipeline.bench.ranks import run_fresh_ranks


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 240.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns the results in rank order."""
    return run_fresh_ranks(fn, world, args, timeout=timeout, threads=1, backend="gloo")

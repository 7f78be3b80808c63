"""Run a function on N real processes joined by a gloo process group on 127.0.0.1 (no Ray).

For the collectives the training path issues itself: tests that must see two ranks disagree
(different data, a NaN on one rank) and agree again. Each rank's return value comes back
through a queue; an exception on any rank fails the test with that rank's traceback. The
processes are the ones ``vaepipe bench memory`` uses (``pipeline.bench.ranks``), on gloo and
the CPU even where a GPU exists, forked from a server process that imported torch, DeepSpeed
and MLflow once per pytest process (a spawned pair of ranks spends ~11 core-seconds on imports).
"""

from __future__ import annotations

import multiprocessing

from pipeline.bench.ranks import run_fresh_ranks

# Third-party only: a vaepipe module imported in the server would carry its process-wide state
# (a patched collective, a cached backend) into every rank.
multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "deepspeed", "mlflow"])


def run_ranks(fn, world: int = 2, args: tuple = (), timeout: float = 240.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns the results in rank order."""
    return run_fresh_ranks(fn, world, args, timeout=timeout, threads=1, backend="gloo", start_method="forkserver")

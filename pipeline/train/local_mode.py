"""Local mode (``dist.num_workers=0``): one rank trained by vaepipe in the calling process.

No Ray cluster, no worker, controller or helper actor processes: ``trainer`` calls the same
``train_loop_per_worker`` a Ray Train worker runs, with a ``rank_context.LocalRank``. It is what
a user steps through in a debugger or tries first in a notebook, and how a sweep's trial trains
a one-rank model in its own process (a Tune trial). Ray Train has a local mode of its own
(``ScalingConfig(num_workers=0)``), but Ray 2.60 refuses ``ray.train``'s calls inside a Tune
trial and runs no callbacks there, so vaepipe runs the rank itself. What the run needs besides
the loop, provided here:

- a process group: DeepSpeed needs one even for a single rank. A gloo group of one rank on an
  in-memory store (no port), with the variables a launcher sets, for the run's duration; ended
  with DeepSpeed's own ``destroy_process_group`` so the next run in the process starts clean;
- checkpoint storage: each checkpoint is copied into the run folder (local or ``s3://``), named
  as Ray Train names its own, and the newest ``train.keep_checkpoints`` are kept. ``--resume``
  and the divergence rollback find them there as they find Ray's.

Not in local mode: restarts (``dist.max_failures``: an error ends the run with its message),
elastic sizes, preemption notices and Ray Train callbacks.
"""

from __future__ import annotations

import contextlib
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from pipeline.train.checkpoint import committed_checkpoints
from pipeline.train.engine import destroy_process_group
from pipeline.train.run_storage import Location, child, location, remove, upload

_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@contextlib.contextmanager
def one_rank_group() -> Iterator[None]:
    """A one-rank gloo group for the run's duration, and this process's torch thread count and
    environment put back after it."""
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("local mode (dist.num_workers=0) needs a process without a torch.distributed group")
    threads = torch.get_num_threads()
    added = {k: "0" if "RANK" in k else "1" for k in _RANK_ENV if k not in os.environ}
    os.environ.update(added)  # DeepSpeed reads LOCAL_RANK from the environment, as a launcher sets it
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_process_group()
        torch.set_num_threads(threads)
        for k in added:
            os.environ.pop(k, None)


def checkpoint_name() -> str:
    """A folder name as Ray Train's own (``checkpoint_<UTC time to the microsecond>``)."""
    return datetime.now(timezone.utc).strftime("checkpoint_%Y-%m-%d_%H-%M-%S.%f")


def persist(tmp: Path, run_dir: str, keep: int) -> Location:
    """Copy the checkpoint written in ``tmp`` into ``run_dir`` and drop committed ones past the
    newest ``keep``. Returns where it now lives."""
    dest = child(location(run_dir), checkpoint_name())
    upload(tmp, dest)
    for old in committed_checkpoints(location(run_dir))[keep:]:
        remove(old)
    return dest

"""Ray Train's local mode (``dist.num_workers=0``): the training function runs in this process.

``ScalingConfig(num_workers=0)`` makes Ray Train call the training function in the driver,
with no Ray cluster, no worker, controller or helper actor processes, and a one-rank train
context (Ray 2.60's ``LocalTorchController``). It is how a user steps through a training run
in a debugger or runs a notebook's first try. What Ray Train leaves out there, and vaepipe
provides for it here:

- a process group: DeepSpeed needs one even for a single rank. A gloo group of one rank on an
  in-memory store (no port), destroyed when the run ends, is made unless one exists (a run
  under ``torchrun``, where Ray's local controller makes the group itself);
- checkpoint storage: Ray's local mode keeps only the last reported ``Checkpoint`` object,
  so vaepipe copies each checkpoint into the run folder itself (local or ``s3://``), named as
  Ray names them, and keeps the newest ``train.keep_checkpoints``. ``--resume`` and the
  divergence rollback find them there as they find Ray's.

Not in local mode: restarts (``dist.max_failures``: an error ends the run with its own
message), elastic sizes, preemption notices, Tune sweeps and Ray Train callbacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

from pipeline.train.engine import destroy_process_group
from pipeline.train.run_storage import Location, child, is_remote, location, remove, upload

_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


def is_local(cfg) -> bool:
    return cfg.dist.num_workers == 0


@contextlib.contextmanager
def one_rank_group(local: bool) -> Iterator[None]:
    """A one-rank gloo group for the run's duration in local mode (nothing otherwise: Ray's
    workers get theirs from ``TorchConfig``), and this process's torch thread count put back."""
    import torch
    import torch.distributed as dist

    if not local or dist.is_initialized():
        yield
        return
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
    now = time.time()
    return "checkpoint_" + time.strftime("%Y-%m-%d_%H-%M-%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}"


def persist(tmp: Path, run_dir: str, keep: int, committed) -> Location:
    """Copy the checkpoint written in ``tmp`` into ``run_dir``; drop committed ones past the newest
    ``keep`` (``committed(run_dir)`` lists them newest first). Returns where it now lives."""
    dest = child(location(run_dir), checkpoint_name())
    if is_remote(dest):
        upload(tmp, dest)
    else:
        shutil.copytree(tmp, dest)
    for old in committed(location(run_dir))[keep:]:
        remove(old)
    return dest


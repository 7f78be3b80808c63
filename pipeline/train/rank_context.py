"""What a training rank asks of whatever launched it, behind one small interface.

A rank needs to know who it is (rank, world, ranks on its node, its GPU), where to report a
checkpoint, which checkpoint its launcher restored it with, and whether its node is being
preempted. Two launchers answer:

- ``RayTrainRank``: a Ray Train worker (``ray.train.get_context``, ``report``,
  ``get_checkpoint``, ``get_preemption_info``); the default.
- ``LocalRank``: local mode (``dist.num_workers=0``), one rank run by vaepipe in the calling
  process (``local_mode.py``). It persists each reported checkpoint into the run folder itself
  and can pass each report on to Ray Tune, so a sweep's trial can train in its own process
  (Ray Train's own local mode cannot: Ray 2.60 refuses ``ray.train``'s calls in a Tune session).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from pipeline.train.run_storage import Location


class RayTrainRank:
    """A Ray Train worker's answers (the context Ray Train gives ``train_loop_per_worker``)."""

    def __init__(self) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_world_size = ctx.get_local_world_size()

    def cuda_device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    uploads_async = True  # CheckpointUploadMode.ASYNC

    def report(self, metrics: dict, folder: Path, asynchronous: bool = False, validate: bool = False) -> None:
        """Report ``folder`` (this rank's part of the checkpoint): Ray Train persists and merges it.
        With ``asynchronous`` it uploads in a background thread, then deletes ``folder``; with
        ``validate`` it hands the checkpoint to the run's validation task (``checkpoint_validation``)."""
        import ray.train
        from ray.train import CheckpointUploadMode

        mode = CheckpointUploadMode.ASYNC if asynchronous else CheckpointUploadMode.SYNC
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder),
                         checkpoint_upload_mode=mode, delete_local_checkpoint_after_upload=asynchronous,
                         validation=validate)

    @contextlib.contextmanager
    def launch_checkpoint(self) -> Iterator[Optional[Location]]:
        """The checkpoint Ray Train restarted this worker group with, where it lives (a local folder
        or S3) or, on another filesystem, downloaded for the duration; None on a first start."""
        import ray.train

        from pipeline.train.run_storage import checkpoint_location

        ckpt = ray.train.get_checkpoint()
        where = checkpoint_location(ckpt) if ckpt is not None else None
        if ckpt is not None and where is None:
            with ckpt.as_directory() as local:
                yield local
            return
        yield where

    def preemption_info(self):
        import ray.train

        return ray.train.get_preemption_info()


class LocalRank:
    """Local mode's one rank: checkpoints go into the run folder (the newest ``keep`` kept), and
    each report goes to ``sink`` too when one is given (``ray.tune.report`` in a sweep's trial)."""

    rank, world_size, local_world_size = 0, 1, 1

    def __init__(self, run_dir: str, keep: int, sink: Optional[Callable[[dict], None]] = None,
                 validator: Optional[Callable[[Any], dict]] = None) -> None:
        self.run_dir, self.keep, self.sink, self.validator = run_dir, keep, sink, validator
        self.metrics: dict = {}
        self.checkpoint: Optional[Location] = None

    def cuda_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device())

    uploads_async = False  # the copy into the run folder is made in report

    def report(self, metrics: dict, folder: Path, asynchronous: bool = False, validate: bool = False) -> None:
        """Copy ``folder`` into the run folder now; with ``validate``, validate it first, here."""
        from pipeline.train.local_mode import persist

        metrics = dict(metrics)
        if validate and self.validator is not None:
            from ray.train import Checkpoint

            metrics.update(self.validator(Checkpoint.from_directory(str(folder))))
        self.checkpoint = persist(folder, self.run_dir, self.keep)
        self.metrics = metrics
        if self.sink is not None:  # what Tune's TuneReportCallback sends it for a Ray Train run
            self.sink({**metrics, "checkpoint_path": str(self.checkpoint)})

    @contextlib.contextmanager
    def launch_checkpoint(self) -> Iterator[Optional[Location]]:
        yield None  # no launcher restarts: --resume and the run folder are the only sources

    def preemption_info(self):
        return None  # no preemption watcher in this process

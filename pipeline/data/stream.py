"""Per-rank streaming of WebDataset shards into fixed-size training batches.

Used inside Ray Train workers but deliberately free of Ray: the caller passes ``rank`` and
``world_size``, so the same class runs in a unit test, a notebook or any launcher.

Guarantees the training loop relies on:

* **Equal steps on every rank.** ``steps_per_epoch = num_samples // (world_size * batch_size)``
  for every rank, whatever the shard sizes; a rank whose share runs dry starts over on its
  shards rather than finishing early (a rank that stops while the others wait in an
  all-reduce hangs the job). A split with fewer than ``world_size * batch_size`` samples is
  an error, not a silent one-step epoch.
* **Full batches.** Every training batch has exactly ``batch_size`` samples.
* **Disjoint shares.** With at least ``world_size * max(num_workers, 1)`` shards, each
  (rank, DataLoader worker) slot reads its own shards; with fewer, every slot reads all
  shards and keeps every ``slots``-th sample, so no slot ever gets an empty stream.
* **Corrupt samples are skipped and counted** (``batch["n_corrupt"]``), never fatal.
* **Binarisation** (``binarize``, see ``pipeline.data.binarize``) is applied after the resize
  and grayscale conversion: training batches get the configured draw, ``iter_eval`` the
  deterministic per-key (static) draw whenever the data is binarised at all.
* **Cheap resume.** ``iter_epoch(epoch, start_step)`` drops ``start_step`` batches' worth of
  raw samples *after* the shuffle buffer but *before* decoding, so the remaining batches are
  those an uninterrupted run would have produced, up to corrupt samples met while skipping
  (skipping cannot tell them apart without decoding) and the order in which DataLoader
  workers' batches interleave. Resume positions are therefore exact in the usual case and
  approximate by at most a few samples otherwise.

Shards are read as streams (``tarfile`` in pipe mode over ``storage.open_read``), so an
``s3://`` shard is never downloaded whole before its first sample is used.
"""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader

from pipeline.data import storage
from pipeline.data.binarize import check_mode, for_eval
from pipeline.data.epoch_reader import DecodedCache, SliceDataset, iter_shard_or_skip, shard_order
from pipeline.data.shards import read_manifest
from pipeline.seeds import mixed_seeds

log = logging.getLogger(__name__)


def split_code(split: str) -> int:
    """A stable small number per split name (``hash`` of a str changes between processes)."""
    return {"train": 0, "valid": 1, "test": 2}.get(split, 3)


class ShardStream:
    """This rank's view of a shard set: fixed-size shuffled training batches and eval batches."""

    def __init__(self, url: str, split: str, batch_size: int, resolution: int, rank: int, world_size: int,
                 seed: int = 0, shuffle_buffer: int = 1000, num_workers: int = 1, channels: int = 3,
                 mp_context: Optional[str] = None, binarize: str = "none", cache_mb: int = 0):
        check_mode(binarize)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if batch_size < 1 or channels not in (1, 3) or num_workers < 0:
            raise ValueError(f"batch_size={batch_size} (>= 1), channels={channels} (1 or 3), "
                             f"num_workers={num_workers} (>= 0): one of these is invalid")
        self.url, self.split, self.batch_size, self.resolution = url, split, batch_size, resolution
        self.rank, self.world_size, self.seed, self.shuffle_buffer = rank, world_size, seed, shuffle_buffer
        self.num_workers, self.channels, self.mp_context = num_workers, channels, mp_context
        self.binarize = binarize
        if cache_mb and num_workers:
            raise ValueError(f"cache_mb={cache_mb} needs num_workers=0 (is {num_workers})")
        self.cache = DecodedCache(cache_mb * 2**20) if cache_mb else None  # training batches only
        self.manifest = read_manifest(url)
        self.num_samples = self._split_info(split)["num_samples"]
        self.set_shape(resolution, batch_size)
        self.epoch, self.step_in_epoch = 0, 0
        self.segments: list[dict] = []  # layouts this epoch went through before this one (resplit)
        self._remainder: Optional[list[str]] = None  # the keys left for this layout, after a re-split

    def set_shape(self, resolution: int, batch_size: int) -> None:
        """Batches of ``batch_size`` images at ``resolution`` from the next ``iter_epoch`` on (a
        progressive run's stage switch; the shards stay the stored high-resolution ones)."""
        stored = self.manifest["resolution"]
        if resolution > stored:
            raise ValueError(f"resolution {resolution} is larger than the stored resolution {stored} of {self.url}: "
                             "re-shard at a higher resolution or train at <= the stored one")
        steps = self.num_samples // (self.world_size * batch_size)
        if steps < 1:
            raise ValueError(f"split {self.split!r} of {self.url} has {self.num_samples} samples, fewer than "
                             f"world_size*batch_size = {self.world_size}*{batch_size}: lower the batch size")
        if self.cache is not None and resolution != self.resolution:
            self.cache = DecodedCache(self.cache.max_bytes)  # it holds the old resolution's pixels
        self.resolution, self.batch_size, self.steps_per_epoch = resolution, batch_size, steps

    def _split_info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise KeyError(f"split {split!r} not in {self.url}: it has {sorted(self.manifest['splits'])}")
        return self.manifest["splits"][split]

    def _plan(self, split: str, urls: list[str], epoch: int, start_step: int, steps: Optional[int],
              train: bool, rank: Optional[int] = None, world_size: Optional[int] = None,
              remainder: Optional[list[str]] = None) -> dict:
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        return {"split": split, "urls": urls, "rank": rank, "world_size": world_size, "seed": self.seed,
                "remainder": remainder,
                "epoch": epoch, "start_step": start_step, "steps": steps, "batch_size": self.batch_size,
                "shuffle_buffer": self.shuffle_buffer if train else 0, "repeat": train,
                "resolution": self.resolution, "channels": self.channels,
                "binarize": self.binarize if train else for_eval(self.binarize),
                "attr_names": list(self.manifest["attr_names"]), "factor_names": list(self.manifest["factor_names"])}

    def _loader(self, plan: dict):
        dataset = SliceDataset(plan, self.cache if plan["repeat"] and plan["split"] == self.split else None)
        if self.num_workers == 0:
            return iter(dataset)
        # its own generator: a DataLoader draws its workers' base seed from torch's global RNG at
        # every iterator, which would shift the training noise after a mid-epoch resume
        (loader_seed,) = mixed_seeds(self.seed, plan["epoch"], plan["rank"], split_code(plan["split"]))
        generator = torch.Generator().manual_seed(loader_seed)
        return iter(DataLoader(dataset, batch_size=None, num_workers=self.num_workers,
                               multiprocessing_context=self.mp_context, generator=generator))

    def _urls(self, split: str) -> list[str]:
        return [storage.join(self.url, s["name"]) for s in self._split_info(split)["shards"]]

    def epoch_plan(self, epoch: int, start_step: int, rank: Optional[int] = None, world_size: Optional[int] = None,
                   remainder: Optional[list[str]] = None) -> dict:
        """The training plan of ``epoch`` for a rank (this one by default), optionally re-split."""
        world_size = self.world_size if world_size is None else world_size
        urls = shard_order(self._urls(self.split), self.seed, epoch, world_size, self.cache is not None)
        steps = self.steps_per_epoch if remainder is None else len(remainder) // (world_size * self.batch_size)
        return self._plan(self.split, urls, epoch, start_step, steps, True, rank, world_size, remainder)

    def all_keys(self) -> list[str]:
        """Every key of the stream's split, in shard order (reads the shards, decodes nothing)."""
        return [s["__key__"] for url in self._urls(self.split) for s in iter_shard_or_skip(url) if "__error__" not in s]

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of ``epoch`` for this layout: fewer in an epoch re-split after a world-size change."""
        if epoch == self.epoch and self.segments:
            return len(self._resplit_remainder(epoch)) // (self.world_size * self.batch_size)
        return self.steps_per_epoch

    def _resplit_remainder(self, epoch: int) -> list[str]:
        from pipeline.data.resplit import remainder_keys

        if self._remainder is None:
            self._remainder = remainder_keys(self, epoch, self.segments)
        return self._remainder

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Yield batches ``start_step..steps-1`` of ``epoch`` (same count on every rank).

        The shard order and shuffle are seeded by ``seed`` and ``epoch`` (identical on all ranks,
        so shard shares stay disjoint), hence an epoch replays identically on resume. An epoch
        resumed on another world size deals out only what the earlier layouts left (``resplit``).
        """
        if epoch != self.epoch:
            self.segments, self._remainder = [], None  # a re-split lasts until its epoch ends
        steps = self.steps_in_epoch(epoch)
        if not 0 <= start_step <= steps:
            raise ValueError(f"start_step={start_step} outside [0, steps of epoch {epoch} = {steps}]")
        self.epoch, self.step_in_epoch = epoch, start_step
        if start_step == steps:
            return
        remainder = self._resplit_remainder(epoch) if self.segments else None
        plan = self.epoch_plan(epoch, start_step, remainder=remainder)
        for batch in self._loader(plan):
            self.step_in_epoch += 1  # counted as consumed once handed out: a checkpoint after it resumes past it
            yield batch

    def iter_eval(self, split: Optional[str] = None, max_batches: Optional[int] = None) -> Iterator[dict]:
        """This rank's share of ``split`` (default: the stream's split), unshuffled, read once.

        Every sample of the split goes to exactly one rank; the last batch of each loader worker
        may be short and ranks may differ by a batch, so reduce metrics once after the loop, not
        per batch (or pass ``max_batches`` small enough for every rank to fill it).
        """
        split = split or self.split
        plan = self._plan(split, self._urls(split), 0, 0, max_batches, train=False)
        yield from self._loader(plan)

    def state_dict(self) -> dict:
        """Data position: the epoch, how many of its batches this layout handed out, the layout
        (world size, loader workers) and the layouts the epoch went through before it."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "world_size": self.world_size,
                "workers": self.num_workers, "segments": list(self.segments)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position; a finished epoch becomes the start of the next one. A position saved
        by another layout (world size or loader workers) mid-epoch re-splits the rest of the epoch.

        Resume with ``for e in range(s.epoch, n): s.iter_epoch(e, s.step_in_epoch if e == s.epoch else 0)``
        after reading ``s.epoch``/``s.step_in_epoch`` once.
        """
        epoch, step = int(state["epoch"]), int(state["step_in_epoch"])
        segments = list(state.get("segments", []))
        old = {"world_size": int(state.get("world_size", self.world_size)),
               "workers": int(state.get("workers", self.num_workers))}
        if old != {"world_size": self.world_size, "workers": self.num_workers} and step > 0:
            segments, step = segments + [{**old, "steps": step}], 0  # deal out what that layout left
        self.epoch, self.segments, self._remainder = epoch, segments, None
        if step >= self.steps_in_epoch(epoch):
            epoch, step, self.segments, self._remainder = epoch + 1, 0, [], None
        self.epoch, self.step_in_epoch = epoch, step

"""Re-splitting an epoch over a new number of ranks, without a sample lost or seen twice.

When a run resumes mid-epoch on another world size (an elastic restart, a resume on fewer or
more workers), the old layout's shares no longer exist. The epoch's *remainder* is what no old
rank consumed: each old rank's DataLoader workers are replayed from their seeds (raw samples
only, nothing decoded) to find the first samples each handed out; the split minus those,
ordered by a seeded hash of the key, is dealt out to the new ranks (``rank::world``). A later
change inside the same epoch repeats this over the remainder of the remainder, so the data
state carries the chain of layouts (``segments``) the epoch went through.

Every rank of the new layout reads every shard of the split once for the rest of that epoch
(keeping only its keys); from the next epoch on the usual shard-level split is back.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Optional

from pipeline.data.epoch_reader import SliceDataset, batches_of_worker


def hashed_order(keys: Iterable[str], seed: int, epoch: int) -> list[str]:
    """``keys`` in a seeded pseudo-random order that every rank computes the same."""
    return sorted(set(keys), key=lambda k: hashlib.sha1(f"{seed}-{epoch}-{k}".encode()).hexdigest())


def consumed_keys(stream, epoch: int, segment: dict, remainder: Optional[list[str]]) -> set[str]:
    """Keys the ranks of ``segment`` (``world_size``, ``workers``, ``steps``) handed out in ``epoch``."""

    nw = max(int(segment["workers"]), 1)
    world, steps, batch = int(segment["world_size"]), int(segment["steps"]), stream.batch_size
    seen: set[str] = set()
    for rank in range(world):
        plan = stream.epoch_plan(epoch, 0, rank=rank, world_size=world, remainder=remainder)
        dataset = SliceDataset(plan)
        for worker in range(nw):
            n = batches_of_worker(worker, nw, 0, steps) * batch
            for i, sample in enumerate(dataset.raw_for(worker, nw)):
                if i >= n:
                    break
                seen.add(sample["__key__"])
    return seen


def remainder_keys(stream, epoch: int, segments: list[dict]) -> list[str]:
    """What the layouts in ``segments`` (oldest first) left of ``epoch``, in the seeded order."""
    everything = stream.all_keys()
    remainder: Optional[list[str]] = None
    consumed: set[str] = set()
    for segment in segments:
        consumed |= consumed_keys(stream, epoch, segment, remainder)
        remainder = hashed_order((k for k in everything if k not in consumed), stream.seed, epoch)
    return remainder if remainder is not None else hashed_order(everything, stream.seed, epoch)

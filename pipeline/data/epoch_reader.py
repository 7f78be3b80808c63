"""Reading one epoch's slice of WebDataset shards on one rank: tar members to samples, decode,
shuffle buffer, batches, the decoded cache, and which shards and batches each DataLoader worker
owns. ``ShardStream`` (``stream.py``) plans epochs and positions; the re-split of an epoch on
another world size (``resplit.py``) replays plans through the same ``SliceDataset``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import posixpath
import random
import tarfile
from typing import Iterator, Optional

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import storage
from pipeline.data.binarize import binarize_pixels
from pipeline.data.shards import DECODE_ERRORS, IMAGE_FORMATS

log = logging.getLogger(__name__)

_BAD_SAMPLE = DECODE_ERRORS + (KeyError, TypeError, AttributeError)
_MAX_CORRUPT_IN_A_ROW = 10_000


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Stream ``{"__key__": key, ext: bytes...}`` samples from one tar, WebDataset-style.

    Consecutive members sharing a key (path up to the first dot of the file name) form one sample.
    """
    try:
        with contextlib.closing(storage.open_read(url)) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            sample: Optional[dict] = None
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = posixpath.split(member.name)
                key, _, ext = base.partition(".")
                key = posixpath.join(folder, key)
                data = tar.extractfile(member).read()
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample = None
                sample = sample or {"__key__": key}
                sample[ext.lower()] = data
            if sample is not None:
                yield sample
    except tarfile.TarError as err:
        raise OSError(f"shard {url} is not a readable tar ({err}): run verify_shards on the data set "
                      "and re-shard it") from err


def iter_shard_or_skip(url: str) -> Iterator[dict]:
    """``iter_tar_samples`` that survives a shard cut off mid-stream or gone since the manifest:
    the samples read so far are kept, the failure is logged with the shard and the last key, and
    one ``{"__error__": ...}`` marker is yielded so the batcher counts it as a corrupt sample."""
    last = None
    try:
        for sample in iter_tar_samples(url):
            last = sample["__key__"]
            sample["__url__"] = url
            yield sample
    except OSError as err:  # truncated or unreadable tar, missing file, storage error after retries
        log.warning("skipping the rest of shard %s after key %s: %s", url, last, err)
        yield {"__key__": f"{url}#after:{last}", "__error__": str(err)}


def decode_sample(sample: dict, resolution: int, channels: int, attr_names: list, factor_names: list):
    """Raw sample -> (key, uint8 image [C,R,R], attrs, factors), or None if it cannot be decoded."""
    if "__error__" in sample:
        return None  # a shard read failure, already logged where it happened
    try:
        data = next(sample[ext] for ext in (*IMAGE_FORMATS, "jpeg") if ext in sample)
        with Image.open(io.BytesIO(data)) as img:
            # JPEG: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is that much
            # smaller (an antialiased DCT-domain reduction, several times cheaper than a full decode)
            img.draft("L" if channels == 1 else "RGB", (resolution, resolution))
            pixels = image_pixels(img, resolution, channels)
        meta = json.loads(sample["json"])
        attrs = [int(meta["attrs"].get(name, 0)) for name in attr_names]
        factors = [int((meta.get("factors") or {}).get(name, -1)) for name in factor_names]
    except (StopIteration, *_BAD_SAMPLE) as err:
        log.warning("skipping undecodable sample %s of shard %s: %s: %s", sample.get("__key__"),
                    sample.get("__url__", "?"), type(err).__name__, err)
        return None
    return sample["__key__"], pixels, attrs, factors


def image_pixels(img: Image.Image, resolution: int, channels: int) -> torch.Tensor:
    """A decoded image as uint8 [C, R, R]: L or RGB, resized bicubic to R x R (PIL's bicubic
    widens its kernel when shrinking, i.e. it antialiases)."""
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.BICUBIC)
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return pixels.view(resolution, resolution, channels).permute(2, 0, 1)


def collate(items: list, n_corrupt: int, n_attrs: int, n_factors: int) -> dict:
    """Stack decoded samples into the batch dict the training loop consumes.

    ``attrs`` is [B, 0] for sources without attributes (CelebA-HQ folders); ``factors`` is
    present only when the shard set has ground-truth factors.
    """
    batch = {"image": torch.stack([it[1] for it in items]).float().div_(255.0),
             "key": [it[0] for it in items],
             "n_corrupt": n_corrupt,
             "attrs": torch.tensor([it[2] for it in items], dtype=torch.long).reshape(len(items), n_attrs)}
    if n_factors:
        batch["factors"] = torch.tensor([it[3] for it in items], dtype=torch.long).reshape(len(items), n_factors)
    return batch


def assign_shards(urls: list[str], slot: int, slots: int) -> tuple[list[str], Optional[int]]:
    """This slot's shards, and ``slot`` again if it must keep every ``slots``-th sample instead.

    Shard-level splitting reads least data; when shards are fewer than slots some slot would
    get nothing, so every slot then reads everything and keeps a disjoint stride of samples.
    """
    if len(urls) >= slots:
        return urls[slot::slots], None
    return list(urls), slot


def shard_order(urls: list[str], seed: int, epoch: int, slots: int, fixed_share: bool) -> list[str]:
    """The epoch's shard order; slot ``s`` reads ``order[s::slots]`` (``assign_shards``).

    Reshuffled whole every epoch; with ``fixed_share`` (a rank with a decoded cache) each slot
    keeps the same shards every epoch and only their order changes, so the cache holds all of a
    rank's shards after its first epoch instead of after several. A global batch still draws
    from every shard (it spans all ranks); only which shards share a rank stays fixed.
    """
    epoch_rng = random.Random(f"{seed}-{epoch}-shards")
    if not fixed_share or slots == 1 or len(urls) < slots:
        return epoch_rng.sample(urls, len(urls))
    order = random.Random(f"{seed}-shards").sample(urls, len(urls))
    for s in range(slots):
        share = order[s::slots]
        epoch_rng.shuffle(share)
        order[s::slots] = share
    return order


def worker_keys(remainder: list[str], rank: int, world: int, worker: int, nw: int, steps: int, batch: int) -> frozenset:
    """After a re-split: the keys of the batches ``worker`` of ``rank`` produces in ``steps`` steps.

    The rank's share is ``remainder[rank::world]``; its batch b is ``share[b*batch:(b+1)*batch]``
    and comes from DataLoader worker ``b % nw``, so every worker holds exactly its batches' keys.
    """
    share = remainder[rank::world]
    return frozenset(k for b in range(worker, steps, nw) for k in share[b * batch:(b + 1) * batch])


def batches_of_worker(worker: int, num_workers: int, start: int, stop: int) -> int:
    """How many of the global batch indices ``start..stop-1`` are worker's (``b % num_workers``).

    The DataLoader hands out worker batches round-robin, so batch b comes from worker
    ``b % num_workers``; this lets every worker produce exactly its share.
    """
    def below(h: int) -> int:
        return max(0, (h - worker + num_workers - 1) // num_workers)

    return below(stop) - below(start)


class DecodedCache:
    """Decoded samples by key, up to ``max_bytes``; what does not fit is decoded each time.

    Lives in the training process (``loader_workers=0``) across epochs. Holds what
    ``decode_sample`` returns for the stream's resolution and channels, before binarisation,
    so a dynamic binarisation still draws anew each epoch. A shard is held whole once read:
    its keys in order, and the raw bytes of samples the epoch read but did not decode (its
    quota ended with them in the shuffle buffer) until they are decoded. A held shard is not
    read again: parsing tar headers costs about as much as decoding a small JPEG, and an epoch
    that re-read a shard for its last few samples paid ~100 ms at its start.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes, self.items = max_bytes, 0, {}
        self.raw: dict[str, dict] = {}  # read with a held shard, not decoded yet
        self.shard_keys: dict[str, list[str]] = {}  # shards held whole: their keys in order

    def covers(self, url: str) -> bool:
        """Every sample of ``url`` is here, decoded or raw, so the shard need not be read."""
        keys = self.shard_keys.get(url)
        return keys is not None and all(k in self.items or k in self.raw for k in keys)

    def hold_shard(self, url: str, samples: list[dict]) -> None:
        """Keep an intact shard just read whole, if its undecoded samples fit in the bound."""
        pending = [s for s in samples if s["__key__"] not in self.items]
        size = sum(raw_bytes(s) for s in pending)
        if self.bytes + size > self.max_bytes:
            return  # not held: it is read again next epoch
        self.raw.update((s["__key__"], s) for s in pending)
        self.bytes += size
        self.shard_keys[url] = [s["__key__"] for s in samples]

    def decode(self, sample: dict, plan: dict):
        key = sample.get("__key__")
        hit = self.items.get(key)
        if hit is not None:
            return hit
        held = self.raw.get(key)  # a held shard's stand-in carries only its key
        decoded = decode_sample(held or sample, plan["resolution"], plan["channels"], plan["attr_names"],
                                plan["factor_names"])
        if decoded is None:
            return None
        freed = raw_bytes(held) if held is not None else 0
        if self.bytes - freed + decoded[1].numel() <= self.max_bytes:
            self.items[key] = decoded  # the pixels replace the raw bytes
            self.raw.pop(key, None)
            self.bytes += decoded[1].numel() - freed
        return decoded


def raw_bytes(sample: dict) -> int:
    """What a raw sample's payloads take in memory (its JPEG, labels, metadata)."""
    return sum(len(v) for k, v in sample.items() if not k.startswith("__") and isinstance(v, (bytes, bytearray)))


class SliceDataset(IterableDataset):
    """One epoch (or eval pass) of one rank; each DataLoader worker takes its slot of it.

    Plain data only, so it pickles into DataLoader worker processes (a ``cache`` is only
    given in-process, ``loader_workers=0``).
    """

    def __init__(self, plan: dict, cache: Optional[DecodedCache] = None):
        self.plan, self.cache = plan, cache

    def _decode(self, sample: dict):
        p = self.plan
        if self.cache is not None:
            return self.cache.decode(sample, p)
        return decode_sample(sample, p["resolution"], p["channels"], p["attr_names"], p["factor_names"])

    def _pass(self, urls: list[str], stride_slot: Optional[int], slots: int, keys: Optional[frozenset] = None):
        """One pass over this slot's shards (or its stride of samples when it has none of its own;
        or, after a re-split, every shard filtered to this slot's ``keys``)."""
        index = 0
        for url in urls:
            for sample in self._shard_samples(url):
                index += 1
                if keys is not None:
                    if sample["__key__"] in keys or "__error__" in sample:
                        yield sample
                elif stride_slot is None or (index - 1) % slots == stride_slot:
                    yield sample

    def _shard_samples(self, url: str):
        """The shard's samples; a shard whose every image is in the cache is not read again (its
        keys, in their stored order, stand in for the samples: the decode finds them cached)."""
        if self.cache is not None and self.cache.covers(url):
            yield from ({"__key__": key, "__url__": url} for key in self.cache.shard_keys[url])
            return
        if self.cache is None:
            yield from iter_shard_or_skip(url)
            return
        samples = list(iter_shard_or_skip(url))  # whole: the epoch may end before its last samples
        if not any("__error__" in sample for sample in samples):
            self.cache.hold_shard(url, samples)
        yield from samples

    def _raw_samples(self, urls: list[str], stride_slot: Optional[int], slots: int, rng: random.Random,
                     keys: Optional[frozenset] = None):
        """Shuffled samples of this slot; when ``plan["repeat"]``, passes repeat forever.

        The buffer is drained at the end of each pass so a pass shows every sample once
        before any repeats (a buffer spanning passes would mix in duplicates early).
        """
        p = self.plan
        while True:
            seen = 0
            for sample in self._shuffled(self._pass(urls, stride_slot, slots, keys), rng):
                seen += 1
                yield sample
            if not p["repeat"]:
                return
            if seen == 0:
                raise RuntimeError(f"rank {p['rank']}: a full pass over {len(urls)} shard(s) of split "
                                   f"{p['split']!r} gave no samples for this worker: use fewer loader workers")
            if stride_slot is None and keys is None:  # a new order on each repeat; strided slots keep theirs
                urls = rng.sample(urls, len(urls))

    def _shuffled(self, samples, rng: random.Random):
        """Reservoir-style shuffle buffer over raw (undecoded) samples."""
        size = self.plan["shuffle_buffer"]
        if size <= 1:
            yield from samples
            return
        buffer = []
        for sample in samples:
            if len(buffer) < size:
                buffer.append(sample)
                continue
            i = rng.randrange(size)
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def raw_for(self, worker: int, nw: int):
        """The raw (undecoded) sample sequence of one DataLoader worker of this plan's rank."""
        p = self.plan
        slot, slots = p["rank"] * nw + worker, p["world_size"] * nw
        rng = random.Random(f"{p['seed']}-{p['epoch']}-{slot}")
        if p.get("remainder") is not None:  # re-split epoch: every shard, filtered to this worker's keys
            keys = worker_keys(p["remainder"], p["rank"], p["world_size"], worker, nw, p["steps"], p["batch_size"])
            return self._raw_samples(list(p["urls"]), None, slots, rng, keys)
        urls, stride_slot = assign_shards(p["urls"], slot, slots)
        return self._raw_samples(urls, stride_slot, slots, rng)

    def __iter__(self):
        p = self.plan
        info = get_worker_info()
        worker, nw = (info.id, info.num_workers) if info else (0, 1)
        samples = self.raw_for(worker, nw)
        skip = batches_of_worker(worker, nw, 0, p["start_step"]) * p["batch_size"]
        for _ in range(skip):  # resume: drop samples before paying for their decode
            if next(samples, None) is None:
                return
        quota = None if p["steps"] is None else batches_of_worker(worker, nw, p["start_step"], p["steps"])
        yield from self._batches(samples, quota)

    def _binarized(self, decoded: tuple) -> tuple:
        p = self.plan
        if p["binarize"] == "none":
            return decoded
        key, pixels, *rest = decoded
        return (key, binarize_pixels(pixels, p["binarize"], key, p["seed"], p["epoch"]), *rest)

    def _batches(self, samples, quota: Optional[int]):
        """Decode and group into batches; only the last batch of a non-repeating pass may be short."""
        p, items, corrupt, made = self.plan, [], 0, 0
        if quota == 0:
            return
        for sample in samples:
            decoded = self._decode(sample)
            if decoded is None:
                corrupt += 1
                if corrupt > _MAX_CORRUPT_IN_A_ROW:  # a repeating stream of only bad samples never ends
                    raise RuntimeError(f"rank {p['rank']}: {corrupt} undecodable samples in a row in split "
                                       f"{p['split']!r}: run verify_shards and re-shard the data")
                continue
            items.append(self._binarized(decoded))
            if len(items) == p["batch_size"]:
                yield collate(items, corrupt, len(p["attr_names"]), len(p["factor_names"]))
                items, corrupt, made = [], 0, made + 1
                if quota is not None and made >= quota:
                    return
        if items:
            yield collate(items, corrupt, len(p["attr_names"]), len(p["factor_names"]))

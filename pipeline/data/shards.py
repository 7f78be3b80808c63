"""Write a CelebA-layout source as WebDataset tar shards (per split) plus ``manifest.json``.

Shards are the only thing training reads: square crops at one stored resolution (any lower
resolution is made on the fly by the stream), one sample per image (``__key__`` = image id
without extension, ``jpg|png|webp`` = image, ``json`` = attrs/split/factors).

Each shard is built in a local temp file, checksummed, then moved (local) or uploaded (s3),
so a reader never sees a half-written shard and the manifest's sha256 describes exactly the
bytes stored. Tar headers carry a fixed mtime so the same input gives the same bytes.

Re-running is cheap: a shard is reused when the previous manifest was written with the same
parameters, lists the same image ids for that shard, and the stored file still hashes to the
recorded sha256. Unreadable source images are skipped and counted (``skipped_corrupt``),
never fatal, because one bad JPEG in 200k must not sink an overnight job.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
import zipfile
from multiprocessing import get_context
from typing import Optional

from PIL import Image

from pipeline.data import progress_bar, storage
from pipeline.data.celeba import CelebASource, center_crop_resize, open_celeba
from pipeline.data.splits import SPLITS, SplitRule

log = logging.getLogger(__name__)

FORMAT = "vaepipe-shards/1"
MANIFEST = "manifest.json"
IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# What PIL and zipfile raise for missing, truncated or garbage images.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zipfile.BadZipFile, Image.DecompressionBombError)
_MAX_LISTED_CORRUPT = 100
_SOURCE: Optional[CelebASource] = None  # set once per pool worker, not pickled into every task


def _init_worker(source: CelebASource) -> None:
    global _SOURCE
    _SOURCE = source


def encode_image(img: Image.Image, image_format: str, quality: int) -> bytes:
    """Encode a PIL image as jpg/png/webp bytes."""
    buf = io.BytesIO()
    kwargs = {"quality": quality} if image_format in ("jpg", "webp") else {}
    img.save(buf, format=IMAGE_FORMATS[image_format], **kwargs)
    return buf.getvalue()


def _ids_digest(records) -> str:
    """Fingerprint of which images a shard is meant to hold (decides if an old shard is reusable)."""
    return hashlib.sha256("\n".join(r.image_id for r in records).encode()).hexdigest()


def _sample(source: CelebASource, record, resolution: int, image_format: str, quality: int) -> dict:
    """One WebDataset sample for ``record``; raises a DECODE_ERRORS member for bad images."""
    img = center_crop_resize(source.load_image(record.image_id), resolution)
    meta = {"attrs": record.attrs, "split": record.split}
    if record.factors is not None:
        meta["factors"] = record.factors
    return {"__key__": os.path.splitext(record.image_id)[0],
            image_format: encode_image(img, image_format, quality),
            "json": json.dumps(meta, sort_keys=True).encode()}


def _reused(task: dict) -> Optional[dict]:
    """The old manifest entry if the stored shard can be kept as is, else None."""
    old = task["old_entry"]
    if old is None or old.get("ids_sha256") != task["ids_sha256"]:
        return None
    try:
        if storage.sha256_of(task["url"]) != old["sha256"]:
            return None
    except OSError:  # missing or unreadable: rewrite it
        return None
    return {**old, "split": task["split"], "reused": True}


def _write_shard(task: dict) -> dict:
    """Pool task: reuse or (re)write one shard; return its manifest entry."""
    entry = _reused(task)
    if entry is not None:
        return entry
    import webdataset as wds  # heavy (pulls in torch): only paid when a shard is written

    url, local_out = task["url"], not storage.is_s3(task["url"])
    tmp_dir = os.path.dirname(os.path.abspath(storage.local_path(url))) if local_out else None
    fd, tmp = tempfile.mkstemp(suffix=".tar", prefix=".tmp-", dir=tmp_dir)
    num, corrupt = 0, []
    try:
        with os.fdopen(fd, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0.0)
            for record in task["records"]:
                try:
                    sample = _sample(_SOURCE, record, task["resolution"], task["image_format"], task["quality"])
                except DECODE_ERRORS as err:
                    log.warning("skipping unreadable image %s: %s", record.image_id, err)
                    corrupt.append(record.image_id)
                    continue
                writer.write(sample)
                num += 1
            writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shards are meant to be shared
        sha = storage.sha256_of(tmp)
        if local_out:
            os.replace(tmp, storage.local_path(url))
        else:
            storage.upload_file(tmp, url)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"name": task["name"], "split": task["split"], "num_samples": num, "sha256": sha,
            "ids_sha256": task["ids_sha256"], "skipped_corrupt": len(corrupt), "corrupt_ids": corrupt,
            "reused": False}


def _plan(source: CelebASource, out_url: str, shard_size: int, params: dict, old: Optional[dict]) -> list[dict]:
    """Cut each split's records into shard tasks, attaching the old entry of the same name."""
    old_entries = {}
    if old is not None and old.get("params") == params:
        old_entries = {s["name"]: s for split in old.get("splits", {}).values() for s in split["shards"]}
    by_split: dict[str, list] = {s: [] for s in SPLITS}
    for record in source.records():
        by_split[record.split].append(record)
    tasks = []
    for split, records in by_split.items():
        for k, start in enumerate(range(0, len(records), shard_size)):
            name = f"{split}-{k:06d}.tar"
            chunk = records[start:start + shard_size]
            tasks.append({"name": name, "split": split, "url": storage.join(out_url, name), "records": chunk,
                          "ids_sha256": _ids_digest(chunk), "old_entry": old_entries.get(name), **params})
    return tasks


def _run_tasks(source: CelebASource, tasks: list[dict], workers: Optional[int], progress: bool) -> list[dict]:
    """Run shard tasks in a process pool (or inline for one worker), with a progress bar."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(tasks)))
    results = []
    total = sum(len(t["records"]) for t in tasks)
    if workers == 1:
        _init_worker(source)
        with progress_bar(progress, total, "shards") as advance:
            for task in tasks:
                results.append(_write_shard(task))
                advance(len(task["records"]))
        return results
    sizes = {t["name"]: len(t["records"]) for t in tasks}
    # The pool is created before the bar so no fork copies its refresh thread.
    with get_context().Pool(workers, _init_worker, (source,)) as pool:
        with progress_bar(progress, total, "shards") as advance:
            for entry in pool.imap_unordered(_write_shard, tasks):
                results.append(entry)
                advance(sizes[entry["name"]])
    return results


def _build_manifest(source: CelebASource, params: dict, entries: list[dict]) -> dict:
    """Assemble manifest.json from per-shard entries (in split, then shard-name order)."""
    splits = {}
    for split in SPLITS:
        shards = sorted((e for e in entries if e["split"] == split), key=lambda e: e["name"])
        if not shards:
            continue
        keep = ("name", "num_samples", "sha256", "ids_sha256", "skipped_corrupt", "corrupt_ids")
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards),
                         "skipped_corrupt": sum(s["skipped_corrupt"] for s in shards),
                         "shards": [{k: s[k] for k in keep} for s in shards]}
    corrupt_ids = sorted(i for e in entries for i in e.get("corrupt_ids", []))
    reused = sum(1 for e in entries if e["reused"])
    return {"format": FORMAT, "resolution": params["resolution"], "image_format": params["image_format"],
            "source": source.describe(), "attr_names": list(source.attr_names),
            "split_rule": source.split_rule.to_manifest() if source.split_rule else None,
            "factor_names": list(source.factor_names), "params": params, "splits": splits,
            "skipped_corrupt": sum(s["skipped_corrupt"] for s in splits.values()),
            "corrupt_ids": corrupt_ids[:_MAX_LISTED_CORRUPT],
            "last_run": {"shards_written": len(entries) - reused, "shards_reused": reused},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_shards(source, out_url: str, resolution: int, shard_size: int = 1000, image_format: str = "jpg",
                 quality: int = 95, workers: Optional[int] = None, progress: bool = True,
                 split_rule: Optional[SplitRule] = None) -> dict:
    """Shard ``source`` (a folder for ``open_celeba`` or a CelebASource) to ``out_url``; return the manifest.

    ``split_rule`` (a folder source only) overrides the folder's default split rule; the rule
    used is recorded in ``manifest["split_rule"]``.

    ``manifest["last_run"]`` says how many shards were written and how many reused from a
    previous run; ``manifest["skipped_corrupt"]`` how many source images could not be read.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format={image_format!r}: choose one of {sorted(IMAGE_FORMATS)}")
    if resolution < 1 or shard_size < 1:
        raise ValueError(f"resolution={resolution}, shard_size={shard_size}: both must be >= 1")
    if isinstance(source, CelebASource) and split_rule is not None:
        raise ValueError("split_rule applies when opening a folder: pass it to open_celeba instead")
    src = source if isinstance(source, CelebASource) else open_celeba(source, split_rule)
    if len(src) == 0:
        raise ValueError(f"{src!r} has no images to shard")
    params = {"resolution": resolution, "image_format": image_format, "quality": quality, "shard_size": shard_size}
    if not storage.is_s3(out_url):
        os.makedirs(storage.local_path(out_url), exist_ok=True)
    manifest_url = storage.join(out_url, MANIFEST)
    old = json.loads(storage.read_bytes(manifest_url)) if storage.exists(manifest_url) else None
    entries = _run_tasks(src, _plan(src, out_url, shard_size, params, old), workers, progress)
    manifest = _build_manifest(src, params, entries)
    if manifest["skipped_corrupt"] == len(src):
        raise RuntimeError(f"every one of the {len(src)} images of {src!r} was unreadable: check the source folder")
    storage.write_bytes(manifest_url, json.dumps(manifest, indent=1).encode())
    run = manifest["last_run"]
    log.info("%s: wrote %d shards, reused %d, skipped %d unreadable images", out_url,
             run["shards_written"], run["shards_reused"], manifest["skipped_corrupt"])
    return manifest


def read_manifest(url: str) -> dict:
    """Load ``manifest.json`` of the shard set at ``url`` (the folder, or the manifest itself)."""
    url = os.fspath(url)
    murl = url if url.endswith(MANIFEST) else storage.join(url, MANIFEST)
    try:
        manifest = json.loads(storage.read_bytes(murl))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"no manifest.json at {url}: run `vaepipe data shard` first") from err
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{murl} has format {manifest.get('format')!r}, expected {FORMAT!r}: "
                         "re-shard the data with this version of vaepipe")
    return manifest


def shard_urls(url: str, split: str, manifest: Optional[dict] = None) -> list[str]:
    """Full URLs of the shards of ``split``, in manifest order."""
    manifest = manifest or read_manifest(url)
    if split not in manifest["splits"]:
        raise KeyError(f"split {split!r} not in the manifest at {url}: it has {sorted(manifest['splits'])}")
    return [storage.join(url, s["name"]) for s in manifest["splits"][split]["shards"]]


def verify_shards(url: str) -> list[tuple[str, bool, str, Optional[str]]]:
    """Recompute every shard's sha256: ``(name, ok, expected, actual)``; actual is None if missing."""
    manifest = read_manifest(url)
    out = []
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            try:
                actual = storage.sha256_of(storage.join(url, shard["name"]))
            except FileNotFoundError:
                actual = None
            out.append((shard["name"], actual == shard["sha256"], shard["sha256"], actual))
    return out

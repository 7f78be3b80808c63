"""Shared fixtures and builders for the data-layer tests (a plain module, imported by them).

One small synthetic CelebA set and one shard set are built per session, because generating
them is the slow part and every test only reads them.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.shards import write_shards
from pipeline.data.synth import CELEBA_ATTR_NAMES, generate_synthetic_celeba

N_IMAGES = 120  # 96 train / 12 valid / 12 test
SHARD_SIZE = 20  # train: 20,20,20,20,16 -> uneven shards on purpose
STORED_RES = 64


# Each test module imports these fixtures, which gives pytest one fixture definition per
# module; the cache makes the session really build each data set once.
_built: dict[str, Path] = {}


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    if "synth" not in _built:
        _built["synth"] = generate_synthetic_celeba(tmp_path_factory.mktemp("synth"), N_IMAGES, seed=0,
                                                    workers=2, progress=False)
    return _built["synth"]


@pytest.fixture(scope="session")
def shard_dir(synth_dir, tmp_path_factory) -> Path:
    """Read-only for tests: copy it (``copy_tree``) before changing anything."""
    if "shards" not in _built:
        out = tmp_path_factory.mktemp("shards") / "synth64"
        write_shards(synth_dir, str(out), STORED_RES, shard_size=SHARD_SIZE, workers=2, progress=False)
        _built["shards"] = out
    return _built["shards"]


def copy_tree(src: Path, dst: Path) -> Path:
    """A private copy of a session fixture for tests that modify it."""
    shutil.copytree(src, dst)
    return dst


def jpeg_bytes(color: tuple, size: int = STORED_RES) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_raw_shard_set(folder: Path, shards: dict[str, list[tuple[str, bytes]]], split: str = "train",
                        resolution: int = STORED_RES) -> Path:
    """Write hand-made shards (``{name: [(key, jpg_bytes)...]}``) and a matching manifest.

    Lets a test put a garbage ``jpg`` into a shard, which the real writer never produces.
    """
    import hashlib

    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, samples in shards.items():
        with open(folder / name, "wb") as f:
            writer = wds.TarWriter(f, encoder=False)
            for key, data in samples:
                meta = {"attrs": {a: 0 for a in CELEBA_ATTR_NAMES}, "split": split}
                writer.write({"__key__": key, "jpg": data, "json": json.dumps(meta).encode()})
            writer.close()
        sha = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        entries.append({"name": name, "num_samples": len(samples), "sha256": sha})
    manifest = {"format": "vaepipe-shards/1", "resolution": resolution, "image_format": "jpg", "source": "test",
                "attr_names": list(CELEBA_ATTR_NAMES), "factor_names": [],
                "splits": {split: {"num_samples": sum(e["num_samples"] for e in entries), "shards": entries}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder

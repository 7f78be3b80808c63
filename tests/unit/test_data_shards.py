"""Shard writer: per-split tars, manifest, checksums, idempotent re-runs, corrupt sources."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import tarfile

import pytest
from PIL import Image

from pipeline.data.shards import read_manifest, shard_urls, verify_shards, write_shards
from pipeline.data.synth import generate_synthetic_celeba

try:
    from tests.data_fixtures import SHARD_SIZE, STORED_RES, copy_tree, shard_dir, synth_dir  # noqa: F401
except ImportError:
    from data_fixtures import SHARD_SIZE, STORED_RES, copy_tree, shard_dir, synth_dir  # noqa: F401


def _tar_samples(path):
    samples = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_manifest_counts_and_checksums(shard_dir):
    m = read_manifest(str(shard_dir))
    assert m["format"] == "vaepipe-shards/1" and m["resolution"] == STORED_RES and m["image_format"] == "jpg"
    assert len(m["attr_names"]) == 40 and "smile" in m["factor_names"]
    assert {k: v["num_samples"] for k, v in m["splits"].items()} == {"train": 96, "valid": 12, "test": 12}
    train = m["splits"]["train"]["shards"]
    assert [s["name"] for s in train] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["num_samples"] for s in train] == [20, 20, 20, 20, 16]
    for split in m["splits"].values():
        for s in split["shards"]:
            assert hashlib.sha256((shard_dir / s["name"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["skipped_corrupt"] == 0
    assert shard_urls(str(shard_dir), "valid") == [str(shard_dir / "valid-000000.tar")]
    assert all(ok for _, ok, _, _ in verify_shards(str(shard_dir)))


def test_samples_are_square_crops_with_labels(shard_dir, synth_dir):
    samples = _tar_samples(shard_dir / "valid-000000.tar")
    assert len(samples) == 12 and "000097" in samples  # keys are ids without extension
    with open(synth_dir / "factors.csv", newline="") as f:
        factors = {r.pop("image_id"): {k: int(v) for k, v in r.items()} for r in csv.DictReader(f)}
    for key, sample in samples.items():
        assert set(sample) == {"jpg", "json"}
        with Image.open(io.BytesIO(sample["jpg"])) as img:
            assert img.size == (STORED_RES, STORED_RES) and img.format == "JPEG"
        meta = json.loads(sample["json"])
        assert meta["split"] == "valid" and len(meta["attrs"]) == 40 and set(meta["attrs"].values()) <= {0, 1}
        assert meta["factors"] == factors[key + ".jpg"]
        assert meta["attrs"]["Smiling"] == meta["factors"]["smile"]


def test_rerun_rewrites_nothing(shard_dir, synth_dir, tmp_path):
    out = copy_tree(shard_dir, tmp_path / "copy")
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    manifest = write_shards(synth_dir, str(out), STORED_RES, shard_size=SHARD_SIZE, workers=2, progress=False)
    assert manifest["last_run"] == {"shards_written": 0, "shards_reused": 7}
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before


def test_verify_detects_tampering_and_rerun_repairs_only_that_shard(shard_dir, synth_dir, tmp_path):
    out = copy_tree(shard_dir, tmp_path / "copy")
    data = bytearray((out / "train-000002.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "train-000002.tar").write_bytes(bytes(data))
    bad = [(name, expected, actual) for name, ok, expected, actual in verify_shards(str(out)) if not ok]
    assert len(bad) == 1 and bad[0][0] == "train-000002.tar" and bad[0][1] != bad[0][2]
    manifest = write_shards(synth_dir, str(out), STORED_RES, shard_size=SHARD_SIZE, workers=1, progress=False)
    assert manifest["last_run"] == {"shards_written": 1, "shards_reused": 6}
    assert all(ok for _, ok, _, _ in verify_shards(str(out)))


def test_changed_parameters_rewrite_everything(shard_dir, synth_dir, tmp_path):
    out = copy_tree(shard_dir, tmp_path / "copy")
    manifest = write_shards(synth_dir, str(out), 32, shard_size=SHARD_SIZE, workers=2, progress=False)
    assert manifest["last_run"]["shards_reused"] == 0 and manifest["resolution"] == 32
    with Image.open(io.BytesIO(_tar_samples(out / "test-000000.tar")["000120"]["jpg"])) as img:
        assert img.size == (32, 32)


def test_corrupt_source_image_is_skipped_and_counted(tmp_path):
    src = generate_synthetic_celeba(tmp_path / "src", 20, seed=1, workers=1, progress=False)
    (src / "img_align_celeba" / "000003.jpg").write_bytes(b"this is not a jpeg")
    manifest = write_shards(src, f"file://{tmp_path / 'out'}", 32, shard_size=8, image_format="png",
                            workers=1, progress=False)
    assert manifest["skipped_corrupt"] == 1 and manifest["corrupt_ids"] == ["000003.jpg"]
    assert manifest["splits"]["train"]["num_samples"] == 15 and manifest["splits"]["train"]["skipped_corrupt"] == 1
    samples = _tar_samples(tmp_path / "out" / "train-000000.tar")
    assert "000003" not in samples and all(set(s) == {"png", "json"} for s in samples.values())
    assert read_manifest(f"file://{tmp_path / 'out'}")["skipped_corrupt"] == 1


def test_missing_manifest_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json at .*vaepipe data shard"):
        read_manifest(str(tmp_path))
    with pytest.raises(ValueError, match="image_format"):
        write_shards(tmp_path, str(tmp_path / "o"), 32, image_format="gif")

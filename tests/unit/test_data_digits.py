"""`vaepipe data digits`: scikit-learn's 1797 UCI digits as a folder the shard writer reads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.shards import write_shards
from pipeline.data.stream import ShardStream


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    res = CliRunner().invoke(app, ["data", "digits", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "train 1437, valid 180, test 180" in " ".join(res.output.split())  # rich wraps lines
    return out


@pytest.fixture(scope="module")
def digits_shards(digits_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "digits32"
    manifest = write_shards(digits_dir, str(out), 32, shard_size=500, image_format="png", workers=1, progress=False)
    return out, manifest


def test_writes_every_digit_scaled_and_labelled(digits_dir):
    pngs = sorted(digits_dir.glob("*.png"))
    assert len(pngs) == 1797
    ref = load_digits()
    with Image.open(pngs[5]) as img:
        assert img.mode == "L" and img.size == (32, 32)
        pixels = np.asarray(img)
    small = np.asarray(Image.fromarray(pixels).resize((8, 8), Image.BOX), dtype=float)
    assert np.abs(small - ref.images[5] * 255 / 16).mean() < 20  # same digit, 0..16 -> 0..255
    assert pixels.max() > 200 and pixels.min() == 0
    rows = (digits_dir / "factors.csv").read_text().splitlines()
    assert rows[0] == "image_id,digit" and rows[6] == f"0005.png,{ref.target[5]}"


def test_nearest_keeps_the_source_levels(tmp_path):
    from pipeline.data.digits import write_digits

    write_digits(tmp_path, resolution=16, resample="nearest")
    with Image.open(tmp_path / "0000.png") as img:
        pixels = np.asarray(img)
    assert np.array_equal(pixels[::2, ::2], np.round(load_digits().images[0] * 255 / 16).astype(np.uint8))
    with pytest.raises(ValueError, match="--resolution 4"):
        write_digits(tmp_path, resolution=4)


def test_shards_load_with_split_factors_and_binarise(digits_shards):
    url, manifest = digits_shards
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "valid", "test")] == [1437, 180, 180]
    assert manifest["factor_names"] == ["digit"] and manifest["split_rule"]["kind"] == "partition"
    target = load_digits().target

    def first(binarize):
        stream = ShardStream(str(url), "test", 64, 32, 0, 1, shuffle_buffer=0, num_workers=0, channels=1,
                             binarize=binarize)
        return next(stream.iter_eval())

    gray, binary = first("none"), first("dynamic")
    assert gray["image"].shape == (64, 1, 32, 32) and len(torch.unique(gray["image"])) > 2
    assert torch.equal(gray["factors"][:, 0], torch.tensor([int(target[int(k)]) for k in gray["key"]]))
    assert set(torch.unique(binary["image"]).tolist()) == {0.0, 1.0}
    assert torch.all(binary["image"][gray["image"] == 0] == 0) and torch.all(binary["image"][gray["image"] == 1] == 1)
    mid = (gray["image"] > 0.3) & (gray["image"] < 0.7)
    assert 0.3 < float(binary["image"][mid].mean()) < 0.7
    train = ShardStream(str(url), "train", 64, 32, 0, 2, channels=1, num_workers=0, binarize="dynamic")
    assert train.steps_per_epoch == 1437 // 128

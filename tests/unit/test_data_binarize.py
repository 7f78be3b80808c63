"""data.binarize: static draws are fixed per image, dynamic ones fresh per epoch, eval is static."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.data.shards import write_shards
from pipeline.data.splits import SplitRule
from pipeline.data.stream import ShardStream
from pipeline.evaluate.runner import eval_stream

RES, N = 16, 8


@pytest.fixture(scope="module")
def gray_shards(tmp_path_factory) -> str:
    """8 gray gradient images (every intensity from 0 to 255 appears), all in train, stored as PNG."""
    folder = tmp_path_factory.mktemp("gray")
    ramp = np.linspace(0, 255, RES * RES).reshape(RES, RES)
    for i in range(N):
        Image.fromarray(np.roll(ramp, i * 2, axis=1).astype(np.uint8), mode="L").save(folder / f"{i:02d}.png")
    out = tmp_path_factory.mktemp("shards") / "gray"
    write_shards(folder, str(out), RES, shard_size=4, image_format="png", workers=1, progress=False,
                 split_rule=SplitRule("all", split="train"))
    return str(out)


def _images(stream, epoch=0) -> dict:
    return {k: img for b in stream.iter_epoch(epoch) for k, img in zip(b["key"], b["image"])}


def _stream(url, binarize, seed=0):
    return ShardStream(url, "train", 4, RES, 0, 1, seed=seed, shuffle_buffer=4, num_workers=0, channels=1,
                       binarize=binarize)


def test_none_leaves_intensities(gray_shards):
    imgs = _images(_stream(gray_shards, "none"))
    assert len(imgs) == N and len(torch.unique(torch.stack(list(imgs.values())))) > 100


def test_static_is_the_same_binary_image_every_read_and_epoch(gray_shards):
    first = _images(_stream(gray_shards, "static"))
    assert set(torch.unique(torch.stack(list(first.values()))).tolist()) == {0.0, 1.0}
    for stream, epoch in ((_stream(gray_shards, "static"), 0), (_stream(gray_shards, "static"), 3),
                          (_stream(gray_shards, "static", seed=7), 1)):
        again = _images(stream, epoch)
        assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["00"], first["01"])  # a draw per image, not one mask for all


def test_dynamic_draws_afresh_each_epoch_with_intensity_as_probability(gray_shards):
    stream = _stream(gray_shards, "dynamic")
    p = _images(_stream(gray_shards, "none"))
    e0, e1 = _images(stream, 0), _images(stream, 1)
    assert set(torch.unique(torch.stack(list(e0.values()))).tolist()) == {0.0, 1.0}
    assert all(not torch.equal(e0[k], e1[k]) for k in e0)
    assert all(torch.equal(e0[k], v) for k, v in _images(stream, 0).items())  # a resumed epoch replays
    reads = 300
    mean = {k: torch.zeros_like(v) for k, v in p.items()}
    for epoch in range(reads):
        for k, img in _images(stream, epoch).items():
            mean[k] += img / reads
    err = torch.stack([mean[k] - p[k] for k in p])
    assert err.abs().mean() < 0.03 and abs(float(err.mean())) < 0.01  # binomial sd ~0.029 per pixel
    assert sum(float(mean[k][p[k] == 0].sum()) for k in p) == 0  # black never turns on


def test_evaluation_reads_the_static_draw(gray_shards):
    static = _images(_stream(gray_shards, "static"))
    for mode in ("static", "dynamic"):
        evaled = {k: img for b in _stream(gray_shards, mode).iter_eval() for k, img in zip(b["key"], b["image"])}
        assert all(torch.equal(static[k], evaled[k]) for k in static)


def test_eval_stream_binarises_as_the_model_was_trained(gray_shards):
    model_config = {"name": "conv_vae", "in_channels": 1, "resolution": RES}
    blob = {"model_config": model_config, "config": {"data": {"binarize": "dynamic"}}}
    assert eval_stream(blob, gray_shards, "train", 4, 0, 1).binarize == "dynamic"
    batch = next(eval_stream(blob, gray_shards, "train", 4, 0, 1).iter_eval())
    assert set(torch.unique(batch["image"]).tolist()) == {0.0, 1.0}
    old_blob = {"model_config": model_config}  # saved before data.binarize existed
    batch = next(eval_stream(old_blob, gray_shards, "train", 4, 0, 1).iter_eval())
    assert len(torch.unique(batch["image"])) > 2


def test_bad_mode_is_named(gray_shards):
    with pytest.raises(ConfigError, match="data.binarize"):
        load_config(None, ["data.binarize=sometimes"])
    with pytest.raises(ValueError, match="binarize='sometimes'"):
        _stream(gray_shards, "sometimes")

"""Progressive growing end to end: shards -> Ray Train (2 workers) + DeepSpeed -> MLflow, the engine
rebuilt at every stage (and at the end of each freeze), under ZeRO-2 through three stages with a
worker killed mid-fade, and under ZeRO-3 through two in local mode (one rank in this process: a
stage switch under ZeRO-3 on two ranks, its parameters and moments, is
``test_progressive_growth_2proc``'s)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from conftest import base_overrides, logged_images
from pipeline.config import load_config

pytestmark = pytest.mark.integration


def _progressive(shards, tmp_path, resolution, **extra):
    values = {"model.name": "progressive_vae", "data.resolution": resolution, "progressive.enabled": True,
              "progressive.stage_images": 64, "progressive.fade_fraction": 0.5,
              "progressive.batch_size": "[8,8,8]", "train.log_every": 1, "train.val_every": 4,
              "train.image_every": 100, "train.checkpoint_every": 5, "tracking.log_model": False, **extra}
    values.pop("train.max_steps", None)
    from pipeline.train.trainer import run_training

    overrides = [o for o in base_overrides(shards, tmp_path, **values) if not o.startswith("train.max_steps=")]
    return run_training(load_config(None, overrides))


def _client(uri):
    from pipeline.tracking import make_client

    return make_client(uri)


def _history(client, run_id, key):
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_zero2_three_stages_with_freeze_carried_moments_and_a_worker_killed_mid_fade(
        ray_session, shards32, tmp_path, monkeypatch):
    marker = tmp_path / "fault.marker"
    monkeypatch.setenv("VAEPIPE_FAULT_AT_STEP", "7")  # stage 1 (8 px) runs steps 5-8, fading over 5-6
    monkeypatch.setenv("VAEPIPE_FAULT_MARKER", str(marker))
    result = _progressive(shards32, tmp_path, 16, **{"dist.zero_stage": 2, "dist.max_failures": 1,
                                                      "progressive.freeze_images": 16,
                                                      "progressive.carry_moments": True})
    assert marker.read_text() == "7", "the fault was not injected"
    client = _client(result.tracking_uri)
    run = client.get_run(result.run_id)
    tags = run.data.tags
    assert [tags.get(f"vaepipe.stage.{i}", "").split(" ")[0] for i in range(3)] == ["4x4", "8x8", "16x16"]
    # 16 images per step: step 5's checkpoint is 80 images in, 16 into stage 1's 32-image fade
    assert tags["vaepipe.resumed_from_step"] == "5"
    assert tags["vaepipe.resumed_phase"] == "stage 1 resolution 8 alpha 0.5000 images 80"
    assert set(_history(client, result.run_id, "resolution")) == {4.0, 8.0, 16.0}
    alphas = _history(client, result.run_id, "alpha")
    assert 0.5 in alphas and alphas[-1] == 1.0  # 16 of 32 fade images in, then faded in
    assert result.metrics["resolution"] == 16 and result.metrics["images_seen"] == 192
    saved = json.loads((Path(result.checkpoint_path) / "vaepipe_state.json").read_text())["train_state"]
    assert (saved["stage"], saved["resolution"], saved["alpha"], saved["samples_seen"]) == (2, 16, 1.0, 192)
    images = logged_images(client, result.run_id)
    # image grids at each stage's resolution: 2 x 2 tiles with 1-pixel gaps
    widths = {step: Image.open(client.download_artifacts(result.run_id, images[("samples", step)], str(tmp_path))).size[0]
              for step in (0, 4, 12)}
    assert widths == {0: 2 * 5 + 1, 4: 2 * 5 + 1, 12: 2 * 17 + 1}, widths


def test_zero3_two_stages(shards32, tmp_path):
    # one rank with the micro-batch of two: the same 16 images per step, stage 1 from step 4
    result = _progressive(shards32, tmp_path, 8, **{"dist.zero_stage": 3, "dist.num_workers": 0,
                                                     "progressive.batch_size": "[16,16,16]",
                                                     "progressive.carry_moments": True})
    client = _client(result.tracking_uri)
    tags = client.get_run(result.run_id).data.tags
    assert tags["vaepipe.stage.1"].startswith("8x8 from step 4")
    assert result.metrics["resolution"] == 8 and result.metrics["step"] == 8
    loss = _history(client, result.run_id, "loss")
    assert all(v == v for v in loss)  # finite across the rebuild

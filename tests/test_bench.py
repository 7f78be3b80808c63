"""The benchmark harness measures real training steps (the long runs live behind `vaepipe bench`)."""

import math

from conftest import base_overrides
from pipeline.bench import plain_pytorch_images_per_sec
from pipeline.config import load_config


def test_plain_baseline_measures_positive_throughput(shards32, tmp_path):
    cfg = load_config(None, base_overrides(shards32, tmp_path))
    ips = plain_pytorch_images_per_sec(cfg, steps=3, warmup=1)
    assert math.isfinite(ips) and ips > 0

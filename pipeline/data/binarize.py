"""Bernoulli binarisation of grayscale-intensity images, for Bernoulli-likelihood benchmarks.

Published MNIST-style likelihoods are only comparable when the data is binary the same way:

* ``static`` (Larochelle & Murray 2011): one Bernoulli draw per image, fixed for good. The
  draw is seeded by the sample key alone, so every epoch, every rank and every evaluation
  sees the same binary image.
* ``dynamic`` (Salakhutdinov & Murray 2008): a fresh draw each time the image is read for
  training, with the pixel intensity as the probability. The draw is seeded by the run seed,
  the epoch and the key, so it changes every epoch yet a resumed epoch replays it exactly.
  Evaluation and validation of a dynamic model read the ``static`` draw (see ``for_eval``):
  scores must be reproducible, and a single fixed draw is an unbiased sample of the data.
* ``none``: images as stored.
"""

from __future__ import annotations

import zlib
from typing import Literal

import torch

Binarize = Literal["none", "static", "dynamic"]
MODES = ("none", "static", "dynamic")


def for_eval(mode: str) -> str:
    """The mode evaluation reads: deterministic by key whenever the training data was binary."""
    check_mode(mode)
    return "none" if mode == "none" else "static"


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"binarize={mode!r}: choose one of {', '.join(MODES)}")


def draw_seed(mode: str, key: str, seed: int, epoch: int) -> int:
    """The seed of one image's draw: the key alone for static, also run seed and epoch for dynamic."""
    text = f"static-{key}" if mode == "static" else f"dynamic-{seed}-{epoch}-{key}"
    return zlib.crc32(text.encode())


def binarize_pixels(pixels: torch.Tensor, mode: str, key: str, seed: int = 0, epoch: int = 0) -> torch.Tensor:
    """uint8 image -> uint8 image of 0/255 where pixel ``p`` is 255 with probability ``p/255``."""
    if mode == "none":
        return pixels
    gen = torch.Generator().manual_seed(draw_seed(mode, key, seed, epoch))
    # u in [0, 1): 0 never turns on, 255 always does
    u = torch.rand(pixels.shape, generator=gen)
    return (u * 255.0 < pixels.float()).to(torch.uint8).mul_(255)

"""Every rank's random-number generators, checkpointed so a resumed run draws what the
uninterrupted run would have drawn.

A VAE step is random on purpose: reparameterisation noise, dropout masks, Factor-VAE's
permutation, the sample grids. Weights, optimizer state and the data position alone bring a
restored run back to the same point but not onto the same path: the noise after the restore
differs. Each rank saves the state of torch's CPU generator (and every CUDA device's), numpy's
and Python's global generators at the moment it writes its checkpoint, which in the loop is
after that step's validation and images, exactly where the next training step would start.

The data order needs nothing here: the stream's shuffles, shard orders and dynamic binarisation
are functions of (seed, epoch, slot, key), and its DataLoaders draw from their own generator.

On another world size there is no rank-to-rank correspondence: every rank is re-seeded from
(seed, rank, step) instead, so no rank replays the noise of step 0.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.seeds import mixed_seeds

RNG_DIR = "rng"


def capture() -> dict:
    """The generators' states as tensors and plain Python values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def apply(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save(folder: Path, rank: int) -> None:
    (folder / RNG_DIR).mkdir(exist_ok=True)
    torch.save(capture(), folder / RNG_DIR / f"rank{rank}.pt")


def load(folder: Path, rank: int, same_world: bool, seed: int, step: int) -> str:
    """Restore this rank's generators from ``folder``; returns what was done instead, if anything."""
    source = folder / RNG_DIR / f"rank{rank}.pt"
    if same_world and source.is_file():
        apply(torch.load(source, map_location="cpu", weights_only=True))
        return ""
    reseed(seed, rank, step)
    why = "another world size" if not same_world else "a checkpoint without them"
    return f"random generators re-seeded from (seed, rank, step {step}): {why}, so the noise differs from an uninterrupted run"


def reseed(seed: int, rank: int, step: int) -> None:
    torch_seed, other = mixed_seeds(seed, rank, step, n=2)
    torch.manual_seed(torch_seed)
    np.random.seed(other % 2**32)
    random.seed(other)

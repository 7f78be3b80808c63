"""An exponential moving average of the weights, applied to a model from outside.

VDVAE and NVAE evaluate, sample and release the EMA of the weights (VDVAE: rate 0.9999), not
the last iterate: deep hierarchies' raw weights are noisy enough that samples and the bound both
suffer. The average is kept here, beside the engine, never inside the model:

* each rank averages the parameter storage it owns: the whole tensor under ZeRO 0-2, its
  partition (``ds_tensor``) under ZeRO-3, so the average is sharded like the weights are;
* ``applied()`` swaps the average into that storage for validation, image grids and export (a
  ZeRO-3 gather then gathers the averaged partitions) and swaps the trained weights back;
* every rank checkpoints its own average (``ema/rank<r>.pt``) and restores it on the same world
  size; under ZeRO 0-2 the average is whole on every rank, so rank 0's file serves any world size.

The average is kept in fp32 whatever the engine's precision, as VDVAE keeps its EMA model.

With ``warmup`` (``train.ema_warmup``, on by default) the rate after n updates is
``min(rate, (1 + n) / (10 + n))``, TensorFlow's ``ExponentialMovingAverage`` with ``num_updates``:
at a fixed rate the random initial weights keep a share rate^n of the average (13 % after 200
steps at 0.99, 82 % after 2,000 at VDVAE's 0.9999), which a run shorter than the average's memory
releases as its model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Optional

import torch

EMA_DIR = "ema"


def owned_storage(p: torch.nn.Parameter) -> torch.Tensor:
    """The tensor this rank updates for ``p``: its ZeRO-3 partition where it has one."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class WeightEMA:
    """shadow <- r * shadow + (1 - r) * weights after every optimizer step, r = ``rate_now()``."""

    def __init__(self, module: torch.nn.Module, rate: float, warmup: bool = True) -> None:
        if not 0.0 < rate < 1.0:
            raise ValueError(f"train.ema_rate must be in (0, 1) to keep an average, got {rate!r}")
        self.rate, self.warmup = float(rate), warmup
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.shadow = [owned_storage(p).detach().float().clone() for p in self.params]
        self.updates = 0

    def rate_now(self) -> float:
        """The rate of the next update: ``rate``, or lower during the warm-up."""
        return min(self.rate, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.rate

    @torch.no_grad()
    def update(self) -> None:
        rate = self.rate_now()
        for avg, p in zip(self.shadow, self.params):
            avg.lerp_(owned_storage(p).float(), 1.0 - rate)
        self.updates += 1

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the parameters' storage inside the block, the trained weights after it."""
        trained = [owned_storage(p).detach().clone() for p in self.params]
        with torch.no_grad():
            for avg, p in zip(self.shadow, self.params):
                owned_storage(p).copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for saved, p in zip(trained, self.params):
                    owned_storage(p).copy_(saved)

    def state_dict(self) -> dict:
        return {"rate": self.rate, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        shapes = [tuple(t.shape) for t in self.shadow]
        if [tuple(t.shape) for t in shadow] != shapes:
            raise ValueError("the saved weight EMA was made for other parameter shapes (another ZeRO-3 world size?)")
        self.shadow = [t.float().to(avg.device) for t, avg in zip(shadow, self.shadow)]
        self.updates = int(state.get("updates", 0))

    def reset_to_weights(self) -> None:
        """Start the average again from the current weights (a checkpoint without one)."""
        self.shadow = [owned_storage(p).detach().float().clone() for p in self.params]


def save(ema: Optional[WeightEMA], folder: Path, rank: int) -> None:
    if ema is None:
        return
    (folder / EMA_DIR).mkdir(exist_ok=True)
    torch.save(ema.state_dict(), folder / EMA_DIR / f"rank{rank}.pt")


def load(ema: Optional[WeightEMA], folder: Path, rank: int, same_world: bool, partitioned: bool) -> str:
    """Restore this rank's average from ``folder``; returns what was done, for the run's log."""
    if ema is None:
        return ""
    source = folder / EMA_DIR / f"rank{rank if same_world else 0}.pt"
    if (partitioned and not same_world) or not source.is_file():
        ema.reset_to_weights()
        return "weight EMA restarted from the restored weights (none saved for this layout)"
    ema.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    return ""


@contextlib.contextmanager
def ema_weights(w) -> Iterator[None]:
    """``w``'s model with the averaged weights inside the block (unchanged without an EMA)."""
    ema = getattr(w, "ema", None)
    with ema.applied() if ema is not None else contextlib.nullcontext():
        yield

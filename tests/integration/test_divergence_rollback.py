"""``train.on_divergence=rollback``: after ``max_consecutive_skips`` non-finite steps the run
restores its newest committed checkpoint (weights, optimizer, train state, data position) with the
learning rate scaled down, at most ``max_rollbacks`` times, then fails naming the rollbacks.
One real DeepSpeed rank on gloo (no Ray): the loop's own checkpoint writer and restore."""

from __future__ import annotations

import pytest

from dist_helpers import run_ranks


class _Stream:
    def __init__(self) -> None:
        self.epoch, self.step_in_epoch = 0, 5

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]


class _Log:
    run_id = "run"

    def __init__(self) -> None:
        self.tagged: dict = {}

    def tags(self, tags: dict) -> None:
        self.tagged.update(tags)


def _diverge_twice(rank: int, world: int, run_dir: str) -> dict:
    from pathlib import Path
    from types import SimpleNamespace

    import torch

    from models import build_model
    from pipeline.config import load_config
    from pipeline.train.checkpoint import write_checkpoint
    from pipeline.train.divergence import RolledBack, on_divergence
    from pipeline.train.engine import build_engine
    from pipeline.train.worker import TrainState

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "data.batch_size=4", "model.likelihood=mse",
                             "optim.lr=0.01", "train.on_divergence=rollback", "train.max_rollbacks=1",
                             "train.rollback_lr_factor=0.25", "train.precision=fp32"])
    torch.manual_seed(0)
    engine = build_engine(cfg, build_model(cfg.model), world, "fp32")
    w = SimpleNamespace(cfg=cfg, engine=engine, stream=_Stream(), state=TrainState(step=5, step_in_epoch=5),
                        rank=rank, world_size=world, device=torch.device("cpu"), log=_Log(), aux=None, ema=None,
                        growth=None, run_dir=run_dir, resumed_from=None)
    folder = Path(run_dir) / "checkpoint_000005"
    folder.mkdir(parents=True)
    write_checkpoint(w, folder)
    at_5 = {k: v.clone() for k, v in engine.module.state_dict().items()}
    for _ in range(3):  # training moves on past the checkpoint
        engine.backward(engine(torch.rand(4, 3, 32, 32), beta=1.0, free_bits=0.0)["loss"])
        engine.step()
    w.state.step, w.stream.step_in_epoch = 8, 8
    moved = any(not torch.equal(v, at_5[k]) for k, v in engine.module.state_dict().items())
    try:
        on_divergence(w, 3)
        rolled = False
    except RolledBack:
        rolled = True
    restored = all(torch.equal(v, at_5[k]) for k, v in engine.module.state_dict().items())
    after = {"step": w.state.step, "position": w.stream.step_in_epoch, "lr": engine.optimizer.param_groups[0]["lr"],
             "scale": w.state.lr_scale, "rollbacks": w.state.rollbacks, "tags": dict(w.log.tagged)}
    try:
        on_divergence(w, 3)
        second = ""
    except FloatingPointError as exc:
        second = str(exc)
    return {"moved": moved, "rolled": rolled, "restored": restored, "after": after, "second": second,
            "loads": type(engine.checkpoint_engine).__name__}


def test_a_diverged_run_rolls_back_with_a_smaller_lr_then_fails_naming_the_rollbacks(tmp_path):
    (r,) = run_ranks(_diverge_twice, world=1, args=(str(tmp_path / "run"),))
    assert r["moved"] and r["rolled"] and r["restored"]  # the weights are the checkpoint's again
    assert r["loads"] == "WeightsOnlyCheckpointEngine"  # read back with torch.load(weights_only=True)
    assert r["after"]["step"] == 5 and r["after"]["position"] == 5  # train state and data position too
    assert r["after"]["lr"] == pytest.approx(0.0025) and r["after"]["scale"] == 0.25
    assert r["after"]["rollbacks"] == 1 and r["after"]["tags"]["vaepipe.rollbacks"] == 1
    assert "diverged" in r["second"] and "after 1 rollback(s)" in r["second"] and "0.0025" in r["second"]


def test_on_divergence_and_its_factor_are_checked():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.rollback_lr_factor"):
        load_config(None, ["train.rollback_lr_factor=0"])
    with pytest.raises(ConfigError, match="train.on_divergence"):
        load_config(None, ["train.on_divergence=retry"])

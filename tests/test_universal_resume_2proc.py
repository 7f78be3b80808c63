"""Resume on another number of ranks (2 -> 1, 1 -> 2) under ZeRO 1-3: the checkpoint is converted
to a DeepSpeed universal checkpoint, the model and optimizer continue where they were (the same
loss on a fixed batch, and the next step lands where an uninterrupted 2-rank run would), and the
epoch's data is re-split without a sample lost or seen twice."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dist_helpers import run_ranks

pytestmark = pytest.mark.integration
B = 4


def _worker(rank: int, world: int, shards: str, zero_stage: int, seed: int):
    import deepspeed

    from pipeline.config import load_config
    from pipeline.data.stream import ShardStream
    from pipeline.train.engine import build_deepspeed_config
    from pipeline.train.worker import TrainState, build_model_for_rank

    # a different seed (init) than the saved run: only a real load makes losses agree
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", f"data.batch_size={B}", "model.likelihood=mse",
                             f"dist.zero_stage={zero_stage}", f"dist.num_workers={world}", "train.precision=fp32",
                             f"train.seed={seed}"])
    ds_config = build_deepspeed_config(cfg, world, "fp32")
    model = build_model_for_rank(cfg, {}, ds_config)  # as the worker builds it: under zero.Init at stage 3
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    stream = ShardStream(shards, "train", B, 32, rank, world, seed=0, shuffle_buffer=16, num_workers=0)
    return SimpleNamespace(cfg=cfg, engine=engine, stream=stream, state=TrainState(), rank=rank, world_size=world,
                           device=torch.device("cpu"), aux=None, log=SimpleNamespace(run_id="run"), resumed_from=None)


def _fixed_loss(w) -> float:
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(99))
    w.engine.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        loss = float(w.engine(x)["recon"])
    w.engine.train()
    return loss


def _train(w, steps: int) -> list[str]:
    keys = []
    for batch in w.stream.iter_epoch(w.stream.epoch, w.stream.step_in_epoch):
        loss = w.engine(batch["image"])["loss"]
        w.engine.backward(loss)
        w.engine.step()
        keys += batch["key"]
        w.state.step += 1
        w.state.step_in_epoch = w.stream.step_in_epoch
        if len(keys) >= steps * B:
            break
    return keys


def _save_rank(rank, world, shards, folder, zero_stage, steps):
    from pipeline.train.checkpoint import write_checkpoint

    w = _worker(rank, world, shards, zero_stage, seed=0)
    keys = _train(w, steps)
    write_checkpoint(w, Path(folder))
    return {"keys": keys, "loss": _fixed_loss(w)}


def _resume_rank(rank, world, shards, folder, zero_stage):
    from pipeline.train.checkpoint import restore_newest

    w = _worker(rank, world, shards, zero_stage, seed=123)
    restore_newest(w, [Path(folder)])
    loss = _fixed_loss(w)
    keys = _train(w, 10**6)  # the rest of the epoch
    return {"loss": loss, "keys": keys, "step": w.state.step, "resumed": w.resumed_from}


@pytest.mark.parametrize("zero_stage, before, after", [(1, 2, 1), (2, 2, 1), (3, 2, 1), (2, 1, 2), (3, 1, 2)])
def test_resume_on_another_world_size(shards32, tmp_path, zero_stage, before, after):
    from pipeline.data.stream import ShardStream
    from pipeline.train.checkpoint import UNIVERSAL_DIR, commit_status

    folder = tmp_path / "checkpoint_x"
    folder.mkdir()
    saved = run_ranks(_save_rank, world=before, args=(shards32, str(folder), zero_stage, 3))
    assert commit_status(folder)[0]
    resumed = run_ranks(_resume_rank, world=after, args=(shards32, str(folder), zero_stage))
    assert (folder / UNIVERSAL_DIR / "latest_universal").is_file()
    for r in resumed:
        assert r["resumed"] == 3
        assert r["loss"] == pytest.approx(saved[0]["loss"], rel=1e-5)  # weights continue exactly
    seen = [k for part in saved + resumed for k in part["keys"]]
    assert len(seen) == len(set(seen)), "a sample was seen twice in the epoch"
    everything = ShardStream(shards32, "train", B, 32, 0, 1, num_workers=0).all_keys()
    assert len(set(everything) - set(seen)) < after * B  # only the last partial global batch
    assert len({r["step"] for r in resumed}) == 1  # every new rank ran the same steps

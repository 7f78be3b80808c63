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


def _phase_rank(rank, world, shards, saves, resumes):
    """One call's share of the cases, on ``world`` ranks: ``saves`` and ``resumes`` are lists of
    (case, folder, zero_stage). Each case builds its own engine and stream (the model from its
    ``train.seed``, the fixed loss from ``manual_seed(5)``) and writes only its own folder."""
    return {"saved": {case: _save_rank(rank, world, shards, folder, zero_stage, 3)
                      for case, folder, zero_stage in saves},
            "resumed": {case: _resume_rank(rank, world, shards, folder, zero_stage)
                        for case, folder, zero_stage in resumes}}


CASES = [(1, 2, 1), (2, 2, 1), (3, 2, 1), (1, 1, 2), (2, 1, 2), (3, 1, 2)]  # (zero_stage, before, after)


@pytest.fixture(scope="module")
def runs(shards32, tmp_path_factory) -> dict:
    """Every case's save and resume, one spawn per world size and phase instead of two per case:
    the 1-rank saves, then the 2-rank saves with the 1 -> 2 resumes, then the 2 -> 1 resumes.
    A case's resume always runs in a later call than its save, and its folder's commit status is
    read between the two, as the test read it."""
    from pipeline.train.checkpoint import commit_status

    folders = {}
    for case in CASES:
        folders[case] = tmp_path_factory.mktemp("resume") / "checkpoint_x"
        folders[case].mkdir()
    saved, committed, resumed = {}, {}, {}
    for world in (1, 2, 1):
        saves = [c for c in CASES if c[1] == world and c not in saved]
        resumes = [c for c in CASES if c[2] == world and c in saved and c not in resumed]
        out = run_ranks(_phase_rank, world=world, timeout=600.0,
                        args=(shards32, [(c, str(folders[c]), c[0]) for c in saves],
                              [(c, str(folders[c]), c[0]) for c in resumes]))
        for c in saves:
            saved[c], committed[c] = [r["saved"][c] for r in out], commit_status(folders[c])
        for c in resumes:
            resumed[c] = [r["resumed"][c] for r in out]
    return {c: SimpleNamespace(folder=folders[c], saved=saved[c], committed=committed[c], resumed=resumed[c])
            for c in CASES}


@pytest.mark.parametrize("zero_stage, before, after", CASES)
def test_resume_on_another_world_size(shards32, runs, zero_stage, before, after):
    from pipeline.data.stream import ShardStream
    from pipeline.train.checkpoint import UNIVERSAL_DIR

    run = runs[(zero_stage, before, after)]
    folder, saved, resumed = run.folder, run.saved, run.resumed
    assert len(saved) == before and len(resumed) == after
    assert run.committed[0]  # read right after the save, before the resume
    assert (folder / UNIVERSAL_DIR / "latest_universal").is_file()
    for r in resumed:
        assert r["resumed"] == 3
        assert r["loss"] == pytest.approx(saved[0]["loss"], rel=1e-5)  # weights continue exactly
    seen = [k for part in saved + resumed for k in part["keys"]]
    assert len(seen) == len(set(seen)), "a sample was seen twice in the epoch"
    everything = ShardStream(shards32, "train", B, 32, 0, 1, num_workers=0).all_keys()
    assert len(set(everything) - set(seen)) < after * B  # only the last partial global batch
    assert len({r["step"] for r in resumed}) == 1  # every new rank ran the same steps

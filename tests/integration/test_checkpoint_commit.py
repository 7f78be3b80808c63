"""Checkpoints are chosen by their commit marker, never by counting files: a truncated or
missing file, a missing marker or another world size is refused with the reason, and a
restore that fails on the newest committed checkpoint falls back to the previous one."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.train.checkpoint import (
    MARKER_FILE, STATE_FILE, CheckpointError, commit_status, committed_checkpoints, restore_newest, write_marker,
)
from pipeline.train.trainer import find_checkpoint
from pipeline.train.worker import TrainState


def _checkpoint(run: Path, name: str, step: int, world: int = 2, sizes=(100, 80)) -> Path:
    d = run / name
    (d / "ds").mkdir(parents=True)
    per_rank = []
    for r, size in enumerate(sizes):
        f = d / "ds" / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
        f.write_bytes(b"x" * size)
        per_rank.append({str(f.relative_to(d)): size})
    (d / STATE_FILE).write_text(json.dumps({"train_state": {"step": step}, "data_state": {"pos": step}}))
    per_rank[0][STATE_FILE] = (d / STATE_FILE).stat().st_size
    write_marker(d, per_rank, step, world, 2)
    return d


def test_a_committed_checkpoint_lists_every_ranks_files(tmp_path):
    d = _checkpoint(tmp_path, "checkpoint_a", 10)
    assert commit_status(d) == (True, "")
    listed = json.loads((d / MARKER_FILE).read_text())["files"]
    assert sorted(listed) == sorted(["ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                     "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", STATE_FILE])


def test_truncated_missing_and_unmarked_checkpoints_are_never_committed(tmp_path):
    truncated = _checkpoint(tmp_path, "checkpoint_t", 20)
    shard = truncated / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 40)  # cut off mid-upload
    ok, why = commit_status(truncated)
    assert not ok and "zero_pp_rank_1" in why and "40 bytes" in why and "80" in why
    missing = _checkpoint(tmp_path, "checkpoint_m", 30)
    (missing / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    assert not commit_status(missing)[0] and "missing" in commit_status(missing)[1]
    unmarked = _checkpoint(tmp_path, "checkpoint_u", 40)
    (unmarked / MARKER_FILE).unlink()
    assert "no vaepipe_commit.json" in commit_status(unmarked)[1]
    good = _checkpoint(tmp_path, "checkpoint_g", 10)
    assert committed_checkpoints(tmp_path) == [good]  # the higher steps are all refused


def test_resume_refuses_an_uncommitted_folder_and_takes_the_newest_committed(tmp_path):
    _checkpoint(tmp_path, "checkpoint_1", 5)
    newest = _checkpoint(tmp_path, "checkpoint_2", 10)
    torn = _checkpoint(tmp_path, "checkpoint_3", 15)
    (torn / MARKER_FILE).write_text('{"step": 15, "files": {')  # cut off while written
    assert find_checkpoint(str(tmp_path), "sqlite:///unused.db") == newest
    with pytest.raises(ConfigError, match="not a committed checkpoint.*not valid JSON"):
        find_checkpoint(str(torn), "sqlite:///unused.db")


class _Engine:
    def __init__(self, broken: set):
        self.broken, self.loaded = broken, []
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}])
        self._config = SimpleNamespace(load_universal_checkpoint=False)

    def load_checkpoint(self, path, tag):
        if Path(path).name in self.broken:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")
        self.loaded.append(Path(path).name)


def _worker(broken=(), world=2):
    stream = SimpleNamespace(state=None, epoch=0, step_in_epoch=0)
    stream.load_state_dict = lambda s: setattr(stream, "state", s)
    # what a restore reads of the config: the lr, the seed (RNG re-seeding), the ZeRO stage (weight EMA)
    cfg = SimpleNamespace(optim=SimpleNamespace(lr=1e-3), train=SimpleNamespace(seed=0), dist=SimpleNamespace(zero_stage=2))
    return SimpleNamespace(engine=_Engine(set(broken)), state=TrainState(), stream=stream, aux=None, cfg=cfg,
                           device=torch.device("cpu"), world_size=world, rank=0, resumed_from=None)


def test_restore_falls_back_to_the_previous_committed_checkpoint(tmp_path, capsys):
    older, newer = _checkpoint(tmp_path, "checkpoint_1", 5), _checkpoint(tmp_path, "checkpoint_2", 10)
    w = _worker(broken={"checkpoint_2"})
    restore_newest(w, committed_checkpoints(tmp_path))
    assert w.engine.loaded == ["checkpoint_1"] and w.state.step == 5 and w.resumed_from == 5
    assert w.stream.state == {"pos": 5} and w.engine.optimizer.param_groups[0]["lr"] == 1e-3
    assert "PytorchStreamReader" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="checkpoint_1.*checkpoint_2|checkpoint_2.*checkpoint_1"):
        restore_newest(_worker(broken={"checkpoint_1", "checkpoint_2"}), [newer, older])


def test_another_world_size_goes_through_a_universal_conversion_and_its_failure_is_named(tmp_path):
    four = _checkpoint(tmp_path, "checkpoint_4", 10, world=4, sizes=(10, 10, 10, 10))  # not real DeepSpeed files
    with pytest.raises(CheckpointError, match="converting the 4-rank checkpoint to a universal one failed"):
        restore_newest(_worker(world=2), [four])


def test_a_file_named_like_a_checkpoint_is_not_one(tmp_path):
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"  # Ray Train's own file in the run folder
    snapshot.write_text("{}")
    assert "no vaepipe_commit.json" in commit_status(snapshot)[1]
    assert committed_checkpoints(tmp_path) == []


class _SlowSaver:
    """Writes this rank's shard the way a large ``torch.save`` does: in parts, over time."""

    def __init__(self, rank: int):
        self.rank = rank

    def save_checkpoint(self, folder, tag, client_state):
        import time

        with open(Path(folder) / tag / f"rank_{self.rank}.pt", "wb") as f:
            f.write(b"x" * 1000)
            f.flush()
            if self.rank == 0:
                time.sleep(1.0)  # rank 1 is done by now and would list this file half written
                f.write(b"x" * 1000)


def _commit_rank(rank, world, folder):
    from pipeline.config import load_config
    from pipeline.train.checkpoint import write_checkpoint

    (Path(folder) / "ds").mkdir(exist_ok=True)
    stream = SimpleNamespace(state_dict=lambda: {"pos": 3})
    w = SimpleNamespace(engine=_SlowSaver(rank), state=TrainState(), stream=stream, aux=None, rank=rank,
                        world_size=world, cfg=load_config(None, ["model.flavor=debug"]), log=SimpleNamespace(run_id="r"))
    write_checkpoint(w, Path(folder))
    return commit_status(Path(folder))


@pytest.mark.integration
def test_ranks_sharing_a_folder_commit_only_what_every_rank_finished_writing(tmp_path):
    from dist_helpers import run_ranks

    statuses = run_ranks(_commit_rank, world=2, args=(str(tmp_path),))
    assert statuses[0] == (True, "")
    listed = json.loads((tmp_path / MARKER_FILE).read_text())["files"]
    assert listed["ds/rank_0.pt"] == 2000 and listed["ds/rank_1.pt"] == 1000


class _Ctx:
    """A launcher that records what it was handed: the folder, whether it was asked to upload it
    asynchronously, and whether the folder was whole when it was reported."""

    def __init__(self, uploads_async: bool):
        self.uploads_async, self.calls = uploads_async, []

    def report(self, metrics, folder, asynchronous=False, validate=False):
        marker = json.loads((Path(folder) / MARKER_FILE).read_text())
        self.calls.append((Path(folder), asynchronous, commit_status(Path(folder))[0], metrics["step"], marker["upload"]))
        self.validate = validate


@pytest.mark.parametrize("setting,storage,ray_async,expect_async", [
    ("auto", "s3://bucket/runs", True, True),      # remote storage: Ray Train uploads in the background
    ("auto", "runs", True, False),                 # a local folder: copied in report
    ("async", "runs", True, True),
    ("sync", "s3://bucket/runs", True, False),
    ("async", "s3://bucket/runs", False, False),   # local mode copies in report whatever the setting
])
def test_checkpoint_upload_setting_picks_the_mode_and_only_an_async_handover_keeps_the_folder(
        tmp_path, setting, storage, ray_async, expect_async):
    from pipeline.config import load_config
    from pipeline.train.checkpoint import save_checkpoint

    engine = SimpleNamespace(save_checkpoint=lambda folder, tag, client_state: (Path(folder) / tag).mkdir()
                             or (Path(folder) / tag / "rank_0.pt").write_bytes(b"w" * 10))
    cfg = load_config(None, ["model.flavor=debug", f"train.checkpoint_upload={setting}", f"train.storage_path={storage}"])
    ctx = _Ctx(ray_async)
    w = SimpleNamespace(engine=engine, state=TrainState(step=7), stream=SimpleNamespace(state_dict=lambda: {}), aux=None,
                        rank=0, world_size=1, cfg=cfg, log=SimpleNamespace(run_id="r"), ctx=ctx, fault={}, last_val={})
    save_checkpoint(w, {"loss": 1.0})
    (folder, asked_async, committed, step, upload), = ctx.calls
    assert (asked_async, committed, step, upload) == (expect_async, True, 7, "async" if expect_async else "sync")
    assert folder.exists() == expect_async  # sync: removed after the report; async: Ray Train deletes it after upload
    assert ctx.validate is False  # in_loop: the ranks validated before; nothing is handed to a validation task


@pytest.mark.parametrize("validation", ["in_loop", "off_loop"])
def test_off_loop_hands_each_reported_checkpoint_to_validation(tmp_path, validation):
    from pipeline.config import load_config
    from pipeline.train.checkpoint import save_checkpoint

    engine = SimpleNamespace(save_checkpoint=lambda folder, tag, client_state: (Path(folder) / tag).mkdir())
    cfg = load_config(None, ["model.flavor=debug", f"train.validation={validation}"])
    ctx = _Ctx(False)
    w = SimpleNamespace(engine=engine, state=TrainState(step=3), stream=SimpleNamespace(state_dict=lambda: {}), aux=None,
                        rank=0, world_size=1, cfg=cfg, log=SimpleNamespace(run_id="r"), ctx=ctx, fault={}, last_val={})
    save_checkpoint(w, {"loss": 1.0})
    assert ctx.validate is (validation == "off_loop")


class _Payload:
    """What a tampered checkpoint file could carry: unpickling it would run code (here: create a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_deepspeed_files_load_weights_only_and_a_file_carrying_code_is_refused_unrun(tmp_path):
    """``weights_only.load`` (every DeepSpeed load of the engine goes through it) takes tensors and
    the DeepSpeed classes its optimizer files hold, and refuses anything else, naming the file,
    without running it."""
    import pickle

    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from pipeline.train import weights_only

    good = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "exp_avg": torch.ones(3)}}, good)
    loaded = weights_only.load(str(good))["optimizer_state_dict"]
    assert torch.equal(loaded["exp_avg"], torch.ones(3)) and loaded["loss_scaler"].cur_scale == 1.0
    marker, bad = tmp_path / "ran", tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(2)}, "extra": _Payload(marker)}, bad)
    with pytest.raises(pickle.UnpicklingError, match="mp_rank_00_model_states.pt: refused to load with weights_only"):
        weights_only.load(str(bad))
    assert not marker.exists()  # the payload never ran

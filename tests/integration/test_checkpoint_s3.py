"""Checkpoints on S3 (moto on loopback) follow the same commit rules as local ones: the marker and
one listing decide, ``--resume`` takes an s3:// run folder or checkpoint, and a restore downloads
the chosen checkpoint (falling back to the previous committed one when loading fails)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import BUCKET
from pipeline.config import ConfigError
from pipeline.data import storage
from pipeline.train import checkpoint
from pipeline.train.checkpoint import MARKER_FILE, STATE_FILE, commit_status, committed_checkpoints, restore_newest
from pipeline.train.run_storage import file_sizes, upload
from pipeline.train.trainer import find_checkpoint
from test_checkpoint_commit import _checkpoint, _worker


def _on_s3(local: Path, url: str) -> str:
    upload(local, url)
    return url


@pytest.fixture
def s3_run(s3_endpoint, tmp_path, request):
    """Three checkpoints of one run on S3: step 5, step 10 (newest committed), step 15 (torn marker)."""
    run = f"s3://{BUCKET}/{request.node.name}/run"
    _on_s3(_checkpoint(tmp_path, "checkpoint_1", 5), f"{run}/checkpoint_1")
    _on_s3(_checkpoint(tmp_path, "checkpoint_2", 10), f"{run}/checkpoint_2")
    torn = _checkpoint(tmp_path, "checkpoint_3", 15)
    (torn / MARKER_FILE).write_text('{"step": 15, "files": {')
    _on_s3(torn, f"{run}/checkpoint_3")
    return run


def test_commit_status_on_s3_reads_the_marker_and_one_listing(s3_run):
    assert commit_status(f"{s3_run}/checkpoint_2") == (True, "")
    assert "not valid JSON" in commit_status(f"{s3_run}/checkpoint_3")[1]
    shard = f"{s3_run}/checkpoint_1/ds/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    storage.write_bytes(shard, b"x" * 40)  # an upload cut short
    ok, why = commit_status(f"{s3_run}/checkpoint_1")
    assert not ok and "40 bytes" in why and "80" in why
    assert "no vaepipe_commit.json" in commit_status(f"{s3_run}/checkpoint_9")[1]
    assert committed_checkpoints(s3_run) == [f"{s3_run}/checkpoint_2"]


def test_resume_from_an_s3_run_folder_takes_the_newest_committed(s3_run):
    assert find_checkpoint(s3_run, "sqlite:///unused.db") == f"{s3_run}/checkpoint_2"
    assert find_checkpoint(s3_run.rsplit("/", 1)[0], "sqlite:///unused.db") == f"{s3_run}/checkpoint_2"
    assert find_checkpoint(f"{s3_run}/checkpoint_1/", "sqlite:///unused.db") == f"{s3_run}/checkpoint_1"
    with pytest.raises(ConfigError, match="not a committed checkpoint.*not valid JSON"):
        find_checkpoint(f"{s3_run}/checkpoint_3", "sqlite:///unused.db")
    with pytest.raises(ConfigError, match="nothing there"):
        find_checkpoint(f"s3://{BUCKET}/no/such/run", "sqlite:///unused.db")


def test_restore_downloads_the_newest_and_falls_back_when_it_does_not_load(s3_run):
    w = _worker()
    loaded = []

    def load(path, tag):
        step = json.loads((Path(path) / STATE_FILE).read_text())["train_state"]["step"]
        loaded.append(step)
        if step == 10:
            raise RuntimeError("PytorchStreamReader failed reading zip archive")

    w.engine.load_checkpoint = load
    restore_newest(w, committed_checkpoints(s3_run) + [f"{s3_run}/checkpoint_1"])
    assert loaded == [10, 5] and w.state.step == 5 and w.stream.state == {"pos": 5}


def test_another_world_size_converts_once_and_uploads_the_universal_checkpoint(s3_run, monkeypatch):
    def fake_convert(ds_dir: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir.parent / "latest_universal").write_text("ds")

    monkeypatch.setattr(checkpoint, "convert_to_universal", fake_convert)
    w = _worker(world=1)
    paths = []
    w.engine.load_checkpoint = lambda path, tag: paths.append(Path(path).name)
    restore_newest(w, [f"{s3_run}/checkpoint_2"])
    assert paths == ["universal"] and w.state.step == 10
    assert "universal/latest_universal" in file_sizes(f"{s3_run}/checkpoint_2")  # other ranks fetch it from there


def test_a_storage_bucket_that_does_not_exist_is_refused_before_any_worker_starts(s3_endpoint, shards32, tmp_path):
    from conftest import base_overrides
    from pipeline.config import load_config
    from pipeline.train.trainer import preflight

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.storage_path": "s3://no-such-bucket/runs"}))
    with pytest.raises(ConfigError, match="train.storage_path='s3://no-such-bucket/runs'.*no-such-bucket does not exist"):
        preflight(cfg)
    preflight(load_config(None, base_overrides(shards32, tmp_path, **{"train.storage_path": f"s3://{BUCKET}/runs"})))

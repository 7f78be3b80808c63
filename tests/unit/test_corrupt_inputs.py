"""Corrupt inputs never stop training: a truncated tar, a shard gone since the manifest was
written and a sample without its JSON are skipped, counted and logged with shard and key, and
every epoch still has its full number of full batches."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

from pipeline.data.stream import ShardStream


def _damage(src: str, out: Path) -> dict:
    shutil.copytree(src, out)
    shards = [s["name"] for s in json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]]
    truncated, gone, jsonless = out / shards[0], out / shards[1], out / shards[2]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])  # cut mid-member
    gone.unlink()
    members, dropped = [], None
    with tarfile.open(jsonless) as tar:
        for m in tar.getmembers():
            if dropped is None and m.name.endswith(".json"):
                dropped = m.name.rsplit(".", 1)[0]
                continue
            members.append((m, tar.extractfile(m).read()))
    with tarfile.open(jsonless, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data))
    return {"truncated": str(truncated), "gone": str(gone), "jsonless_key": dropped}


def test_damaged_shards_are_skipped_counted_and_logged(shards32, tmp_path, caplog):
    bad = _damage(shards32, tmp_path / "damaged")
    stream = ShardStream(str(tmp_path / "damaged"), "train", 8, 32, 0, 1, shuffle_buffer=16, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.stream"):
        batches = list(stream.iter_epoch(0))
    assert len(batches) == stream.steps_per_epoch and all(len(b["key"]) == 8 for b in batches)
    assert sum(b["n_corrupt"] for b in batches) >= 3
    log = caplog.text
    assert bad["truncated"] in log and bad["gone"] in log  # the shard is named
    assert f"skipping undecodable sample {bad['jsonless_key']} of shard" in log  # and the key
    keys = [k for b in batches for k in b["key"]]
    assert bad["jsonless_key"] not in keys


def test_data_inspect_refuses_a_shard_whose_sha256_does_not_match(shards32, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "tampered"
    shutil.copytree(shards32, out)
    name = json.loads((out / "manifest.json").read_text())["splits"]["valid"]["shards"][0]["name"]
    data = bytearray((out / name).read_bytes())
    data[700] ^= 0xFF
    (out / name).write_bytes(bytes(data))
    res = CliRunner().invoke(app, ["data", "inspect", str(out)])
    assert res.exit_code == 1 and name in res.output
    assert CliRunner().invoke(app, ["data", "inspect", shards32]).exit_code == 0

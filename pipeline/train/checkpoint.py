"""Checkpoints of a training run: every rank's DeepSpeed shard plus vaepipe's own state.

A checkpoint folder holds ``ds/`` (DeepSpeed's per-rank files), ``vaepipe_state.json``
(train state, data position, config, MLflow run id), the auxiliary network when a family
has one, and the resolved ``config.yaml``. Every rank writes into its own temporary folder
and reports it; Ray merges them into one checkpoint on storage.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import to_dict, to_yaml
from pipeline.redact import redact_config_dict

STATE_FILE = "vaepipe_state.json"
AUX_FILE = "auxiliary.pt"  # the auxiliary network and its optimizer (identical on every rank)
CKPT_TAG = "ds"  # one tag per Ray checkpoint folder: Ray keeps the history, not DeepSpeed


def read_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def checkpoint_step(folder: Path) -> int:
    return int(read_state(folder)["train_state"]["step"])


def save_checkpoint(w: Any, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard into its own folder, then all report one checkpoint.

    Ray merges the ranks' folders into one checkpoint on storage, so a restart on any
    rank layout that matches the world size finds every shard.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        saved = {"train_state": w.state.state_dict(), "data_state": w.stream.state_dict(),
                 "config": redact_config_dict(to_dict(w.cfg)), "mlflow_run_id": w.log.run_id}
        w.engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"vaepipe": saved})
        if w.rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(saved))
            if w.aux is not None:
                torch.save(w.aux.state_dict(), Path(tmp) / AUX_FILE)
            (Path(tmp) / "config.yaml").write_text(to_yaml(w.cfg))
        report = {**metrics, **w.last_val, "step": w.state.step}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def complete_checkpoints(run_dir: Path, world_size: int, zero_stage: int) -> list[Path]:
    """Checkpoint folders under ``run_dir`` holding the state file and every rank's ZeRO shard."""
    out = []
    for d in run_dir.glob("checkpoint_*"):
        tag = d / CKPT_TAG
        if not (d / STATE_FILE).exists() or not list(tag.glob("*model_states.pt")):
            continue
        if zero_stage >= 1 and len(list(tag.glob("*optim_states.pt"))) < world_size:
            continue
        out.append(d)
    return out


def restore(w: Any, run_dir: Optional[str], resume_from: Optional[str]) -> None:
    """Load the newest checkpoint into engine, train state and data position.

    Candidates: the folder ``--resume`` named, and the latest checkpoint Ray registered for
    this run (after an automatic restart). A
    report that reached storage but not the controller (a rank died within the controller's
    poll interval of reporting) is found by scanning the run folder for complete checkpoints;
    the one with the highest step wins.
    """
    import ray.train

    candidates: list[Path] = [Path(resume_from)] if resume_from else []
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt is not None else contextlib.nullcontext()) as ray_dir:
        if ray_dir is not None:
            candidates.append(Path(ray_dir))
        if run_dir and "://" not in run_dir:
            candidates += complete_checkpoints(Path(run_dir), w.world_size, w.cfg.dist.zero_stage)
        if not candidates:
            return
        best = max(candidates, key=checkpoint_step)
        w.engine.load_checkpoint(str(best), tag=CKPT_TAG)
        # the config's learning rate wins over the one saved with the optimizer state: a PBT
        # exploit or a resumed run with a new optim.lr continues with the new value
        for group in w.engine.optimizer.param_groups:
            group["lr"] = w.cfg.optim.lr
        saved = read_state(best)
        if w.aux is not None and (best / AUX_FILE).exists():
            w.aux.load_state_dict(torch.load(best / AUX_FILE, map_location=w.device))
    w.state.load_state_dict(saved["train_state"])
    w.stream.load_state_dict(saved["data_state"])
    w.resumed_from = w.state.step

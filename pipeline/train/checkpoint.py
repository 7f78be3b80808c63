"""Checkpoints of a training run: write, commit, find the newest committed one, restore.

A checkpoint folder holds ``ds/`` (DeepSpeed's per-rank files), ``vaepipe_state.json``
(train state, data position, config, MLflow run id), the auxiliary network when a family
has one, the resolved ``config.yaml`` and the commit marker ``vaepipe_commit.json``. Every
rank writes into its own temporary folder; the ranks then exchange the names and sizes of
what they wrote, rank 0 writes the marker listing every rank's files, and all report the
folder to Ray, which merges them into one checkpoint on storage (in local mode the one rank's
folder is copied into the run folder instead: ``rank_context.LocalRank``).

A checkpoint is *committed* only when the marker is there and every file it lists is there
with exactly the listed size: a rank killed while writing or uploading leaves a folder that
is never chosen. A restore tries the newest committed checkpoint first and falls back to the
previous one when loading fails on any rank.

The run folder is local or on S3 (``train.storage_path=s3://...``): checks and searches go
through ``run_storage``, and an S3 checkpoint is downloaded by every rank before it is loaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import to_dict, to_yaml
from pipeline.redact import redact_config_dict
from pipeline.tracking import say
from pipeline.train import ema, rng_state
from pipeline.train.collectives import any_rank, gather_objects
from pipeline.train.faults import maybe_pause
from pipeline.train.run_storage import (
    Location, child, download, file_sizes, find_folders, is_remote, local_copy, location, read_text, upload,
)

STATE_FILE = "vaepipe_state.json"
AUX_FILE = "auxiliary.pt"  # the auxiliary network and its optimizer (identical on every rank)
MARKER_FILE = "vaepipe_commit.json"  # written last by rank 0: every rank's files and sizes
CKPT_TAG = "ds"  # one tag per Ray checkpoint folder: Ray keeps the history, not DeepSpeed


class CheckpointError(RuntimeError):
    """No committed checkpoint could be restored; the message lists each candidate's reason."""


def read_state(folder: Location) -> dict:
    return json.loads(read_text(child(folder, STATE_FILE)))


def checkpoint_step(folder: Location) -> int:
    return int(read_state(folder)["train_state"]["step"])


def save_checkpoint(w: Any, metrics: dict) -> None:
    """Every rank saves its shard, rank 0 commits the file list, then all report one checkpoint.
    With an asynchronous upload (``train.checkpoint_upload``) Ray Train deletes the folder once uploaded."""
    folder = Path(tempfile.mkdtemp(prefix="vaepipe-checkpoint-"))
    asynchronous, handed_over = upload_async(w.cfg.train) and w.ctx.uploads_async, False
    try:
        write_checkpoint(w, folder, "async" if asynchronous else "sync")
        maybe_pause(w, "checkpoint")  # fault drills only: a kill between writing and reporting
        report = {**metrics, **w.last_val, "step": w.state.step, "images_seen": w.state.samples_seen}
        if getattr(w, "growth", None) is not None:  # Tune compares val metrics only at equal resolution
            report["resolution"] = w.state.resolution
        # Ray Train persists it (and, off_loop, has it validated); local mode copies it into the run folder
        w.ctx.report(report, folder, asynchronous, validate=w.cfg.train.off_loop)
        handed_over = asynchronous  # Ray Train deletes the folder once it is uploaded
    finally:
        if not handed_over:
            shutil.rmtree(folder, ignore_errors=True)


def upload_async(train_cfg: Any) -> bool:
    """``train.checkpoint_upload``: ``auto`` is asynchronous where the run folder is remote."""
    if train_cfg.checkpoint_upload == "auto":
        return is_remote(train_cfg.storage_path)
    return train_cfg.checkpoint_upload == "async"


def write_checkpoint(w: Any, folder: Path, upload: str = "sync") -> None:
    """This rank's part of a checkpoint in ``folder``; rank 0 adds the state and the commit marker
    (which also says how the checkpoint is ``upload``ed: sync or async)."""
    rng_state.save(folder, w.rank)  # first: nothing below may draw before the state is kept
    saved = {"train_state": w.state.state_dict(), "data_state": w.stream.state_dict(),
             "config": redact_config_dict(to_dict(w.cfg)), "mlflow_run_id": w.log.run_id}
    w.engine.save_checkpoint(str(folder), tag=CKPT_TAG, client_state={"vaepipe": saved, **universal_info()})
    ema.save(getattr(w, "ema", None), folder, w.rank)
    if w.rank == 0:
        (folder / STATE_FILE).write_text(json.dumps(saved))
        if w.aux is not None:
            torch.save(w.aux.state_dict(), folder / AUX_FILE)
        (folder / "config.yaml").write_text(to_yaml(w.cfg))
    gather_objects(None)  # a barrier: ranks that share the folder list it only once every rank has written
    listed = gather_objects(file_sizes(folder))
    if w.rank == 0:
        write_marker(folder, listed, w.state.step, w.world_size, w.cfg.dist.zero_stage, upload)


def universal_info() -> dict:
    """What ``ds_to_universal`` needs in client state to convert this checkpoint to any world size."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}


def write_marker(folder: Path, per_rank: list[dict[str, int]], step: int, world_size: int, zero_stage: int,
                 upload: str = "sync") -> None:
    files: dict[str, int] = {}
    for rank_files in per_rank:
        files.update(rank_files)
    marker = {"step": step, "world_size": world_size, "zero_stage": zero_stage, "upload": upload, "files": files}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=1))


def commit_status(folder: Location) -> tuple[bool, str]:
    """(True, "") for a committed checkpoint, else (False, what is wrong with it). On S3 this is
    one GET of the marker and one listing: objects appear whole, so a listed size is the size."""
    try:
        marker = marker_of(folder)
    except (FileNotFoundError, NotADirectoryError):
        return False, f"{folder}: no {MARKER_FILE} (never committed: written before vaepipe committed, or cut off)"
    except ValueError:
        return False, f"{folder}: {MARKER_FILE} is not valid JSON (cut off while written)"
    except OSError as exc:  # storage unreachable: not committed as far as anyone can tell
        return False, f"{folder}: {MARKER_FILE} could not be read ({exc})"
    present = file_sizes(folder)
    for rel, size in marker["files"].items():
        if rel not in present:
            return False, f"{folder}: {rel} is missing"
        if present[rel] != size:
            return False, f"{folder}: {rel} has {present[rel]} bytes, the commit lists {size} (truncated)"
    return True, ""


def marker_of(folder: Location) -> dict:
    return json.loads(read_text(child(folder, MARKER_FILE)))


def committed_checkpoints(run_dir: Location, recursive: bool = False) -> list[Location]:
    """Committed checkpoint folders under ``run_dir`` (a local folder or an s3:// URL), newest step first."""
    found = [d for d in find_folders(run_dir, "checkpoint_*", recursive) if commit_status(d)[0]]
    return sorted(found, key=lambda d: marker_of(d)["step"], reverse=True)


def _candidates(run_dir: Optional[str], resume_from: Optional[str], ray_ckpt: Optional[Location]) -> list[Location]:
    """``--resume``'s folder, Ray's latest and the run folder's committed ones, newest first, once each."""
    found = [location(p) for p in (resume_from, ray_ckpt) if p]
    if run_dir:
        found += committed_checkpoints(location(run_dir))
    unique = {d if is_remote(d) else str(Path(d).resolve()): d for d in found}
    return sorted(unique.values(), key=lambda d: marker_of(d)["step"] if commit_status(d)[0] else -1, reverse=True)


def restore(w: Any, run_dir: Optional[str], resume_from: Optional[str]) -> None:
    """Load the newest committed checkpoint that every rank can load into engine, state and stream.
    Ray's latest checkpoint is taken where it lives (a local folder or S3), not downloaded here."""
    with w.ctx.launch_checkpoint() as ray_ckpt:
        restore_newest(w, _candidates(run_dir, resume_from, ray_ckpt))


def restore_newest(w: Any, candidates: list[Location]) -> None:
    """Try ``candidates`` in order; the first that every rank loads wins. Ranks agree after each try."""
    reasons = []
    for folder in candidates:
        reason = _try_load(w, folder)
        if not any_rank(reason is not None, w.device):
            w.resumed_from = w.state.step
            if reasons and w.rank == 0:
                say(f"restored {folder} (step {w.state.step}) after skipping: " + "; ".join(reasons))
            return
        reasons.append(reason or f"{folder}: another rank could not load it")
    if reasons:
        raise CheckpointError("no committed checkpoint could be restored: " + "; ".join(reasons))


UNIVERSAL_DIR = "universal"  # beside ds/: the same state converted to a world-size-free layout


def ensure_universal(w: Any, folder: Path, saved_world: int, remote: Optional[str] = None) -> Optional[str]:
    """Rank 0 converts ``folder``'s shards with DeepSpeed's ``ds_to_universal`` (once; the result
    stays in the checkpoint folder); every rank waits for it. ``folder`` is a local copy of the S3
    checkpoint ``remote`` when given: rank 0 uploads the conversion there and the other ranks,
    on any node, download it. None on success, else why not."""
    out, name = folder / UNIVERSAL_DIR, remote or folder
    error = None
    if w.rank == 0 and not (out / "latest_universal").is_file():
        try:
            convert_to_universal(folder / CKPT_TAG, out / CKPT_TAG)
            if remote:
                upload(out, child(remote, UNIVERSAL_DIR))
        except Exception as exc:  # reported below, agreed by every rank
            error = f"{name}: converting the {saved_world}-rank checkpoint to a universal one failed ({exc})"
    if any_rank(error is not None, w.device):
        return error or f"{name}: rank 0 could not convert it to a universal checkpoint"
    if remote:  # every rank, so the agreement below is reached by all
        if not (out / "latest_universal").is_file():
            error = _fetch(child(remote, UNIVERSAL_DIR), out)
        if any_rank(error is not None, w.device):
            return error or f"{name}: another rank could not download its universal checkpoint"
    if w.rank == 0:
        say(f"resuming the {saved_world}-rank checkpoint {str(name).rsplit('/', 1)[-1]} on {w.world_size} ranks "
            "(universal checkpoint)")
    return None


def _fetch(url: str, local: Path) -> Optional[str]:
    try:
        download(url, local)
    except OSError as exc:
        return f"{url}: download failed ({exc})"
    return None


def convert_to_universal(ds_dir: Path, out_dir: Path) -> None:
    from types import SimpleNamespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    ds_to_universal(SimpleNamespace(input_folder=str(ds_dir), output_folder=str(out_dir), num_extract_workers=1,
                                    num_merge_workers=1, keep_temp_folder=False, strict=True,
                                    inject_missing_state=False))


def _load_engine(w: Any, load_dir: Path, universal: bool) -> None:
    """``engine.load_checkpoint``; a universal one with DeepSpeed's ``load_universal`` switched on for
    this call only (the engine reads the flag when it loads, not when it is built)."""
    config = w.engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal
    try:
        w.engine.load_checkpoint(str(load_dir), tag=CKPT_TAG)
    finally:
        config.load_universal_checkpoint = before


def _try_load(w: Any, folder: Location) -> Optional[str]:
    """Load ``folder`` into this rank; None on success, else why not. An S3 checkpoint is
    downloaded to a temporary folder first (its universal conversion only when needed)."""
    ok, why = commit_status(folder)
    if not ok:
        return why
    marker = marker_of(folder)
    skip = () if marker["world_size"] != w.world_size else (UNIVERSAL_DIR,)
    with contextlib.ExitStack() as stack:
        local, why = _local_folder(w, folder, skip, stack)
        return why or _load_from(w, folder, local, marker["world_size"])


def apply_lr_scale(w: Any) -> None:
    """The optimizer's learning rate: the config's, times the divergence rollbacks' scale."""
    for group in w.engine.optimizer.param_groups:
        group["lr"] = w.cfg.optim.lr * getattr(w.state, "lr_scale", 1.0)


def _local_folder(w: Any, folder: Location, skip: tuple, stack: contextlib.ExitStack) -> tuple[Optional[Path], Optional[str]]:
    """(local folder with ``folder``'s files, None), or (None, why not) agreed by every rank."""
    try:
        local, error = stack.enter_context(local_copy(folder, skip)), None
    except OSError as exc:
        local, error = None, f"{folder}: download failed ({exc})"
    if is_remote(folder) and any_rank(error is not None, w.device):  # a download can fail on one rank only
        return None, error or f"{folder}: another rank could not download it"
    return local, error


def _load_from(w: Any, folder: Location, local: Path, saved_world: int) -> Optional[str]:
    """Load the local copy ``local`` of ``folder`` into engine, state and stream."""
    load_dir = local
    if saved_world != w.world_size:
        why = ensure_universal(w, local, saved_world, remote=folder if is_remote(folder) else None)
        if why:
            return why
        load_dir = local / UNIVERSAL_DIR
    try:
        saved = read_state(local)
        growth = getattr(w, "growth", None)  # a progressive run: the engine must be the saved phase's
        if growth is not None:
            growth.prepare_restore(w, saved["train_state"])
        _load_engine(w, load_dir, universal=load_dir != local)
        if w.aux is not None and (local / AUX_FILE).exists():
            w.aux.load_state_dict(torch.load(local / AUX_FILE, map_location=w.device, weights_only=True))
        note = ema.load(getattr(w, "ema", None), local, w.rank, saved_world == w.world_size,
                        partitioned=w.cfg.dist.zero_stage == 3)
        if note and w.rank == 0:
            say(note)
    except Exception as exc:  # a committed file that still does not load: fall back to an older one
        return f"{folder}: loading failed ({type(exc).__name__}: {str(exc)[:200]})"
    w.state.load_state_dict(saved["train_state"])
    # the config's learning rate wins over the one saved with the optimizer state (a PBT exploit or
    # a resumed run with a new optim.lr continues with the new value), times a rollback's scale
    apply_lr_scale(w)
    if getattr(w, "growth", None) is not None:
        w.growth.after_restore(w)
    w.stream.load_state_dict(saved["data_state"])
    note = rng_state.load(local, w.rank, saved_world == w.world_size, w.cfg.train.seed, w.state.step)
    if note and w.rank == 0:
        say(note)
    # the stream owns the data position: after a re-split (another world size) it starts the
    # rest of the epoch at step 0 of the new layout
    w.state.epoch, w.state.step_in_epoch = w.stream.epoch, w.stream.step_in_epoch
    return None

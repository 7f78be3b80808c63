"""What a run does after ``train.max_consecutive_skips`` non-finite steps in a row.

``train.on_divergence=fail`` stops the run with a message naming the learning rate and the data.
``rollback`` (what VDVAE and NVAE users ask for most) restores the newest committed checkpoint,
multiplies the learning rate by ``train.rollback_lr_factor`` and trains on, at most
``train.max_rollbacks`` times. The scale is part of the train state, so it survives checkpoints
and restarts (``checkpoint._load_from`` applies it), and every rollback is counted there too. ``checkpoint.apply_lr_scale`` sets the rate.

Every rank reaches this point at the same step (non-finite losses are agreed over ranks), so all
of them restore together, as the restore's collectives need.
"""

from __future__ import annotations

from typing import Any

from pipeline.tracking import say
from pipeline.train.checkpoint import CheckpointError, apply_lr_scale, committed_checkpoints, restore_newest
from pipeline.train.run_storage import location


class RolledBack(Exception):
    """Raised out of the epoch after a rollback: the loop restarts from the restored position."""


class Diverged(FloatingPointError):
    """The run diverged past its skips and rollbacks. A restart would diverge again at the same
    step (resume is deterministic), so it is not retried (``failures.FailOnce``)."""


def diverged_message(w: Any, consecutive_skips: int) -> str:
    cfg = w.cfg
    return (f"diverged: {consecutive_skips} consecutive non-finite losses at step {w.state.step} "
            f"(train.max_consecutive_skips): lower optim.lr (now {cfg.optim.lr * w.state.lr_scale:g}) "
            f"or check the data at {cfg.data.path}")


def on_divergence(w: Any, consecutive_skips: int) -> None:
    """Fail, or roll back and raise ``RolledBack``; called once the skips reach the limit."""
    t = w.cfg.train
    if t.on_divergence == "fail" or w.state.rollbacks >= t.max_rollbacks:
        suffix = f" after {w.state.rollbacks} rollback(s)" if w.state.rollbacks else ""
        raise Diverged(diverged_message(w, consecutive_skips) + suffix)
    roll_back(w, consecutive_skips)
    raise RolledBack()


def roll_back(w: Any, consecutive_skips: int) -> None:
    """Restore the newest committed checkpoint of this run, then scale the learning rate down."""
    scale = w.state.lr_scale * w.cfg.train.rollback_lr_factor
    rollbacks, at_step = w.state.rollbacks + 1, w.state.step
    candidates = committed_checkpoints(location(w.run_dir)) if w.run_dir else []
    if not candidates:
        raise Diverged(diverged_message(w, consecutive_skips) + ": no committed checkpoint to roll back to")
    try:
        restore_newest(w, candidates)
    except CheckpointError as exc:
        raise Diverged(f"{diverged_message(w, consecutive_skips)}; rollback failed: {exc}") from None
    w.state.lr_scale, w.state.rollbacks = scale, rollbacks
    apply_lr_scale(w)
    if w.rank == 0:
        say(f"diverged at step {at_step}: rolled back to step {w.state.step} with the learning rate x{scale:g} "
            f"({w.cfg.optim.lr * scale:g}; rollback {rollbacks} of {w.cfg.train.max_rollbacks})")
        w.log.tags({"vaepipe.rollbacks": rollbacks, "vaepipe.lr_scale": scale})

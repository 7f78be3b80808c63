"""The loop Ray Train runs on every rank: it drives steps and decides when to observe and save.

Layered as in torchtitan: ``worker.build_worker`` sets a rank up, ``step.train_step`` does one
micro-batch, ``observe`` logs windows, validation and images, ``checkpoint`` saves and
restores, ``export`` logs the model. This module only sequences them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from pipeline.tracking import say
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.console import quiet_rank
from pipeline.train.divergence import RolledBack, on_divergence
from pipeline.train.ema import ema_weights
from pipeline.train.export import export_model
from pipeline.train.faults import maybe_exit, maybe_pause, maybe_slow
from pipeline.train.progressive_loop import fade_batch, grow_if_due, log_stage_metrics, start_growth
from pipeline.train.observe import MetricWindow, log_images, log_window, validate
from pipeline.train.preemption import notice_due
from pipeline.train.rank_context import RayTrainRank
from pipeline.stages import total_images
from pipeline.train.step import train_step
from pipeline.train.system_metrics import start_system_metrics
from pipeline.train.timers import phase, timed_iter
from pipeline.train.worker import Worker, build_worker


def train_loop_per_worker(loop_config: dict, ctx: Optional[Any] = None) -> None:
    """Entry point of every Ray Train worker. ``loop_config`` is a plain dict (see trainer);
    ``ctx`` is local mode's ``LocalRank`` (a Ray Train worker asks Ray: ``RayTrainRank``)."""
    # torch.distributed warns on every ZeRO collective that DeepSpeed still uses the old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    quiet_rank(loop_config["config"]["tracking"]["verbose"])
    w = build_worker(loop_config, ctx if ctx is not None else RayTrainRank())
    if w.rank == 0 and w.resumed_from is not None:
        say(f"resumed from step {w.resumed_from}")
        w.log.tags({"vaepipe.resumed_from_step": w.resumed_from})
    # a restarted group redoes the steps since its checkpoint (or since step 0, where none was
    # committed yet): what the run holds of them is not logged again
    w.log.skip_held()
    monitor = start_system_metrics(w)  # every rank, its own node id
    first_step = w.state.step
    try:
        run_steps(w)
    finally:
        if monitor is not None:
            monitor.finish()
    if w.cfg.tracking.log_model and w.state.step == first_step:
        with ema_weights(w):
            export_model(w)  # resumed at the end: no step ran, so after_step did not export
    w.log.flush()


@dataclass
class LoopState:
    """What the loop remembers between batches besides TrainState (not checkpointed)."""

    window: MetricWindow = field(default_factory=MetricWindow)
    consecutive_skips: int = 0
    untrained: bool = False  # a fresh run draws the untrained model at step 0, where the UI's image slider starts
    preemption_saved: bool = False  # this segment took its just-in-time checkpoint (preemption.py)


def finished(w: Worker) -> bool:
    """A progressive run ends after its last stage's images; any other after ``train.max_steps``."""
    if w.growth is not None:
        return w.state.samples_seen >= total_images(w.growth.stages)
    return w.state.step >= w.cfg.train.max_steps


def run_steps(w: Worker) -> None:
    """Epochs of the stream until the run is finished."""
    loop = LoopState(untrained=w.state.step == 0)
    if w.growth is not None:
        start_growth(w)
    while not finished(w):
        try:
            ran_out = run_epoch(w, loop)
        except RolledBack:  # train.on_divergence=rollback: go on from the restored position
            loop.consecutive_skips, loop.window = 0, MetricWindow()
            continue
        if ran_out:
            w.state.epoch, w.state.step_in_epoch = w.state.epoch + 1, 0


def run_epoch(w: Worker, loop: LoopState) -> bool:
    """Steps through one epoch from the saved position. True when the epoch ran out, False when it
    stopped early: the run finished, or the model grew (the new phase starts its own epoch)."""
    st = w.state
    for batch in timed_iter(w.stream.iter_epoch(st.epoch, start_step=st.step_in_epoch), w.clock):
        if loop.untrained:
            with phase(w.clock, "observe"):
                log_images(w, batch)
            loop.untrained = False
        st.step_in_epoch += 1
        st.corrupt_samples += int(batch.get("n_corrupt", 0))
        if w.growth is not None:
            batch = fade_batch(w, batch)
        out = train_step(w, batch)
        if not counted(w, loop, out):
            continue  # skipped, or accumulating: the optimizer step comes with a later micro-batch
        grew = on_optimizer_step(w, loop, out, batch)
        if finished(w) or grew:
            return False
    return True


def counted(w: Worker, loop: LoopState, out: dict) -> bool:
    """True when ``out`` closed an optimizer step; counts skipped steps and fails on divergence."""
    if out["skipped"]:
        w.state.skipped_steps += 1
        loop.consecutive_skips += 1
        check_divergence(w, loop.consecutive_skips)
        return False
    loop.consecutive_skips = 0
    return bool(out["boundary"])


def on_optimizer_step(w: Worker, loop: LoopState, out: dict, batch: dict) -> bool:
    """Count the step, run the fault drills, grow when a phase ends, then log/validate/save.
    Returns whether the model grew (the engine and the stream's shape changed)."""
    st, cfg = w.state, w.cfg
    st.samples_seen += cfg.data.batch_size * cfg.train.grad_accum_steps * w.world_size
    st.step += 1
    if w.ema is not None:
        w.ema.update()
    loop.window.add(out)
    maybe_exit(st.step, w.fault)
    maybe_pause(w, "step")
    maybe_slow(w.fault)
    grew = w.growth is not None and grow_if_due(w, batch)
    with phase(w.clock, "observe"):
        after_step(w, loop.window, None if grew else batch)  # the batch is the old stage's after growing
        if notice_due(w, loop.preemption_saved):
            loop.preemption_saved = True
            if not checkpoint_due(w):  # else after_step has just saved this step
                save_checkpoint(w, loop.window.last_metrics)
    return grew


def checkpoint_due(w: Worker) -> bool:
    """A periodic checkpoint at this step: every ``train.checkpoint_every`` steps and the last."""
    return w.state.step % w.cfg.train.checkpoint_every == 0 or finished(w)


def after_step(w: Worker, window: MetricWindow, batch: Optional[dict]) -> None:
    """Log, validate, draw images and checkpoint when their intervals (or the last step) come."""
    t, step = w.cfg.train, w.state.step
    last, checkpoint = finished(w), checkpoint_due(w)
    model = w.cfg.tracking.log_model and (last or (checkpoint and w.cfg.tracking.model_per_checkpoint))
    if step % t.log_every == 0 or last:
        log_window(w, window)
        if w.growth is not None:
            log_stage_metrics(w)
    # what a run shows and releases is the weight EMA where it keeps one (train.ema_rate)
    with ema_weights(w):
        # a checkpoint's model carries the validation metrics of its own step
        if not t.off_loop and w.cfg.data.val_batches and (step % t.val_every == 0 or last or model):
            validate(w)  # off_loop: a Ray Train validation task scores each checkpoint (checkpoint_validation)
        if batch is not None and (step % t.image_every == 0 or last):
            log_images(w, batch)
        if model:
            # before the report: Tune may stop a trial at it (ASHA at max_t), killing the
            # workers, and a model logged after it would be registered without its files
            export_model(w)
    if checkpoint:
        save_checkpoint(w, window.last_metrics)


def check_divergence(w: Worker, consecutive_skips: int) -> None:
    """Once ``train.max_consecutive_skips`` steps in a row were not finite: fail, or roll back
    (``train.on_divergence``, ``divergence.py``)."""
    if consecutive_skips >= w.cfg.train.max_consecutive_skips:
        on_divergence(w, consecutive_skips)

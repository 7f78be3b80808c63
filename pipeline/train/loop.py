"""The loop Ray Train runs on every rank: it drives steps and decides when to observe and save.

Layered as in torchtitan: ``worker.build_worker`` sets a rank up, ``step.train_step`` does one
micro-batch, ``observe`` logs windows, validation and images, ``checkpoint`` saves and
restores, ``export`` logs the model. This module only sequences them.
"""

from __future__ import annotations

import warnings

from pipeline.tracking import say
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.export import export_model
from pipeline.train.faults import maybe_exit, maybe_pause, maybe_slow
from pipeline.train.observe import MetricWindow, log_images, log_window, validate
from pipeline.train.step import train_step
from pipeline.train.system_metrics import start_system_metrics
from pipeline.train.timers import phase, timed_iter
from pipeline.train.worker import Worker, build_worker


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. ``loop_config`` is a plain dict (see trainer)."""
    # torch.distributed warns on every ZeRO collective that DeepSpeed still uses the old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    w = build_worker(loop_config)
    if w.rank == 0 and w.resumed_from is not None:
        say(f"resumed from step {w.resumed_from}")
        w.log.tags({"vaepipe.resumed_from_step": w.resumed_from})
    monitor = start_system_metrics(w)  # every rank, its own node id
    first_step = w.state.step
    try:
        run_steps(w)
    finally:
        if monitor is not None:
            monitor.finish()
    if w.cfg.tracking.log_model and w.state.step == first_step:
        export_model(w)  # resumed at the end: no step ran, so after_step did not export
    w.log.flush()


def run_steps(w: Worker) -> None:
    """Epochs of the stream until ``train.max_steps`` optimizer steps are done."""
    cfg, st = w.cfg, w.state
    window = MetricWindow()
    consecutive_skips = 0
    untrained = st.step == 0  # a fresh run draws the untrained model at step 0, where the UI's image slider starts
    while st.step < cfg.train.max_steps:
        for batch in timed_iter(w.stream.iter_epoch(st.epoch, start_step=st.step_in_epoch), w.clock):
            if untrained:
                with phase(w.clock, "observe"):
                    log_images(w, batch)
                untrained = False
            st.step_in_epoch += 1
            st.corrupt_samples += int(batch.get("n_corrupt", 0))
            out = train_step(w, batch)
            if out["skipped"]:
                st.skipped_steps += 1
                consecutive_skips += 1
                check_divergence(w, consecutive_skips)
                continue
            consecutive_skips = 0
            if not out["boundary"]:
                continue  # accumulating: the optimizer step comes with a later micro-batch
            st.samples_seen += cfg.data.batch_size * w.world_size
            st.step += 1
            window.add(out)
            maybe_exit(st.step, w.fault)
            maybe_pause(w, "step")
            maybe_slow(w.fault)
            with phase(w.clock, "observe"):
                after_step(w, window, batch)
            if st.step >= cfg.train.max_steps:
                break
        else:
            st.epoch, st.step_in_epoch = st.epoch + 1, 0


def after_step(w: Worker, window: MetricWindow, batch: dict) -> None:
    """Log, validate, draw images and checkpoint when their intervals (or the last step) come."""
    t, step = w.cfg.train, w.state.step
    last = step == t.max_steps
    if step % t.log_every == 0 or last:
        log_window(w, window)
    if w.cfg.data.val_batches and (step % t.val_every == 0 or last):
        validate(w)
    if step % t.image_every == 0 or last:
        log_images(w, batch)
    if last and w.cfg.tracking.log_model:
        # before the final report: Tune may stop a trial at it (ASHA at max_t), killing the
        # workers, and a model logged after it would be registered without its files
        export_model(w)
    if step % t.checkpoint_every == 0 or last:
        save_checkpoint(w, window.last_metrics)


def check_divergence(w: Worker, consecutive_skips: int) -> None:
    """Fail the run once ``train.max_consecutive_skips`` steps in a row were not finite."""
    cfg = w.cfg
    if consecutive_skips >= cfg.train.max_consecutive_skips:
        raise FloatingPointError(
            f"diverged: {consecutive_skips} consecutive non-finite losses at step {w.state.step} "
            f"(train.max_consecutive_skips): lower optim.lr (now {cfg.optim.lr}) "
            f"or check the data at {cfg.data.path}")

"""What the training loop does differently in a progressive run: fade the data, grow, log stages.

The loop calls these only when ``w.growth`` is set; the schedule is ``stages``, the engine
rebuild is ``growth``. Every function here runs on every rank (a rebuild is collective).
"""

from __future__ import annotations

from typing import Any

from models.progressive_vae import blend_lower_resolution
from pipeline.tracking import say
from pipeline.train.observe import log_images


def start_growth(w: Any) -> None:
    """At the start (or resume) of a run: alpha of the current images seen, tag of the current stage."""
    phase = w.growth.set_alpha(w, w.state.samples_seen)
    record_phase(w, phase)
    if w.resumed_from is not None:  # where a resumed run picks up, e.g. mid-fade
        st = w.state
        w.log.tags({"vaepipe.resumed_phase": f"stage {st.stage} resolution {st.resolution} alpha {st.alpha:.4f} "
                                             f"images {st.samples_seen}"})
    else:
        tag_stage(w, phase)  # a resumed run's stage was tagged when it began


def record_phase(w: Any, phase: Any) -> None:
    st = w.state
    st.stage, st.resolution, st.alpha = phase.stage.index, phase.stage.resolution, phase.alpha


def fade_batch(w: Any, batch: dict) -> dict:
    """Set the model's alpha for this micro-batch and blend the images by the same alpha (ProGAN's
    data fade: the target matches the model's effective resolution)."""
    phase = w.growth.set_alpha(w, w.state.samples_seen)
    if phase.alpha < 1.0:
        batch = {**batch, "image": blend_lower_resolution(batch["image"], phase.alpha)}
    return batch


def grow_if_due(w: Any, batch: dict) -> bool:
    """After an optimizer step: rebuild for the next phase when the images seen entered it.

    The last grid of a stage is drawn at its own resolution before the switch; the new phase
    starts a fresh epoch at its micro-batch and resolution (the stream cannot change its batch
    shape mid-epoch), so a checkpoint right after the switch resumes there.
    """
    phase = w.growth.phase_at(w.state.samples_seen)
    record_phase(w, phase)
    if phase.key == w.growth.phase.key:
        return False
    new_stage = phase.stage.index != w.growth.phase.stage.index
    if new_stage:
        log_images(w, batch)
    w.growth.switch(w, phase)
    w.stream.load_state_dict({"epoch": w.state.epoch + 1, "step_in_epoch": 0})
    w.state.epoch, w.state.step_in_epoch = w.stream.epoch, 0
    if new_stage:
        tag_stage(w, phase)
    return True


def tag_stage(w: Any, phase: Any) -> None:
    """One MLflow tag per stage boundary (rank 0), and a line on the console."""
    s, st = phase.stage, w.state
    text = f"{s.resolution}x{s.resolution} from step {st.step}, image {st.samples_seen}, micro-batch {s.batch_size}"
    w.log.tags({f"vaepipe.stage.{s.index}": text})
    if w.rank == 0:
        say(f"stage {s.index}: {text}" + (", earlier blocks frozen" if phase.frozen else ""))


def log_stage_metrics(w: Any) -> None:
    st = w.state
    w.log.metrics({"stage": float(st.stage), "alpha": st.alpha, "resolution": float(st.resolution),
                   "images_seen": float(st.samples_seen)}, st.step)

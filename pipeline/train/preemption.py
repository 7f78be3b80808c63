"""A checkpoint just in time when a node announces its preemption (Ray Train's preemption API).

A spot node being reclaimed is marked draining by Ray Core, with a deadline; Ray Train's
preemption watcher sees the drain and tells every worker, and ``ray.train.get_preemption_info()``
then returns the notice on every rank. vaepipe asks every ``dist.preemption_check_every``
optimizer steps (the call is a barrier: every rank asks at the same steps). On the first notice
every rank saves a checkpoint at that step boundary and training goes on, as Ray Train
recommends: when the node goes, the run restarts from that step instead of the last periodic
checkpoint, and the restart counts against ``dist.max_preemption_failures``, not
``dist.max_failures``.
"""

from __future__ import annotations

from typing import Any

from pipeline.tracking import say


def notice_due(w: Any, already_saved: bool) -> bool:
    """True once per run segment: the first step at which a rank of this run is being preempted."""
    every = w.cfg.dist.preemption_check_every
    if already_saved or not every or w.state.step % every:
        return False
    info = w.ctx.preemption_info()
    if info is None:
        return False
    if w.rank == 0:
        say(f"preemption notice for ranks {info.preempted_ranks} (deadline {info.deadline_ms} ms): "
            f"checkpointing at step {w.state.step}")
        w.log.tags({"vaepipe.preemption_checkpoint_step": w.state.step})
    return True

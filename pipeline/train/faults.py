"""Fault drills for the fault-tolerance tests: faults injected at a chosen step, driven by
``VAEPIPE_FAULT_*`` variables in the driver's environment (the trainer forwards them).

- ``VAEPIPE_FAULT_AT_STEP=N``: every rank that reaches step N exits at once (os._exit).
- ``VAEPIPE_FAULT_STEP_SLEEP=S``: every step sleeps S seconds (keeps a short run going).
- ``VAEPIPE_FAULT_PAUSE=step:N`` or ``checkpoint:N``: one rank writes its pid into the marker
  file and sleeps, after step N or in the middle of step N's checkpoint (its shard written,
  not yet reported), so a test can SIGKILL it from outside as a preemption does.

``VAEPIPE_FAULT_MARKER=<file>`` is required and makes every drill fire once: the restarted
worker group finds the marker and trains on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def maybe_exit(step: int, fault: dict) -> None:
    at, marker = fault.get("VAEPIPE_FAULT_AT_STEP"), fault.get("VAEPIPE_FAULT_MARKER")
    if at and marker and step == int(at) and not Path(marker).exists():
        Path(marker).write_text(str(step))
        os._exit(1)


def maybe_pause(w: Any, where: str) -> None:
    spec, marker = w.fault.get("VAEPIPE_FAULT_PAUSE"), w.fault.get("VAEPIPE_FAULT_MARKER")
    if not (spec and marker) or Path(marker).exists():
        return
    place, _, step = spec.partition(":")
    if place != where or w.state.step != int(step) or w.rank != w.world_size - 1:
        return
    Path(marker).write_text(str(os.getpid()))
    time.sleep(120)  # killed from outside long before this ends


def maybe_slow(fault: dict) -> None:
    """``VAEPIPE_FAULT_STEP_SLEEP=<seconds>``: every step takes at least that long (a drill that
    needs training to still be running while something else fails around it)."""
    delay = fault.get("VAEPIPE_FAULT_STEP_SLEEP")
    if delay:
        time.sleep(float(delay))

"""A sweep's progress on the driver's console: one line each time a trial starts, ends or fails.

``vaepipe tune`` hands ``SweepProgress`` to Tune as a callback. Each line counts the trials by
state (done, running, waiting, failed) and names the best ``tune.metric`` among the trials' latest
reports, with its trial, e.g. ``sweep: 3/8 done, 2 running, 3 waiting, 0 failed; best val_neg_elbo 612.4
(trial 2b1c_00002)``. Lines rather than a redrawn bar: a sweep's console is also a job's log file
(``vaepipe jobs logs``), as the training's step lines are.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from ray.tune import Callback

from pipeline.tracking import say

_STATES = {"TERMINATED": "done", "RUNNING": "running", "PENDING": "waiting", "PAUSED": "waiting", "ERROR": "failed"}


class SweepProgress(Callback):
    def __init__(self, metric: str, mode: str, total: Optional[int] = None) -> None:
        self.metric, self.mode, self.total = metric, mode, total

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        say(self.line(trials))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        say(self.line(trials))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        say(self.line(trials))

    def line(self, trials: list) -> str:
        counts = {"done": 0, "running": 0, "waiting": 0, "failed": 0}
        for t in trials:
            counts[_STATES.get(t.status, "waiting")] += 1
        total = max(self.total or 0, len(trials))
        waiting = counts["waiting"] + total - len(trials)  # trials the searcher has not made yet
        text = (f"sweep: {counts['done']}/{total} done, {counts['running']} running, {waiting} waiting, "
                f"{counts['failed']} failed")
        best = self.best(trials)
        return text + (f"; best {self.metric} {best[0]:.4g} (trial {best[1]})" if best else "")

    def best(self, trials: list) -> Optional[tuple[float, str]]:
        """The best finite value of the metric in the trials' latest reports, and that trial's id."""
        seen = [(float(t.last_result[self.metric]), t.trial_id) for t in trials
                if isinstance((t.last_result or {}).get(self.metric), (int, float))]
        seen = [s for s in seen if math.isfinite(s[0])]
        if not seen:
            return None
        return min(seen) if self.mode == "min" else max(seen)

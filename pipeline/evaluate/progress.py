"""The evaluation's progress on the console: a line every few seconds, as training prints its steps.

An evaluation of a large split with the IWAE bound (k=1000) or FID runs for minutes to hours with
nothing on the console. The first partition (the process itself, or Ray worker 0 of ``workers``)
says how many samples of its share it has scored, at what rate, and the time left. A line, not a
redrawn bar, for the same reason as the step lines: a submitted job's console is a log file.
"""

from __future__ import annotations

import time
from typing import Callable

from pipeline.tracking import say
from pipeline.train.observe import eta


class EvalProgress:
    """``add(n)`` after each batch; a line at most every ``every_s`` seconds, and one at ``finish``."""

    def __init__(self, total: int, rank: int, world: int, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, out: Callable[[str], None] = say):
        self.total, self.every_s, self.clock, self.out = total, every_s, clock, out
        self.who = "evaluate" if world == 1 else f"evaluate, worker {rank + 1} of {world}"
        self.done, self.t0 = 0, clock()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.done += n
        if self.clock() - self.last >= self.every_s:
            self._line()

    def finish(self) -> None:
        took = self.clock() - self.t0
        self.out(f"{self.who}: {self.done} samples scored in {eta(took)} ({self.done / max(took, 1e-9):.1f} samples/s)")

    def _line(self) -> None:
        now = self.clock()
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        left = max(self.total - self.done, 0)
        pct = min(100 * self.done // max(self.total, 1), 99)  # 100 % is finish's line
        self.out(f"{self.who}: {self.done}/{self.total} samples ({pct}%), {rate:.1f} samples/s"
                 + (f", eta {eta(left / rate)}" if left and rate > 0 else ""))

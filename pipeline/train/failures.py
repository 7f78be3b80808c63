"""Errors that a restart would only repeat fail the run at once, with their own message.

Ray Train retries every worker error alike, up to ``dist.max_failures``. A divergence (resume is
deterministic: the restored run diverges again at the same step) or a configuration error raised
on a rank would fail every retry the same way, costing a worker-group start each time and
burying the message under Ray's retries. ``FailOnce``, a Train ``UserCallback``, sees each
worker's error as the controller polls; for one of these it raises, and Train ends the run with
a ``ControllerError``, which its failure policy never retries. The driver then raises the
``NotRetried`` inside it (``not_retried``). A dead worker, a lost node or any other error is
retried as before.
"""

from __future__ import annotations

from typing import Optional

from pipeline.config import ConfigError
from pipeline.train.divergence import Diverged

RECURRING = (Diverged, ConfigError)


class NotRetried(RuntimeError):
    """A worker error that would recur on restart; the message names the rank and the error."""


def raise_if_recurring(worker_exceptions: dict) -> None:
    """Raise ``NotRetried`` for the lowest rank whose error would recur on restart."""
    for rank, error in sorted(worker_exceptions.items()):
        if isinstance(error, RECURRING):
            raise NotRetried(f"rank {rank}: {error} (not retried: a restart would fail the same way)")


def fail_once():
    """The ``FailOnce`` callback (its class is built here: vaepipe imports Ray where it runs it)."""
    from ray.train import UserCallback

    class FailOnce(UserCallback):
        def after_exception(self, run_context, worker_exceptions: dict) -> None:
            raise_if_recurring(worker_exceptions)

    return FailOnce()


def not_retried(exc: BaseException) -> Optional[NotRetried]:
    """The ``NotRetried`` that ended a fit, from the ``ControllerError`` Train raised for it, or
    the rank's own recurring error in local mode (which never retries: it comes out of ``fit``)."""
    if isinstance(exc, RECURRING):
        return NotRetried(f"rank 0: {exc}")
    failure = getattr(exc, "controller_failure", None)
    return failure if isinstance(failure, NotRetried) else None

"""Worker errors that a restart would only repeat (a divergence, a config error on a rank) end
the run at once with their message; every other error is left to Ray Train's retries."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from pipeline.train.divergence import Diverged
from pipeline.train.failures import NotRetried, fail_once, not_retried, raise_if_recurring


def test_a_recurring_error_on_any_rank_is_not_retried_and_names_the_rank():
    collateral = RuntimeError("gloo: connection reset by peer")  # what the other rank sees
    with pytest.raises(NotRetried, match=r"^rank 1: diverged: 3 consecutive .*not retried"):
        raise_if_recurring({0: collateral, 1: Diverged("diverged: 3 consecutive non-finite losses at step 1")})
    with pytest.raises(NotRetried, match=r"rank 0: optim.lr=-1"):
        raise_if_recurring({0: ConfigError("optim.lr=-1: must be > 0")})


def test_other_errors_are_left_to_rays_retries():
    raise_if_recurring({0: RuntimeError("worker died"), 1: KeyError("x")})
    raise_if_recurring({})


def test_the_callback_is_a_train_user_callback_and_the_driver_unwraps_its_error():
    from ray.train import ControllerError, UserCallback

    callback = fail_once()
    assert isinstance(callback, UserCallback)  # Train routes only UserCallbacks to after_exception
    with pytest.raises(NotRetried) as raised:
        callback.after_exception(run_context=None, worker_exceptions={0: Diverged("diverged")})
    assert not_retried(ControllerError(raised.value)) is raised.value
    assert not_retried(ControllerError(RuntimeError("controller bug"))) is None
    assert not_retried(RuntimeError("no controller error")) is None

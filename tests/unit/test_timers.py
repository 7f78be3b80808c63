"""The phase clock: phases add up to the wall time, collectives moved out of the phase they ran in."""

import time

import pytest

from pipeline.train.timers import PhaseClock, activate, clock_for, patch_collectives, timed_iter


def _sleep(s: float) -> None:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < s:
        pass


def test_nested_phase_time_is_counted_once_and_comm_moves_out(monkeypatch):
    clock = PhaseClock()
    with clock.phase("optimizer"):
        _sleep(0.02)
        with clock.phase("observe"):
            _sleep(0.03)
        clock.add_comm(0.01)  # a collective inside the optimizer phase
    ms = clock.take(steps=1)
    assert ms["observe"] == pytest.approx(30, abs=5)
    assert ms["optimizer"] == pytest.approx(20 - 10, abs=5)  # its own time minus the collective
    assert ms["communication"] == pytest.approx(10, abs=1e-6)
    assert clock.take(steps=1)["optimizer"] == 0.0  # take() resets


def test_collectives_are_timed_only_while_a_clock_is_active():
    import torch
    import torch.distributed as dist

    clock = PhaseClock()
    activate(clock)
    try:
        assert dist.all_reduce.__wrapped__ is not None  # wrapped once per process
        wrapped = dist.all_reduce
        patch_collectives()  # once per process (a local-mode driver sets up one rank per run)
        assert dist.all_reduce is wrapped
        with clock.phase("backward"):
            with pytest.raises((RuntimeError, ValueError)):
                dist.all_reduce(torch.zeros(1))  # no process group: fails, but its time is counted
        assert clock.comm_in["backward"] > 0
    finally:
        activate(None)


def test_data_wait_is_the_time_spent_waiting_for_each_batch():
    def slow():
        for i in range(3):
            _sleep(0.01)
            yield i

    clock = PhaseClock()
    assert list(timed_iter(slow(), clock)) == [0, 1, 2]
    assert clock.take(steps=3)["data_wait"] == pytest.approx(10, abs=3)
    assert list(timed_iter(iter([1, 2]), None)) == [1, 2]


@pytest.mark.parametrize("setting,cuda,on", [("auto", False, True), ("auto", True, False), ("on", True, True), ("off", False, False)])
def test_clock_setting(setting, cuda, on):
    clock = clock_for(setting, cuda)
    assert (clock is not None) == on
    if clock is not None:
        assert clock.sync == cuda

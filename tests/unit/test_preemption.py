"""A preemption notice (Ray Train's get_preemption_info) makes every rank checkpoint once at the
next asked step; the asks come every dist.preemption_check_every steps, on every rank alike."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train import preemption


class Log:
    def __init__(self):
        self.tags_logged = []

    def tags(self, tags):
        self.tags_logged.append(tags)


def _worker(rank: int, step: int, every: int = 5):
    from pipeline.train.rank_context import RayTrainRank

    cfg = load_config(None, [f"dist.preemption_check_every={every}"])
    ctx = object.__new__(RayTrainRank)  # a Ray Train worker's context; its ask goes to Ray's API, scripted below
    return SimpleNamespace(cfg=cfg, rank=rank, state=SimpleNamespace(step=step), log=Log(), ctx=ctx)


@pytest.fixture
def asks(monkeypatch):
    """Ray Train's answer, scripted; records every ask."""
    import ray.train

    calls, answers = [], []
    info = SimpleNamespace(preempted_ranks=[1], deadline_ms=123)
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: calls.append(1) or (info if answers.pop(0) else None))
    return calls, answers


def test_a_notice_is_acted_on_once_at_an_asked_step_and_named_on_rank_0(asks):
    calls, answers = asks
    answers += [False, True]
    assert not preemption.notice_due(_worker(0, 3), already_saved=False)  # not an asked step
    assert calls == []
    assert not preemption.notice_due(_worker(0, 5), already_saved=False)  # asked: no notice yet
    w = _worker(0, 10)
    assert preemption.notice_due(w, already_saved=False)
    assert w.log.tags_logged == [{"vaepipe.preemption_checkpoint_step": 10}]
    assert not preemption.notice_due(_worker(0, 15), already_saved=True)  # saved already: no second one
    assert len(calls) == 2


def test_every_rank_asks_at_the_same_steps_and_only_rank_0_tags(asks):
    calls, answers = asks
    answers += [True]
    w = _worker(1, 10)
    assert preemption.notice_due(w, already_saved=False)
    assert w.log.tags_logged == [] and calls == [1]


def test_zero_never_asks(asks):
    calls, _ = asks
    assert not preemption.notice_due(_worker(0, 10, every=0), already_saved=False)
    assert calls == []


@pytest.mark.parametrize("override, key", [("dist.preemption_check_every=-1", "dist.preemption_check_every"),
                                           ("dist.max_preemption_failures=-2", "dist.max_preemption_failures")])
def test_bad_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [override])


def test_the_preemption_budget_reaches_ray_trains_failure_config(tmp_path):
    from pipeline.train.trainer import build_trainer

    cfg = load_config(None, ["dist.max_preemption_failures=4", "dist.max_failures=2",
                             f"train.storage_path={tmp_path}"])
    failure = build_trainer(cfg, {}, "run", ()).run_config.failure_config
    assert (failure.max_preemption_failures, failure.max_failures) == (4, 2)

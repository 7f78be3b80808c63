"""KL schedules give the expected weights at chosen points."""

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train.schedules import kl_weight


def _schedule(*overrides):
    return load_config(None, list(overrides)).schedule


def test_none_is_the_target_beta():
    assert kl_weight(0, _schedule(), 1.5, total=100) == 1.5


def test_linear_warmup():
    sc = _schedule("schedule.kl_anneal=linear", "schedule.warmup=100")
    assert kl_weight(0, sc, 2.0, 1000) == 0.0
    assert kl_weight(25, sc, 2.0, 1000) == pytest.approx(0.5)
    assert kl_weight(100, sc, 2.0, 1000) == 2.0
    assert kl_weight(500, sc, 2.0, 1000) == 2.0


def test_linear_warmup_in_epochs():
    sc = _schedule("schedule.kl_anneal=linear", "schedule.warmup=4", "schedule.unit=epoch")
    assert kl_weight(1.0, sc, 1.0, 10) == pytest.approx(0.25)  # 1 of 4 warm-up epochs
    assert kl_weight(6.5, sc, 1.0, 10) == 1.0


def test_cyclical_rises_then_holds_in_every_cycle():
    # 1000 steps, 4 cycles of 250, rising over the first half (125 steps) of each
    sc = _schedule("schedule.kl_anneal=cyclical", "schedule.cycles=4", "schedule.cycle_ratio=0.5")
    expected = {0: 0.0, 62.5: 0.5, 125: 1.0, 200: 1.0, 250: 0.0, 312.5: 0.5, 375: 1.0, 999: 1.0}
    for t, w in expected.items():
        assert kl_weight(t, sc, 1.0, 1000) == pytest.approx(w), t
    assert kl_weight(62.5, sc, 4.0, 1000) == pytest.approx(2.0)  # scaled by beta


def test_linear_without_warmup_is_rejected():
    with pytest.raises(ConfigError, match="schedule.warmup"):
        _schedule("schedule.kl_anneal=linear")

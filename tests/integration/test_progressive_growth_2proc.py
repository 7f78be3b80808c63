"""A stage switch on two real ranks (gloo, no Ray): the DeepSpeed engine is rebuilt for the grown
model, every parameter that existed keeps its fp32 value, and Adam's moments come along when
``progressive.carry_moments`` is on (reset to zero when off), under ZeRO 0, 2 and 3."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dist_helpers import run_ranks

pytestmark = pytest.mark.integration


def _switch_rank(rank: int, world: int, zero_stage: int, carry: bool, precision: str) -> dict:
    from pipeline.config import load_config
    from pipeline.train.growth import Growth, full_parameter_state

    cfg = load_config(None, ["model.name=progressive_vae", "model.flavor=debug", "data.resolution=16",
                             "model.likelihood=mse", "progressive.enabled=true", "progressive.stage_images=64",
                             "progressive.batch_size=[4,4,4]", f"progressive.carry_moments={carry}",
                             f"dist.zero_stage={zero_stage}", f"dist.num_workers={world}", f"train.precision={precision}"])
    growth = Growth(cfg, world, precision)
    _, engine = growth.build(growth.phase_at(0))
    torch.manual_seed(rank)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for _ in range(2):
        loss = engine(torch.rand(4, 3, 4, 4, dtype=dtype))["loss"]
        engine.backward(loss)
        engine.step()
    before = full_parameter_state(engine, carry_moments=True)
    shapes = []
    w = SimpleNamespace(engine=engine, stream=SimpleNamespace(set_shape=lambda r, b: shapes.append((r, b))))
    growth.switch(w, growth.phase_at(64))
    after = full_parameter_state(w.engine, carry_moments=True)
    loss = w.engine(torch.rand(4, 3, 8, 8, dtype=dtype))["loss"]  # the grown engine trains at 8 px
    w.engine.backward(loss)
    w.engine.step()
    return {"before": before, "after": after, "shapes": shapes, "finite": bool(torch.isfinite(loss))}


CASES = [(0, True, "fp32"), (2, False, "fp32"), (3, True, "fp32"), (2, True, "bf16"), (3, False, "bf16")]


def _every_case(rank: int, world: int) -> dict:
    """Every case in one pair of processes (a spawn costs seconds): each builds its own Growth and
    engines, its weights from the config's seed and its noise from ``manual_seed(rank)``."""
    return {case: _switch_rank(rank, world, *case) for case in CASES}


@pytest.fixture(scope="module")
def switched() -> list[dict]:
    return run_ranks(_every_case)


@pytest.mark.parametrize("zero_stage, carry, precision", CASES)
def test_stage_switch_keeps_old_parameters_and_carried_moments(switched, zero_stage, carry, precision):
    """Under bf16 too: the fp32 masters are carried exactly, not rebuilt from bf16 copies."""
    for r in (ranks[(zero_stage, carry, precision)] for ranks in switched):
        before, after = r["before"], r["after"]
        assert r["shapes"] == [(8, 4)] and r["finite"]
        new = set(after) - set(before)
        assert new and all(n.split(".")[1] == "8" for n in new), new  # only 8 px blocks and image layers
        moved = [n for n in before if n in after and n.startswith("encoder_head")]
        assert moved
        for name in set(before) & set(after):
            torch.testing.assert_close(after[name]["param"], before[name]["param"], atol=0, rtol=0)
            for key in ("exp_avg", "exp_avg_sq"):
                if carry:
                    torch.testing.assert_close(after[name][key], before[name][key], atol=0, rtol=0)
                else:
                    assert not after[name][key].any(), f"{name} {key} not reset"
        assert any(before[n]["exp_avg_sq"].any() for n in moved)  # there were moments to carry

"""Progressive growing without Ray: the fade-in blend, the data fade, the stage schedule, activation
checkpointing, and a debug-width model grown 4 -> 256 one short stage at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.progressive_vae import blend_lower_resolution
from pipeline.config import ConfigError, load_config
from pipeline.train.activation import apply_activation_checkpointing
from pipeline.stages import build_stages, count_steps, phase_at, stage_config


def _model(stage: int, final: int = 32, alpha: float = 1.0, **kw):
    torch.manual_seed(0)
    m = build_model({"name": "progressive_vae", "flavor": "debug", "resolution": final, "in_channels": 3,
                     "stage_resolution": stage, "start_resolution": 4, **kw})
    m.set_alpha(alpha)
    return m


def _grown_from(prev, stage: int, alpha: float):
    """The next stage's model with every parameter the previous one had copied over."""
    new = _model(stage, alpha=alpha)
    missing = set(new.state_dict()) - set(prev.state_dict())
    assert missing and all(k.split(".")[1] == str(stage) for k in missing)  # only the new resolution's layers
    assert missing == set(new.new_parameter_names())  # what a frozen phase leaves trainable
    new.load_state_dict(prev.state_dict(), strict=False)
    return new


def test_alpha_zero_is_the_previous_stage_upsampled_and_alpha_one_the_new_block_alone():
    prev = _model(8)
    new = _grown_from(prev, 16, alpha=0.0)
    z, x = torch.randn(3, 8), torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(new.decode_logits(z), F.interpolate(prev.decode_logits(z), scale_factor=2), atol=1e-6)
        assert torch.allclose(new.encode(x)[0], prev.encode(F.avg_pool2d(x, 2))[0], atol=1e-6)
        new.set_alpha(1.0)
        h = new.decoder_blocks["8"](new.decoder_head(z))
        alone = new.to_image["16"](new.decoder_blocks["16"](h))
        assert torch.allclose(new.decode_logits(z), alone, atol=1e-6)
        h = new.encoder_blocks["8"](new.encoder_blocks["16"](new.from_image["16"](x)))
        assert torch.allclose(new.encode(x)[0], new.encoder_head(h.flatten(1)).chunk(2, 1)[0], atol=1e-6)


def test_data_fade_matches_the_formula():
    x, a = torch.rand(2, 3, 8, 8), 0.3
    low = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5)).repeat_interleave(2, 2).repeat_interleave(2, 3)
    assert torch.allclose(blend_lower_resolution(x, a), a * x + (1 - a) * low, atol=1e-6)
    assert torch.equal(blend_lower_resolution(x, 1.0), x)


def test_activation_checkpointing_same_loss_and_grads_fp32():
    x = torch.rand(4, 3, 16, 16)
    results = []
    for wrap in (False, True):
        m = _model(16, alpha=0.4)
        if wrap:
            assert apply_activation_checkpointing(m) == 4
        torch.manual_seed(1)
        out = m(x)
        out["loss"].backward()
        results.append((out["loss"].detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, atol=1e-5)
    assert g0.keys() == g1.keys() and all(torch.allclose(g0[k], g1[k], atol=1e-5) for k in g0)


def test_debug_width_model_grows_from_4_to_256():
    prev = None
    for res in (4, 8, 16, 32, 64, 128, 256):
        torch.manual_seed(res)
        m = build_model({"name": "progressive_vae", "flavor": "debug", "resolution": 256, "stage_resolution": res,
                         "start_resolution": 4})
        if prev is not None:
            m.load_state_dict(prev.state_dict(), strict=False)
        m.set_alpha(0.5)
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        out = m(torch.rand(2, 3, res, res))
        out["loss"].backward()
        opt.step()
        assert out["x_hat"].shape == (2, 3, res, res) and torch.isfinite(out["loss"])
        assert m.sample(2).shape == (2, 3, res, res)
        prev = m


def _cfg(*extra):
    return load_config(None, ["model.name=progressive_vae", "model.flavor=debug", "data.resolution=32",
                              "progressive.enabled=true", "progressive.stage_images=100",
                              "progressive.fade_fraction=0.5", "progressive.batch_size=[16,16,8,4]",
                              "progressive.effective_batch=16", "dist.num_workers=2", *extra])


def test_stage_schedule_in_images_with_per_stage_batch_accumulation_and_alpha():
    cfg = _cfg("progressive.freeze_images=20")
    stages = build_stages(cfg)
    assert [s.resolution for s in stages] == [4, 8, 16, 32]
    assert [(s.batch_size, s.grad_accum) for s in stages] == [(16, 1), (16, 1), (8, 2), (4, 4)]
    assert [s.fade_images for s in stages] == [0, 50, 50, 50]
    p = phase_at(stages, 110, freeze_images=20)
    assert (p.stage.resolution, p.alpha, p.frozen) == (8, 0.2, True)
    assert phase_at(stages, 125, freeze_images=20).alpha == 0.5 and not phase_at(stages, 125, 20).frozen
    assert phase_at(stages, 150).alpha == 1.0 and not phase_at(stages, 150).frozen
    # 32 images per step; a step that crosses a stage end counts for its stage: 4 + 3 + 3 + 3 steps
    assert count_steps(stages, 2) == cfg.train.max_steps == 13
    sc = stage_config(cfg, stages[3])
    assert (sc.data.resolution, sc.data.batch_size, sc.train.grad_accum_steps) == (32, 4, 4)


@pytest.mark.parametrize("override, key", [
    ("progressive.batch_size=[8,8]", "progressive.batch_size"),
    ("progressive.fade_fraction=1.5", "progressive.fade_fraction"),
    ("progressive.start_resolution=6", "progressive.start_resolution"),
    ("model.name=conv_vae", "model.name"),
])
def test_bad_progressive_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _cfg(override)


def test_progressive_sweep_runs_asha_on_images_seen_and_compares_only_at_one_resolution():
    from pathlib import Path

    from pipeline.tune import asha_clock, check_comparable, load_sweep

    sweep = Path(__file__).resolve().parents[2] / "jobs" / "sweeps" / "progressive.yaml"
    cfg, space = load_sweep(sweep)
    assert asha_clock(cfg, space) == ("images_seen", 3 * 2000 + 4500)  # the longest trial's images
    with pytest.raises(ConfigError, match=r"rung of 5000 images seen .* resolutions \[16, 32\]"):
        load_sweep(sweep, ["tune.grace_period=5000"])
    with pytest.raises(ConfigError, match="progressive.stage_images"):
        check_comparable({**space, "progressive.stage_images": {"uniform": [1000, 2000]}}, cfg)


def test_progressive_ladder_fades_in_and_grows_from_4_to_32():
    kw = {"name": "progressive_ladder_vae", "flavor": "debug", "resolution": 32, "start_resolution": 4}
    prev = None
    for res in (4, 8, 16, 32):
        torch.manual_seed(res)
        m = build_model({**kw, "stage_resolution": res})
        if prev is not None:
            m.load_state_dict(prev.state_dict(), strict=False)
            m.set_alpha(0.0)
            prev.set_alpha(1.0)  # the previous stage as it ended
            z = torch.randn(2, m.latent_dim)
            with torch.no_grad():  # alpha 0: the previous stage's output, upsampled
                assert torch.allclose(m.decode(z), F.interpolate(prev.decode(z), scale_factor=2), atol=1e-6)
        m.set_alpha(0.5)
        out = m(torch.rand(2, 3, res, res))
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["x_hat"].shape == (2, 3, res, res)
        prev = m

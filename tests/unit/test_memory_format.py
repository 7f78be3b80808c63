"""Channels-last convolutions (``train.channels_last``, ``pipeline/train/memory_format.py``):
every family trains to the same loss and gradients with and without it, the convolutions really
see NHWC input, and the weights, state dict and checkpoint layout are left alone."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from models import build_model
from pipeline.config import load_config
from pipeline.train.memory_format import CONVOLUTIONS, apply_channels_last

CASES = [
    ("conv_vae", 32, []), ("conv_vae", 64, []), ("conv_vae", 32, ["model.likelihood=logistic_mixture"]),
    ("conv_vae", 32, ["model.likelihood=gaussian_learned"]), ("conv_vae", 32, ["model.prior=made"]),
    ("conv_vae", 32, ["model.skip_connections=true"]), ("factor_vae", 32, []), ("ladder_vae", 32, []),
    ("ladder_vae", 64, []), ("vqvae", 32, []), ("vdvae", 32, []),
]


def _pair(model_cfg):
    """The same model twice from one seed: as built, and with channels-last convolutions."""
    torch.manual_seed(0)
    plain = build_model(model_cfg)
    torch.manual_seed(0)
    nhwc = build_model(model_cfg)
    return plain, nhwc


def _loss_and_grads(model, x):
    torch.manual_seed(1)  # the same reparameterisation noise on both sides
    out = model(x)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _record_conv_inputs(model) -> list:
    seen = []
    for m in model.modules():
        if isinstance(m, CONVOLUTIONS):
            m.register_forward_hook(lambda mod, args, out: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    return seen


def _assert_same_training(plain, nhwc, x):
    # compared in float64: the layouts then agree to ~1e-15, on every CPU. In float32 oneDNN's NHWC
    # and NCHW kernels sum in different orders, and on AVX2-only machines a first-layer gradient
    # differed beyond 1e-3 relative in a few elements, a difference of rounding, not of layout
    plain, nhwc, x = plain.double(), nhwc.double(), x.double()
    n_convs = sum(isinstance(m, CONVOLUTIONS) for m in nhwc.modules())
    assert apply_channels_last(nhwc) == n_convs > 0
    seen = _record_conv_inputs(nhwc)
    loss_a, grads_a = _loss_and_grads(plain, x)
    loss_b, grads_b = _loss_and_grads(nhwc, x)
    assert seen and all(seen), "every convolution ran on channels-last input"
    assert torch.isfinite(loss_b)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=1e-9)
    assert grads_b.keys() == grads_a.keys() and len(grads_b) > 0
    for name in grads_a:  # an element that nearly cancels keeps the rounding of its tensor's largest terms
        scale = float(grads_a[name].abs().max())
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-6, atol=1e-6 * scale + 1e-12, msg=name)
    # weights keep the default layout (DeepSpeed's flat buffers are views of contiguous memory)
    assert all(p.is_contiguous() for p in nhwc.parameters())
    assert list(nhwc.state_dict()) == list(plain.state_dict())


@pytest.mark.parametrize("name,resolution,extra", CASES, ids=lambda v: str(v) if not isinstance(v, list) else "-".join(e.split("=")[1] for e in v))
def test_channels_last_trains_every_family_to_the_same_loss_and_gradients(name, resolution, extra):
    cfg = load_config(None, [f"model.name={name}", "model.flavor=debug", f"data.resolution={resolution}", *extra])
    plain, nhwc = _pair(cfg.model)
    x = torch.rand(4, 3, resolution, resolution)
    _assert_same_training(plain, nhwc, x)


def test_channels_last_progressive_stage_during_fade_in():
    kw = {"name": "progressive_vae", "flavor": "debug", "resolution": 32, "stage_resolution": 16,
          "start_resolution": 4, "in_channels": 3}
    plain, nhwc = _pair(kw)
    for m in (plain, nhwc):
        m.set_alpha(0.4)  # both image paths (the new block and the upsampled lower resolution) run
    _assert_same_training(plain, nhwc, torch.rand(4, 3, 16, 16))


def test_channels_last_autoregressive_prior_on_a_frozen_vqvae():
    parent_cfg = load_config(None, ["model.name=vqvae", "model.flavor=debug", "data.resolution=32"]).model
    torch.manual_seed(0)
    parent = build_model(parent_cfg)
    cfg = load_config(None, ["model.name=vq_prior", "model.flavor=debug", "data.resolution=32"])
    model_cfg = replace(cfg.model, ar=replace(cfg.model.ar, parent_config={"name": "vqvae", **parent.config}))
    plain, nhwc = _pair(model_cfg)
    for m in (plain, nhwc):
        m.parent.load_state_dict(parent.state_dict())
    _assert_same_training(plain, nhwc, torch.rand(4, 3, 32, 32))


def test_the_worker_applies_channels_last_only_when_configured():
    from pipeline.train.worker import build_model_for_rank

    def hooked(overrides):
        cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", *overrides])
        model = build_model_for_rank(cfg, {})
        return [bool(m._forward_pre_hooks) for m in model.modules() if isinstance(m, CONVOLUTIONS)]

    on, off = hooked([]), hooked(["train.channels_last=false"])
    assert on and all(on)
    assert off and not any(off)

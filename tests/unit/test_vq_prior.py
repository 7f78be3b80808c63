"""Autoregressive code prior: frozen parent, causality of both architectures, overfit, sampling, round trips."""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import models
from models.vq_prior import VQPrior
from pipeline.config import ARPriorConfig, ModelConfig
from pipeline.train.activation import apply_activation_checkpointing

try:
    from tests.model_helpers import rectangles
except ImportError:
    from model_helpers import rectangles

ARCHS = ["pixelcnn", "transformer"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def parent():
    """A debug VQ-VAE whose codebook was restarted from encoder outputs, so codes are diverse."""
    vq = models.build_model({"name": "vqvae", "flavor": "debug", "resolution": 32, "in_channels": 1})
    vq.train()(rectangles(16) + 0.3 * torch.rand(16, 1, 32, 32))
    return vq.eval()


def build(parent, arch: str, **ar) -> VQPrior:
    cfg = {"name": "vq_prior", "flavor": "debug",
           "ar": {"arch": arch, "parent_config": {"name": "vqvae", **parent.config}, **ar}}
    model = models.build_model(cfg)
    model.parent.load_state_dict(parent.state_dict())  # what the pipeline does with the parent's weights
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_forward_keys_and_values(parent, arch):
    model = build(parent, arch)
    x = rectangles(4)
    out = model(x)
    assert {"loss", "recon", "kl", "kl_per_dim", "elbo", "x_hat", "metrics"} <= set(out)
    assert out["codes"].shape == (4, 8, 8) and torch.equal(out["codes"], parent.encode_codes(x))
    assert torch.equal(out["x_hat"], parent.reconstruct(x))
    assert out["kl"].item() == 0 and out["kl_per_dim"].numel() == 0
    assert torch.equal(out["recon"], out["loss"])
    assert torch.allclose(out["elbo"], -out["loss"] * 64)
    assert set(out["metrics"]) == {"bits_per_code"}
    assert torch.allclose(out["metrics"]["bits_per_code"], out["loss"] / math.log(2))
    # Untrained prior: close to uniform over 16 codes.
    assert abs(out["loss"].item() - math.log(16)) < 1.0
    logits = model.prior_logits(out["codes"])
    assert logits.shape == (4, 16, 8, 8)
    assert torch.allclose(model.code_nll(out["codes"]).mean(), out["loss"] * 64, rtol=1e-5)


@pytest.mark.parametrize("arch", ["transformer"])  # the default pixelcnn: tests/unit/test_family_contract.py
def test_gradients_reach_the_prior_and_never_the_parent(parent, arch):
    model = build(parent, arch)
    model.train()
    assert not model.parent.training and not model.parent.quantizer.training
    before = {k: v.clone() for k, v in model.parent.state_dict().items()}
    model(rectangles(4))["loss"].backward()
    for name, p in model.named_parameters():
        if name.startswith("parent."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    after = model.parent.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # no EMA/restart in the parent


@pytest.mark.parametrize("arch", ARCHS)
def test_prior_is_causal_in_raster_order(parent, arch):
    model = build(parent, arch).eval()
    codes = torch.randint(0, 16, (2, 8, 8))
    with torch.no_grad():
        base = model.prior_logits(codes).flatten(2)  # [B, K, T]
        for t in range(64):
            changed = codes.flatten(1).clone()
            changed[:, t:] = torch.randint(0, 16, changed[:, t:].shape)  # perturb positions >= t
            out = model.prior_logits(changed.view(2, 8, 8)).flatten(2)
            assert torch.allclose(out[:, :, : t + 1], base[:, :, : t + 1], atol=1e-5), t
        # ...and they do depend on the past: the code left of (2, 2) and one two rows up-left
        # (within the 3-layer debug PixelCNN's receptive field).
        for row, col in ((2, 1), (0, 0)):
            changed = codes.clone()
            changed[:, row, col] = (codes[:, row, col] + 1) % 16
            out = model.prior_logits(changed).flatten(2)
            assert not torch.allclose(out[:, :, 2 * 8 + 2], base[:, :, 2 * 8 + 2])


@pytest.mark.parametrize("arch", ARCHS)
def test_overfits_one_batch(parent, arch):
    model = build(parent, arch, hidden=32)
    x = rectangles(4)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(80):
        loss = model(x)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = model.eval()(x)["loss"].item()
    assert final < 0.1 * first, (first, final)


@pytest.mark.parametrize("arch", ARCHS)
def test_sample_codes_and_images(parent, arch):
    model = build(parent, arch).eval()
    codes = model.sample_codes(3)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16
    imgs = model.sample(2)
    assert imgs.shape == (2, 1, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    # Near-zero temperature reproduces the argmax chain, so sampling follows the prior's logits.
    greedy = model.sample_codes(1, temperature=1e-4)
    logits = model.prior_logits(greedy)
    assert torch.equal(logits.argmax(dim=1), greedy)


@pytest.mark.parametrize("arch", ARCHS)
def test_round_trip_state_dict_and_rebuild_from_config(parent, arch):
    model = build(parent, arch)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(rectangles(4))["loss"].backward()
    opt.step()
    model.eval()
    assert model.config["ar"]["parent_config"]["name"] == "vqvae"
    clone = models.build_model({"name": "vq_prior", **model.config})
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = rectangles(4)
    a, b = model(x), clone(x)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["x_hat"], b["x_hat"])
    torch.manual_seed(2)
    s1 = model.sample_codes(2)
    torch.manual_seed(2)
    assert torch.equal(clone.sample_codes(2), s1)


def test_config_forms_and_missing_parent(parent):
    parent_cfg = {"name": "vqvae", **parent.config}
    dc = ModelConfig(name="vq_prior", flavor="debug", ar=ARPriorConfig(arch="transformer", parent_config=parent_cfg))
    for cfg in (dc, OmegaConf.structured(dc),
                SimpleNamespace(name="vq_prior", flavor="debug",
                                ar=SimpleNamespace(arch="transformer", parent_config=parent_cfg))):
        model = models.build_model(cfg)
        assert model.config["ar"]["hidden"] == 16 and model.config["ar"]["arch"] == "transformer"
        assert model.config["ar"]["parent_config"] == parent_cfg
        assert type(model.config["ar"]["parent_config"]) is dict
    with pytest.raises(ValueError, match="model.ar.parent_config missing"):
        models.build_model(ModelConfig(name="vq_prior", flavor="debug"))
    with pytest.raises(ValueError, match="divisible"):
        build(parent, "transformer", hidden=10, heads=3)


def test_log_likelihood_terms_use_the_learned_prior(parent):
    model = build(parent, "pixelcnn").eval()
    x = rectangles(3)
    codes = model.encode(x)
    terms = model.log_likelihood_terms(x, codes)
    assert torch.allclose(terms["log_pz"], -model.code_nll(codes))
    assert torch.equal(terms["log_px_z"], parent.log_likelihood_terms(x, codes)["log_px_z"])


@pytest.mark.parametrize("arch", ARCHS)
def test_activation_checkpointing_keeps_loss_and_grads(parent, arch):
    model = build(parent, arch)
    x = rectangles(4)
    model(x)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    assert apply_activation_checkpointing(model) == 3
    model(x)["loss"].backward()
    for n, g in ref.items():
        assert torch.allclose(dict(model.named_parameters())[n].grad, g, atol=1e-6), n

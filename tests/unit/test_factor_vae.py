"""Factor-VAE: permute_dims, the TC term, the external discriminator and its update order."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import models
from models.factor_vae import FactorVAE, permute_dims
from pipeline.config import FactorVAEConfig, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(**overrides) -> FactorVAE:
    cfg = {"name": "factor_vae", "flavor": "debug", "resolution": 32, "in_channels": 1, **overrides}
    return models.build_model(cfg)


def test_permute_dims_keeps_marginals_and_breaks_the_joint():
    shared = torch.randn(512, 1)
    z = torch.cat([shared, shared + 0.01 * torch.randn(512, 1), torch.randn(512, 2)], dim=1)
    perm = permute_dims(z)
    assert perm.shape == z.shape
    for j in range(z.shape[1]):  # each column is a permutation of the same column
        torch.testing.assert_close(perm[:, j].sort().values, z[:, j].sort().values, rtol=0, atol=0)
    assert torch.corrcoef(z.T)[0, 1] > 0.99
    assert torch.corrcoef(perm.T)[0, 1].abs() < 0.2
    assert not torch.equal(perm, z)


def test_debug_flavor_and_discriminator_shape():
    model = build()
    disc = model.build_auxiliary()
    linears = [m for m in disc if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(8, 32), (32, 32), (32, 2)]
    acts = [m for m in disc if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 2 and all(a.negative_slope == 0.2 for a in acts)
    assert model.auxiliary_optim() == {"lr": 1e-4, "betas": (0.5, 0.9)}
    # Not a submodule: none of its parameters belong to the VAE, and each call is fresh.
    vae_params = {id(p) for p in model.parameters()}
    assert not any(id(p) in vae_params for p in disc.parameters())
    assert model.build_auxiliary() is not disc
    base = models.build_model({"name": "factor_vae", "resolution": 32, "in_channels": 1})
    assert len([m for m in base.build_auxiliary() if isinstance(m, nn.Linear)]) == 7


def test_forward_adds_gamma_tc_only_with_aux():
    model = build(factor={"gamma": 3.0})
    disc = model.build_auxiliary()
    x = torch.rand(4, 1, 32, 32)
    torch.manual_seed(1)
    plain = model(x)
    torch.manual_seed(1)
    out = model(x, aux=disc)
    assert "tc" not in plain["metrics"]
    assert set(out["metrics"]) == {"tc"} and out["metrics"]["tc"].shape == ()
    logits = disc(out["z"])
    tc = (logits[:, 0] - logits[:, 1]).mean()
    torch.testing.assert_close(out["metrics"]["tc"], tc.detach())
    torch.testing.assert_close(out["loss"], plain["loss"] + 3.0 * tc)
    torch.testing.assert_close(out["elbo"], plain["elbo"])  # the ELBO itself is unchanged
    for key in ("recon", "kl", "kl_per_dim"):
        torch.testing.assert_close(out[key], plain[key])


def test_gradients_vae_from_vae_loss_and_disc_from_auxiliary_loss():
    model = build()
    disc = model.build_auxiliary()
    out = model(torch.rand(4, 1, 32, 32), aux=disc)
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name
    # The VAE backward leaves gradients in the discriminator: the pipeline must zero them.
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in disc.parameters())
    model.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)
    loss, metrics = model.auxiliary_loss(disc, out)
    assert set(metrics) == {"disc_loss", "disc_acc"} and torch.isfinite(loss)
    assert 0.0 <= metrics["disc_acc"] <= 1.0
    loss.backward()
    for name, param in disc.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.parameters())  # z was detached


def test_discriminator_learns_to_detect_total_correlation():
    model = build()
    disc = model.build_auxiliary()
    optim = torch.optim.Adam(disc.parameters(), **model.auxiliary_optim() | {"lr": 3e-3})
    for _ in range(150):
        shared = torch.randn(64, 1)
        z = shared + 0.05 * torch.randn(64, 8)  # strongly dependent dimensions
        loss, metrics = model.auxiliary_loss(disc, {"z": z})
        optim.zero_grad()
        loss.backward()
        optim.step()
    assert metrics["disc_acc"] > 0.9 and metrics["disc_loss"] < 0.3
    with torch.no_grad():
        shared = torch.randn(256, 1)
        logits = disc(shared + 0.05 * torch.randn(256, 8))
    assert (logits[:, 0] - logits[:, 1]).mean() > 1.0  # a large TC estimate for dependent codes


def rectangles(n, resolution=32):
    x = torch.zeros(n, 1, resolution, resolution)
    for i in range(n):
        top, left = torch.randint(0, resolution // 2, (2,)).tolist()
        height, width = torch.randint(6, resolution // 2, (2,)).tolist()
        x[i, :, top:top + height, left:left + width] = 1.0
    return x


def test_documented_update_order_trains_both():
    x = rectangles(8)
    model = build(factor={"gamma": 2.0})
    disc = model.build_auxiliary()
    vae_opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    disc_opt = torch.optim.Adam(disc.parameters(), **model.auxiliary_optim())
    with torch.no_grad():
        start = model(x)["recon"].item()
    disc_start = [p.detach().clone() for p in disc.parameters()]
    for _ in range(40):
        out = model(x, aux=disc)  # 1. forward with aux
        vae_opt.zero_grad()
        out["loss"].backward()  # 2. VAE backward + step
        vae_opt.step()
        disc_opt.zero_grad(set_to_none=True)  # 3. clear the grads the VAE backward left
        loss, metrics = model.auxiliary_loss(disc, out)  # 4. disc loss on detached codes
        loss.backward()  # 5. disc backward + step
        disc_opt.step()
        assert torch.isfinite(out["loss"]) and torch.isfinite(loss)
    with torch.no_grad():
        end = model(x)["recon"].item()
    assert end < 0.6 * start, (start, end)
    assert all(not torch.equal(p, q) for p, q in zip(disc.parameters(), disc_start))


def test_round_trip_with_nested_factor_group():
    model = build(factor={"gamma": 4.0, "disc_hidden": 16, "disc_layers": 3, "disc_betas": [0.4, 0.8]})
    assert model.config["factor"] == {
        "gamma": 4.0, "disc_hidden": 16, "disc_layers": 3, "disc_lr": 1e-4, "disc_betas": [0.4, 0.8]
    }
    disc = model.build_auxiliary()
    clone = models.build_model({"name": "factor_vae", **model.config})
    clone.load_state_dict(model.state_dict())
    assert clone.config == model.config and isinstance(clone, FactorVAE)
    model.eval(), clone.eval()
    x = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        torch.manual_seed(9)
        a = model(x, aux=disc)
        torch.manual_seed(9)
        b = clone(x, aux=disc)
        torch.testing.assert_close(a["loss"], b["loss"], rtol=0, atol=0)
        torch.testing.assert_close(clone.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
        assert clone.sample(2).shape == (2, 1, 32, 32)


def test_from_config_reads_nested_groups_as_objects_or_dicts():
    dc = ModelConfig(name="factor_vae", flavor="debug", resolution=32, in_channels=1,
                     factor=FactorVAEConfig(gamma=6.0, disc_lr=5e-4))
    sources = [
        dc,
        OmegaConf.structured(dc),
        SimpleNamespace(name="factor_vae", flavor="debug", resolution=32, in_channels=1,
                        factor=SimpleNamespace(gamma=6.0, disc_lr=5e-4)),
        {"name": "factor_vae", "flavor": "debug", "resolution": 32, "in_channels": 1,
         "factor": {"gamma": 6.0, "disc_lr": 5e-4}},
    ]
    for cfg in sources:
        model = models.build_model(cfg)
        assert model.gamma == 6.0 and model.auxiliary_optim()["lr"] == 5e-4
        assert model.config["factor"]["disc_hidden"] == 32  # debug flavor
        assert model.config == FactorVAE.from_config(cfg).config


@pytest.mark.parametrize("factor,key", [
    ({"gamma": -1.0}, "model.factor.gamma"),
    ({"disc_layers": 0}, "model.factor.disc_layers"),
    ({"disc_betas": [0.5]}, "model.factor.disc_betas"),
])
def test_bad_factor_values_name_the_key(factor, key):
    with pytest.raises(ValueError, match=key):
        build(factor=factor)

"""Ladder VAE: protocol, per-level KL, merges, depth stability, density terms, overfit, round trips."""

import math
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

import models
from models.ladder_vae import (
    LadderVAE,
    precision_weighted_merge,
    residual_posterior,
)
from pipeline.config import LadderConfig, ModelConfig
from pipeline.train.activation import apply_activation_checkpointing

try:
    from tests.model_helpers import rectangles
except ImportError:
    from model_helpers import rectangles


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(**overrides) -> LadderVAE:
    cfg = {"name": "ladder_vae", "flavor": "debug", "resolution": 32, "in_channels": 1, **overrides}
    return models.build_model(cfg)


@pytest.mark.parametrize("merge", ["precision", "residual"])
def test_forward_keys_shapes_and_kl_per_level_sum_to_kl(merge):
    model = build(ladder={"merge": merge})
    assert model.latent_dims == [8, 4, 2]  # debug flavor
    out = model(rectangles(4))
    assert {"loss", "recon", "kl", "kl_per_dim", "elbo", "x_hat", "metrics"} <= set(out)
    assert out["kl_per_dim"].shape == (14,)
    assert out["x_hat"].shape == (4, 1, 32, 32)
    assert 0.0 <= out["x_hat"].min() and out["x_hat"].max() <= 1.0
    assert set(out["metrics"]) == {"kl_level/0", "kl_level/1", "kl_level/2"}
    level_sum = sum(out["metrics"].values())
    assert torch.allclose(level_sum, out["kl"], rtol=1e-5)
    assert torch.allclose(out["kl_per_dim"].sum(), out["kl"], rtol=1e-5)
    assert torch.allclose(out["elbo"], -(out["recon"] + out["kl"]))
    assert torch.allclose(out["loss"], out["recon"] + out["kl"])
    assert all(v.dim() == 0 for v in out["metrics"].values())


def test_free_bits_target_kl_and_beta_enter_the_loss():
    model = build().eval()
    x = rectangles(4)
    torch.manual_seed(1)
    base = model(x, beta=0.5)
    torch.manual_seed(1)
    target = model(x, beta=0.5, target_kl=1e4)  # far above the KL: the term is the constant
    torch.manual_seed(1)
    fb = model(x, beta=1.0, free_bits=50.0)
    assert torch.allclose(base["loss"], base["recon"] + 0.5 * base["kl"])
    assert torch.allclose(target["loss"], target["recon"] + 0.5 * 1e4)
    assert torch.allclose(fb["loss"], fb["recon"] + 50.0 * 14)


def test_precision_weighted_merge_equals_closed_form():
    mu_hat, mu_p = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([0.0, 1.0, 3.0])
    std_hat, std_p = torch.tensor([0.5, 2.0, 1e-3]), torch.tensor([1.0, 0.5, 1.0])
    mu, std = precision_weighted_merge(mu_hat, std_hat, mu_p, std_p)
    prec_hat, prec_p = std_hat ** -2, std_p ** -2
    var = 1.0 / (prec_hat + prec_p)
    assert torch.allclose(std, var.sqrt())
    assert torch.allclose(mu, (mu_hat * prec_hat + mu_p * prec_p) * var)
    # First element by hand: precisions 4 and 1 -> var 0.2, mu = (4·1 + 0)/5.
    assert math.isclose(mu[0].item(), 0.8, rel_tol=1e-6) and math.isclose(std[0].item() ** 2, 0.2, rel_tol=1e-6)


def test_residual_posterior_starts_at_the_prior():
    mu_p, std_p = torch.tensor([[0.3, -1.0]]), torch.tensor([[2.0, 0.5]])
    raw = torch.tensor([[0.0, 0.0, 0.0, 0.0]])
    mu, std = residual_posterior(raw, mu_p, std_p, min_std=1e-3)
    assert torch.allclose(mu, mu_p) and torch.allclose(std, std_p + 1e-3)
    raw = torch.tensor([[1.0, -2.0, 5.0, 5.0]])
    mu, std = residual_posterior(raw, mu_p, std_p, min_std=0.0)
    assert torch.allclose(mu, mu_p + torch.tensor([[1.0, -2.0]]))
    assert torch.all(std > std_p)  # Δσ > 1 for a large positive raw scale


@pytest.mark.parametrize("merge", ["residual"])  # the default precision merge: tests/unit/test_family_contract.py
def test_gradients_reach_every_parameter(merge):
    model = build(ladder={"merge": merge})
    model(rectangles(4))["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("merge", ["precision", "residual"])
def test_five_levels_are_stable(merge):
    model = build(ladder={"latent_dims": [8, 6, 4, 4, 2], "merge": merge, "min_std": 1e-3})
    assert len(model.top_down_blocks) == 4
    x = rectangles(8)
    out = model(x)
    assert torch.isfinite(out["loss"]) and len(out["metrics"]) == 5
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    z = model.sample_prior_latents(4)
    assert z.shape == (4, 24) and torch.isfinite(z).all()
    assert torch.isfinite(model.sample(4)).all()


def test_log_likelihood_terms_match_the_analytic_kl():
    """E_q[log q(z|x) − log p(z)] must equal the analytic per-level KL sum (Monte Carlo, 2000 draws)."""
    model = build(ladder={"latent_dims": [6, 4, 2]}).eval()
    x = rectangles(2).repeat(1000, 1, 1, 1)
    with torch.no_grad():
        z = model.sample_posterior(x)
        terms = model.log_likelihood_terms(x, z)
        kl = model(x)["kl"]
    assert set(terms) == {"log_px_z", "log_pz", "log_qz_x"}
    assert all(t.shape == (2000,) and torch.isfinite(t).all() for t in terms.values())
    mc_kl = (terms["log_qz_x"] - terms["log_pz"]).mean()
    assert abs(mc_kl - kl) < 0.05 * kl + 0.05
    # log p(x|z) is the decoder's normalised likelihood: the same number the loss uses for recon.
    with torch.no_grad():
        levels = model.split_levels(z)
        params = model.decode_logits(levels[0], model._top_down_state(levels))
    assert torch.allclose(terms["log_px_z"], -model.likelihood.nll(params, x), rtol=1e-5)


def test_overfits_one_batch():
    model = build()
    x = rectangles(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = model(x)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    torch.manual_seed(3)
    final = model(x)["loss"].item()
    assert final < 0.5 * first, (first, final)


def test_sample_encode_decode_shapes():
    model = build().eval()
    x = rectangles(3)
    imgs = model.sample(5)
    assert imgs.shape == (5, 1, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 14)
    assert torch.equal(model.reconstruct(x), model.decode(mu))
    with pytest.raises(ValueError, match="z of shape"):
        model.decode(torch.zeros(3, 5))


def test_round_trip_state_dict_and_rebuild_from_config():
    model = build(ladder={"latent_dims": [5, 3], "merge": "residual"})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(rectangles(4))["loss"].backward()
    opt.step()
    model.eval()
    clone = models.build_model({"name": "ladder_vae", **model.config})
    assert clone.config == model.config and clone.latent_dims == [5, 3] and clone.merge == "residual"
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = rectangles(4)
    assert torch.equal(model.reconstruct(x), clone.reconstruct(x))
    torch.manual_seed(7)
    a = model(x)
    torch.manual_seed(7)
    b = clone(x)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["x_hat"], b["x_hat"])


def test_from_config_accepts_dataclass_omegaconf_namespace():
    dc = ModelConfig(name="ladder_vae", flavor="debug", resolution=32, in_channels=1,
                     ladder=LadderConfig(latent_dims=[6, 3], merge="residual"))
    for cfg in (dc, OmegaConf.structured(dc),
                SimpleNamespace(name="ladder_vae", flavor="debug", resolution=32, in_channels=1,
                                ladder=SimpleNamespace(latent_dims=[6, 3], merge="residual"))):
        model = models.build_model(cfg)
        assert model.config["ladder"] == {"latent_dims": [6, 3], "merge": "residual", "hidden": 32, "min_std": 1e-3}
        assert model.config["hidden_dim"] == 32  # debug preset for a field left at its default
    with pytest.raises(ValueError, match="model.ladder.merge"):
        build(ladder={"merge": "sum"})


def test_activation_checkpointing_gives_identical_loss_and_grads():
    model = build(ladder={"latent_dims": [6, 4, 2]})
    x = rectangles(4)
    torch.manual_seed(5)
    model(x)["loss"].backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert apply_activation_checkpointing(model) == 3 + 2 + 2 + 3  # conv, bottom-up, top-down, deconv
    torch.manual_seed(5)
    model(x)["loss"].backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n


def test_decoder_width_follows_params_per_channel(monkeypatch):
    """A likelihood with k parameters per channel (e.g. a logistic mixture) gets C·k decoder outputs."""
    import models.ladder_vae as ladder_module
    from models.likelihoods import BernoulliLikelihood

    class ThreeParams(BernoulliLikelihood):
        params_per_channel = 3

    monkeypatch.setattr(ladder_module, "build_likelihood", lambda name, obs_std=0.1, **kw: ThreeParams())
    model = build(in_channels=2)
    z = model.sample_prior_latents(2)
    levels = model.split_levels(z)
    assert model.decode_logits(levels[0], model._top_down_state(levels)).shape == (2, 6, 32, 32)

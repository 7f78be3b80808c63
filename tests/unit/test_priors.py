"""Structured priors: MoG density, MADE autoregressiveness, MC KL, and the conv VAE with each prior."""

import math

import pytest
import torch

import models
from models.kl import standard_normal_kl
from models.layers import reparameterize
from models.priors import MADEPrior, MixtureOfGaussiansPrior, StandardNormalPrior, build_prior


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(**overrides):
    cfg = {"name": "conv_vae", "flavor": "debug", "resolution": 32, "in_channels": 1, **overrides}
    return models.build_model(cfg)


def perturb_(module, scale=0.3):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def test_mog_log_density_equals_a_direct_float64_sum():
    prior = MixtureOfGaussiansPrior(latent_dim=5, components=4)
    perturb_(prior)
    z = torch.randn(7, 5) * 2
    got = prior.log_prob(z).double()
    weights = torch.softmax(prior.logits.double(), 0)
    scales = torch.exp(7 * torch.tanh(prior.log_scales.double() / 7))
    expected = torch.zeros(7, dtype=torch.float64)
    for k in range(4):
        normal = torch.distributions.Normal(prior.means[k].double(), scales[k])
        expected += weights[k] * normal.log_prob(z.double()).sum(1).exp()
    torch.testing.assert_close(got, expected.log(), rtol=1e-5, atol=1e-5)


def test_mog_kl_split_sums_to_log_q_minus_log_p():
    prior = MixtureOfGaussiansPrior(latent_dim=6, components=3)
    mu, logvar = torch.randn(5, 6), torch.randn(5, 6)
    z = reparameterize(mu, logvar)
    kl_elem, kl_rest = prior.kl_terms(mu, logvar, z)
    log_q = torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(1)
    torch.testing.assert_close(kl_elem.sum(1) + kl_rest, log_q - prior.log_prob(z))
    # Each kl_elem_i is log q_i - log of the mixture's own 1-D marginal.
    marg = torch.logsumexp(
        torch.log_softmax(prior.logits, 0)[None, :, None]
        + torch.distributions.Normal(prior.means, torch.exp(7 * torch.tanh(prior.log_scales / 7))).log_prob(z[:, None]),
        dim=1,
    )
    torch.testing.assert_close(kl_elem, torch.distributions.Normal(mu, (0.5 * logvar).exp()).log_prob(z) - marg)


def test_made_is_autoregressive():
    prior = MADEPrior(latent_dim=6, hidden=32)
    perturb_(prior)
    z = torch.randn(6)

    def outputs(v):
        mean, log_scale = prior.conditionals(v.unsqueeze(0))
        return mean[0], log_scale[0]

    jac_mean, jac_scale = torch.autograd.functional.jacobian(outputs, z)
    upper = torch.triu(torch.ones(6, 6, dtype=torch.bool))  # j >= i
    assert (jac_mean[upper] == 0).all() and (jac_scale[upper] == 0).all()
    lower = ~upper
    assert (jac_mean[lower] != 0).all() and (jac_scale[lower] != 0).all()  # it does use z_<i


def test_made_log_prob_is_a_normalised_density_in_2d():
    prior = MADEPrior(latent_dim=2, hidden=16)
    perturb_(prior, 0.2)  # keeps the conditional means well inside the grid
    grid = torch.linspace(-15, 15, 1001)
    z = torch.cartesian_prod(grid, grid)
    with torch.no_grad():
        mass = prior.log_prob(z).exp().sum() * (grid[1] - grid[0]) ** 2
    assert abs(mass.item() - 1.0) < 1e-2


def test_made_sequential_samples_follow_its_conditionals():
    prior = MADEPrior(latent_dim=3, hidden=16)
    perturb_(prior)
    with torch.no_grad():
        z = prior.sample(20000)
        mean, log_scale = prior.conditionals(z)
        standardised = (z - mean) / log_scale.exp()
    assert z.shape == (20000, 3)
    torch.testing.assert_close(standardised.mean(0), torch.zeros(3), atol=0.03, rtol=0)
    torch.testing.assert_close(standardised.std(0), torch.ones(3), atol=0.03, rtol=0)


def test_single_sample_mc_kl_averages_to_closed_form():
    prior = StandardNormalPrior(4)
    mu = torch.tensor([0.0, 1.5, -0.7, 0.3]).expand(200_000, -1)
    logvar = torch.tensor([0.0, -1.0, 0.5, -2.0]).expand(200_000, -1)
    z = reparameterize(mu, logvar)
    kl_elem, rest = prior.mc_kl_terms(mu, logvar, z)
    assert rest is None
    closed = standard_normal_kl(mu[0], logvar[0])
    stderr = kl_elem.std(0) / math.sqrt(len(z))
    assert ((kl_elem.mean(0) - closed).abs() < 5 * stderr + 1e-3).all()
    closed_elem, _ = prior.kl_terms(mu, logvar, z)
    torch.testing.assert_close(closed_elem, standard_normal_kl(mu, logvar))


def test_build_prior_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match="model.prior.*normal, made, mog"):
        build_prior("vamp", 4)
    with pytest.raises(ValueError, match="model.prior_components"):
        build_prior("mog", 4, components=0)
    with pytest.raises(ValueError, match="model.prior_hidden"):
        build_prior("made", 4, hidden=0)
    with pytest.raises(ValueError, match="model.prior"):
        build(prior="flow")


@pytest.mark.parametrize("prior", ["made", "mog"])
def test_conv_vae_with_structured_prior(prior):
    model = build(prior=prior, prior_hidden=32, prior_components=3)
    assert model.config["prior"] == prior
    x = torch.rand(4, 1, 32, 32)
    out = model(x)
    for key in ("loss", "recon", "kl", "elbo"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert out["kl_per_dim"].shape == (8,) and out["metrics"] == {}
    torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"]))
    if prior == "made":  # the per-dim terms are an exact split of the total
        torch.testing.assert_close(out["kl_per_dim"].sum(), out["kl"])
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
        assert torch.isfinite(param.grad).all(), name
    assert any(n.startswith("prior.") for n, _ in model.named_parameters())
    model.eval()
    samples = model.sample(3)
    assert samples.shape == (3, 1, 32, 32) and samples.min() >= 0 and samples.max() <= 1
    with torch.no_grad():
        terms = model.log_likelihood_terms(x, out["z"])
        torch.testing.assert_close(terms["log_pz"], model.prior.log_prob(out["z"]))
    assert all(t.shape == (4,) for t in terms.values())


@pytest.mark.parametrize("prior", ["made", "mog"])
def test_mc_kl_of_conv_vae_matches_importance_terms(prior):
    model = build(prior=prior, prior_hidden=32, prior_components=3).eval()
    x = torch.rand(2, 1, 32, 32).repeat(256, 1, 1, 1)
    torch.manual_seed(5)
    with torch.no_grad():
        out = model(x)
        terms = model.log_likelihood_terms(x, out["z"])
    torch.testing.assert_close(out["kl"], (terms["log_qz_x"] - terms["log_pz"]).mean(), rtol=1e-4, atol=1e-4)


def test_free_bits_clamp_mog_marginal_parts_only():
    model = build(prior="mog", prior_components=3)
    x = torch.rand(4, 1, 32, 32)
    lam = 50.0
    torch.manual_seed(1)
    out = model(x, beta=1.0, free_bits=lam)
    torch.manual_seed(1)
    plain = model(x, beta=1.0)
    rest = out["kl"] - out["kl_per_dim"].sum()
    torch.testing.assert_close(out["loss"], out["recon"] + lam * 8 + rest)
    torch.testing.assert_close(plain["loss"], plain["recon"] + plain["kl"])


@pytest.mark.parametrize("prior", ["made", "mog"])
def test_structured_prior_round_trip(prior):
    model = build(prior=prior, prior_hidden=16, prior_components=4)
    perturb_(model.prior)
    clone = models.build_model({"name": "conv_vae", **model.config})
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x, z = torch.rand(3, 1, 32, 32), torch.randn(3, 8)
    with torch.no_grad():
        a, b = model.log_likelihood_terms(x, z), clone.log_likelihood_terms(x, z)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        torch.manual_seed(3)
        sa = model.sample(2)
        torch.manual_seed(3)
        sb = clone.sample(2)
    torch.testing.assert_close(sa, sb, rtol=0, atol=0)

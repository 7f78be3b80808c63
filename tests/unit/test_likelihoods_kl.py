"""Likelihoods and KL terms checked against torch.distributions and Monte-Carlo estimates."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal, kl_divergence

from models import build_likelihood, gaussian_kl, standard_normal_kl
from models.kl import diag_gaussian_log_prob, free_bits_kl
from models.layers import reparameterize


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_standard_normal_kl_matches_formula_and_torch():
    mu, logvar = torch.randn(5, 7), torch.randn(5, 7)
    expected = -0.5 * (1 + logvar - mu**2 - logvar.exp())
    torch.testing.assert_close(standard_normal_kl(mu, logvar), expected)
    reference = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(standard_normal_kl(mu, logvar), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gaussian_kl(mu, logvar), standard_normal_kl(mu, logvar))


def test_general_gaussian_kl_matches_torch_distributions():
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    mu_p, logvar_p = torch.randn(4, 6), torch.randn(4, 6)
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(mu_p, (0.5 * logvar_p).exp()))
    torch.testing.assert_close(gaussian_kl(mu, logvar, mu_p, logvar_p), expected, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gaussian_kl(mu, logvar, mu, logvar), torch.zeros(4, 6), atol=1e-6)


def test_closed_form_kl_equals_monte_carlo_estimate():
    mu = torch.tensor([0.0, 1.5, -0.7, 0.3])
    logvar = torch.tensor([0.0, -1.0, 0.5, -2.0])
    n = 400_000
    z = reparameterize(mu.expand(n, -1), logvar.expand(n, -1)).double()
    log_q = diag_gaussian_log_prob(z, mu.double(), logvar.double())
    log_p = diag_gaussian_log_prob(z)
    log_ratio = log_q - log_p
    mc, stderr = log_ratio.mean().item(), (log_ratio.std() / math.sqrt(n)).item()
    closed = standard_normal_kl(mu, logvar).sum().item()
    assert abs(mc - closed) < 5 * stderr + 1e-3, (mc, closed, stderr)


def test_reparameterize_has_requested_moments_and_gradients():
    mu = torch.tensor([2.0, -1.0], requires_grad=True)
    logvar = torch.tensor([math.log(0.25), math.log(4.0)], requires_grad=True)
    z = reparameterize(mu.expand(200_000, -1), logvar.expand(200_000, -1))
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 2.0]), atol=0.02, rtol=0)
    z.sum().backward()
    assert mu.grad is not None and logvar.grad is not None


def test_diag_gaussian_log_prob_matches_normal():
    z, mu, logvar = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    expected = Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
    torch.testing.assert_close(diag_gaussian_log_prob(z, mu, logvar), expected)
    torch.testing.assert_close(diag_gaussian_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_bernoulli_matches_torch_bernoulli():
    logits = torch.randn(4, 3, 8, 8) * 3
    x = torch.randint(0, 2, (4, 3, 8, 8)).float()
    lik = build_likelihood("bernoulli")
    expected = Bernoulli(logits=logits).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(logits, x), expected)
    torch.testing.assert_close(lik.nll(logits, x), -expected)
    assert lik.nll(logits, x).shape == (4,)
    torch.testing.assert_close(lik.mean(logits), torch.sigmoid(logits))


def test_gaussian_matches_torch_normal_including_constant():
    means, x = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    lik = build_likelihood("gaussian", obs_std=0.3)
    expected = Normal(means, 0.3).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(means, x), expected)
    torch.testing.assert_close(lik.nll(means, x), -expected)
    wide = torch.tensor([-0.5, 0.5, 1.5]).view(1, 1, 1, 3)
    torch.testing.assert_close(lik.mean(wide), torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3))


def test_mse_is_sse_and_its_density_is_gaussian_with_variance_half():
    means, x = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4)
    lik = build_likelihood("mse")
    torch.testing.assert_close(lik.nll(means, x), ((x - means) ** 2).flatten(1).sum(1))
    expected = Normal(means, math.sqrt(0.5)).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(means, x), expected)
    assert lik.mean(means * 3 - 1).min() >= 0 and lik.mean(means * 3 - 1).max() <= 1


def test_build_likelihood_rejects_bad_input():
    with pytest.raises(ValueError, match="bernoulli, gaussian, mse"):
        build_likelihood("laplace")
    with pytest.raises(ValueError, match="obs_std"):
        build_likelihood("gaussian", obs_std=0.0)


def test_free_bits_clamps_batch_mean_kl_per_dim():
    kl_per_dim = torch.tensor([0.01, 0.5, 2.0])
    torch.testing.assert_close(free_bits_kl(kl_per_dim, 0.0), torch.tensor(2.51))
    torch.testing.assert_close(free_bits_kl(kl_per_dim, 0.25), torch.tensor(0.25 + 0.5 + 2.0))
    torch.testing.assert_close(free_bits_kl(kl_per_dim, 10.0), torch.tensor(30.0))
    with pytest.raises(ValueError, match="free_bits"):
        free_bits_kl(kl_per_dim, -1.0)

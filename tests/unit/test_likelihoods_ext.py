"""Learned-σ Gaussian and discretised logistic mixture likelihoods."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from models import LIKELIHOODS, bits_per_dim, build_likelihood


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def all_levels(lik, params):
    """log P(x = k/255) for every k, stacked: [256, B, C, H, W]."""
    b, _, h, w = params.shape
    c = params.shape[1] // lik.params_per_channel
    return torch.stack([
        lik.log_prob_pixels(params, torch.full((b, c, h, w), k / 255.0)) for k in range(256)
    ])


def test_params_per_channel_declared_for_every_likelihood():
    expected = {"bernoulli": 1, "gaussian": 1, "mse": 1, "gaussian_learned": 2, "logistic_mixture": 15}
    assert set(LIKELIHOODS) == set(expected)
    for name, count in expected.items():
        assert build_likelihood(name, obs_std=0.1, components=5).params_per_channel == count
    assert build_likelihood("logistic_mixture", components=3).params_per_channel == 9


def test_gaussian_learned_matches_torch_normal():
    means, raw = torch.rand(4, 3, 8, 8), torch.randn(4, 3, 8, 8) * 2
    x = torch.rand(4, 3, 8, 8)
    params = torch.cat([means, raw], dim=1)
    lik = build_likelihood("gaussian_learned")
    std = 1e-3 + F.softplus(raw)
    expected = Normal(means, std).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(lik.log_prob(params, x), expected)
    torch.testing.assert_close(lik.nll(params, x), -expected)
    wide = torch.cat([torch.tensor([-0.5, 0.5, 1.5]).view(1, 1, 1, 3), torch.zeros(1, 1, 1, 3)], 1)
    torch.testing.assert_close(lik.mean(wide), torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3))
    draw = lik.sample(params)
    assert draw.shape == x.shape and draw.min() >= 0 and draw.max() <= 1


def test_gaussian_learned_sigma_has_a_floor():
    lik = build_likelihood("gaussian_learned")
    params = torch.cat([torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), -1e4)], dim=1)
    assert torch.isfinite(lik.nll(params, torch.zeros(1, 1, 2, 2))).all()


@pytest.mark.parametrize("scale", [0.1, 1.0, 4.0])
def test_logistic_mixture_probabilities_sum_to_one(scale):
    lik = build_likelihood("logistic_mixture", components=4)
    params = torch.randn(2, 3 * 4 * 3, 3, 3) * scale
    with torch.no_grad():  # include very sharp and very wide components
        params[:, 24:] = torch.randn(2, 12, 3, 3) * 4
    probs = all_levels(lik, params).exp()
    total = probs.sum(dim=0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4), (total.min(), total.max())
    assert (probs >= 0).all()


def test_logistic_mixture_edge_bins_and_centered_bins():
    lik = build_likelihood("logistic_mixture", components=1)
    sharp = -20.0  # below the log-scale floor of -7, which therefore applies

    def params_at(mean):
        return torch.tensor([0.0, mean, sharp]).view(1, 3, 1, 1)

    # A component centred on level k puts the mass within ±1/255 into bin k; the edge bins
    # also take everything beyond ±1, i.e. one extra half.
    half = 1 / (255 * math.exp(-7.0))
    sig = 1 / (1 + math.exp(-half))
    for k, expected in ((0, sig), (1, 2 * sig - 1), (100, 2 * sig - 1), (254, 2 * sig - 1), (255, sig)):
        v = 2 * k / 255 - 1
        p = lik.log_prob(params_at(v), torch.full((1, 1, 1, 1), k / 255)).exp()
        assert abs(p.item() - expected) < 1e-5, (k, p, expected)
    # ... and mass below -1 or above 1 lands in the edge bins 0 and 255.
    p0 = lik.log_prob(params_at(-3.0), torch.zeros(1, 1, 1, 1)).exp()
    p255 = lik.log_prob(params_at(3.0), torch.ones(1, 1, 1, 1)).exp()
    assert p0.item() > 0.999 and p255.item() > 0.999


def test_logistic_mixture_bits_per_dim_on_random_data():
    lik = build_likelihood("logistic_mixture", components=5)
    x = torch.randint(0, 256, (4, 3, 8, 8)).float() / 255
    params = torch.randn(4, 45, 8, 8)
    bpd = bits_per_dim(lik.log_prob(params, x), x)
    assert bpd.shape == (4,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    # A flat mixture over [-1, 1] is close to uniform: ~8 bits/dim, and never better than that
    # on uniform random bytes by more than the edge bins can absorb.
    flat = torch.zeros(4, 45, 8, 8)
    flat[:, 30:] = math.log(0.6)
    assert 7.0 < bits_per_dim(lik.log_prob(flat, x), x).mean() < 9.5
    torch.testing.assert_close(lik.nll(params, x), -lik.log_prob(params, x))


def test_logistic_mixture_rounds_continuous_targets_to_8_bits():
    lik = build_likelihood("logistic_mixture", components=2)
    params = torch.randn(2, 6, 4, 4)
    levels = torch.randint(0, 256, (2, 1, 4, 4)).float() / 255
    jitter = (torch.rand_like(levels) - 0.5) * 0.9 / 255
    torch.testing.assert_close(lik.log_prob(params, levels + jitter), lik.log_prob(params, levels))


def test_logistic_mixture_mean_and_sample():
    lik = build_likelihood("logistic_mixture", components=2)
    params = torch.zeros(1, 6, 1, 2)
    params[0, 0] = 10.0  # component 0 dominates
    params[0, 2, 0] = torch.tensor([-0.5, 3.0])  # its means on the [-1, 1] scale
    params[0, 4:] = math.log(1e-4)
    torch.testing.assert_close(lik.mean(params), torch.tensor([[[[0.25, 1.0]]]]), atol=1e-3, rtol=0)
    draws = lik.sample(params.expand(64, -1, -1, -1))
    assert draws.shape == (64, 1, 1, 2)
    torch.testing.assert_close(draws * 255, torch.round(draws * 255))
    assert ((draws[:, 0, 0, 0] - 0.25).abs() < 0.01).float().mean() > 0.95
    assert (draws[:, 0, 0, 1] == 1.0).all()


def test_logistic_mixture_gradients_are_finite_for_extreme_params():
    lik = build_likelihood("logistic_mixture", components=3)
    params = (torch.randn(2, 9, 4, 4) * 20).requires_grad_()
    x = torch.randint(0, 256, (2, 1, 4, 4)).float() / 255
    lik.nll(params, x).sum().backward()
    assert torch.isfinite(params.grad).all()


def test_build_likelihood_validates_components_and_lists_names():
    with pytest.raises(ValueError, match="model.logistic_components"):
        build_likelihood("logistic_mixture", components=0)
    with pytest.raises(ValueError, match="gaussian_learned, logistic_mixture"):
        build_likelihood("laplace")
    with pytest.raises(ValueError, match="multiple of 15"):
        build_likelihood("logistic_mixture", components=5).nll(torch.zeros(1, 16, 2, 2), torch.zeros(1, 1, 2, 2))

"""Observation models p(x|z): turn decoder outputs into per-sample NLLs and mean images.

Every likelihood reduces over all non-batch dims, so it works for any image shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_LOG_2PI = math.log(2.0 * math.pi)


def _sum_per_sample(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(start_dim=1).sum(dim=1)


class BernoulliLikelihood:
    """Bernoulli per pixel; decoder outputs logits. Targets may be continuous in [0, 1]."""

    name = "bernoulli"

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample BCE-with-logits summed over pixels, shape [B]."""
        return _sum_per_sample(F.binary_cross_entropy_with_logits(params, x, reduction="none"))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, shape [B]; exactly -nll (BCE is already normalised)."""
        return -self.nll(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Pixel means in [0, 1]."""
        return torch.sigmoid(params)


class GaussianLikelihood:
    """Gaussian per pixel with a fixed σ; decoder outputs the means."""

    name = "gaussian"

    def __init__(self, obs_std: float) -> None:
        if not obs_std > 0:
            raise ValueError(f"model.obs_std must be > 0 for the gaussian likelihood, got {obs_std}")
        self.obs_std = float(obs_std)
        self._log_std = math.log(self.obs_std)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample -log N(x; params, σ²) summed over pixels, constant included, shape [B]."""
        z = (x - params) / self.obs_std
        return _sum_per_sample(0.5 * z.pow(2) + self._log_std + 0.5 * _LOG_2PI)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, shape [B]."""
        return -self.nll(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Means clamped to the valid pixel range [0, 1]."""
        return params.clamp(0.0, 1.0)


class MSELikelihood:
    """Sum of squared errors; the decoder outputs the means.

    SSE is not a normalised density, but it equals -log N(x; params, σ²=1/2) minus a constant,
    so ``log_prob`` reports that Gaussian's density to keep likelihood bounds in true nats.
    """

    name = "mse"
    _HALF_LOG_PI = 0.5 * math.log(math.pi)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample sum of squared errors, shape [B] (the training loss, not normalised)."""
        return _sum_per_sample((x - params).pow(2))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log N(x; params, 1/2) per sample, shape [B] = -(SSE + D/2·log π)."""
        num_pixels = x[0].numel()
        return -(self.nll(params, x) + num_pixels * self._HALF_LOG_PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Means clamped to the valid pixel range [0, 1]."""
        return params.clamp(0.0, 1.0)


LIKELIHOODS = ("bernoulli", "gaussian", "mse")


def build_likelihood(name: str, obs_std: float = 0.1):
    """Return the likelihood object for ``name`` (bernoulli | gaussian | mse).

    ``obs_std`` is only used by the gaussian likelihood. Unknown names raise ValueError.
    """
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(obs_std)
    if name == "mse":
        return MSELikelihood()
    raise ValueError(
        f"unknown likelihood {name!r} (model.likelihood); choose one of: {', '.join(LIKELIHOODS)}"
    )

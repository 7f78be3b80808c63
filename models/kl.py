"""KL divergences and log-densities of diagonal Gaussians, all parameterised by log-variance.

Log-variance rather than σ keeps the encoder output unconstrained and avoids log(0).
"""

from __future__ import annotations

import math

import torch

from models.sums import sum_last

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mu_p: torch.Tensor | float = 0.0,
    logvar_p: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """Elementwise KL[N(mu, e^logvar) || N(mu_p, e^logvar_p)] in nats.

    Returns a tensor of the broadcast shape; sum over the last dim for a per-sample KL. The
    defaults give the KL to the standard-normal prior.
    """
    mu_p = torch.as_tensor(mu_p, dtype=mu.dtype, device=mu.device)
    logvar_p = torch.as_tensor(logvar_p, dtype=logvar.dtype, device=logvar.device)
    var_ratio = torch.exp(logvar - logvar_p)
    mean_term = (mu - mu_p).pow(2) * torch.exp(-logvar_p)
    return 0.5 * (logvar_p - logvar + var_ratio + mean_term - 1.0)


def standard_normal_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Elementwise KL[N(mu, e^logvar) || N(0, 1)] = -0.5 (1 + logvar - mu^2 - e^logvar).

    The special case is written out because it is the hot path of every VAE step.
    """
    return -0.5 * (1.0 + logvar - mu.pow(2) - torch.exp(logvar))


def diag_gaussian_log_prob(
    z: torch.Tensor,
    mu: torch.Tensor | float = 0.0,
    logvar: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """log N(z; mu, diag(e^logvar)) summed over the last dim, with the 2π constant included.

    The constant matters: importance-weighted bounds compare log p(z) against log q(z|x) and
    report absolute nats.
    """
    mu = torch.as_tensor(mu, dtype=z.dtype, device=z.device)
    logvar = torch.as_tensor(logvar, dtype=z.dtype, device=z.device)
    elementwise = -0.5 * (_LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar))
    return sum_last(elementwise.expand_as(z))  # float64 inside models.sums.float64_sums()


def free_bits_kl(kl_per_dim: torch.Tensor, free_bits: float) -> torch.Tensor:
    """Sum over dims of max(λ, KL_i), where KL_i is the batch-mean KL of latent dim i.

    The clamp is applied to the batch average (not per sample) as in Kingma et al. 2016, so a
    dimension only stops being pushed toward the prior once it carries λ nats on average.
    With λ <= 0 this is the plain summed KL.
    """
    if free_bits < 0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits}")
    if free_bits == 0:
        return kl_per_dim.sum()
    return torch.clamp(kl_per_dim, min=free_bits).sum()

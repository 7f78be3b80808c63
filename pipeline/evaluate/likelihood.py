"""Importance-weighted (IWAE) estimate of log p(x) and its conversion to bits per dimension.

log p(x) >= log (1/K) Σ_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x)   (Burda et al. 2016)

The bound is tight as K → ∞ and increases in expectation with K. The weights are formed with
the model's own ``log_likelihood_terms`` so every family (conv, ladder, factor, learned priors)
is scored the same way; only the draw of z depends on whether the model offers
``sample_posterior`` (hierarchical models, where z is the concatenation of all layers).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

__all__ = ["iwae_log_likelihood", "bits_per_dim", "importance_log_weights"]


def _draw_posterior(model: Any, x: torch.Tensor, n: int, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws z ~ q(z|x) per row of x; returns (x repeated [n·B, ...], z [n·B, D]), sample-major."""
    b = x.shape[0]
    x_rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
    if hasattr(model, "sample_posterior"):
        return x_rep, model.sample_posterior(x_rep)
    # Encode once and broadcast: the n draws share the posterior parameters.
    mu, logvar = model.encode(x)
    eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=mu.dtype)
    z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * eps
    return x_rep, z.reshape(n * b, -1)


def importance_log_weights(model: Any, x: torch.Tensor, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """log p(x|z) + log p(z) − log q(z|x) for n posterior draws per sample: float64 [n, B]."""
    x_rep, z = _draw_posterior(model, x, n, generator)
    terms = model.log_likelihood_terms(x_rep, z)
    log_w = terms["log_px_z"].double() + terms["log_pz"].double() - terms["log_qz_x"].double()
    return log_w.reshape(n, x.shape[0])


@torch.no_grad()
def iwae_log_likelihood(
    model: Any,
    x: torch.Tensor,
    k: int = 5000,
    batch_k: int = 500,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Per-sample IWAE estimate of log p(x) in nats, float64 [B].

    ``k`` importance samples per input are drawn ``batch_k`` at a time (x is repeated
    ``batch_k`` times, so peak memory is that of one forward pass on batch_k·B inputs) and
    combined with a streaming float64 logsumexp. The model is put in eval mode for the call
    (BatchNorm running statistics, no dropout) and restored afterwards. ``generator`` seeds
    the Gaussian noise on the generic path (models with ``sample_posterior`` draw their own).
    """
    if k < 1 or batch_k < 1:
        raise ValueError(f"iwae_log_likelihood needs k >= 1 and batch_k >= 1, got k={k}, batch_k={batch_k}")
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        running = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        done = 0
        while done < k:
            n = min(batch_k, k - done)
            log_w = importance_log_weights(model, x, n, generator).to(running.device)
            running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
            done += n
        return running - math.log(k)
    finally:
        if was_training and hasattr(model, "train"):
            model.train(True)


def bits_per_dim(log_px: torch.Tensor | float, num_dims: int, data_range: Optional[float] = None) -> torch.Tensor | float:
    """-log p(x) / (num_dims · ln 2): the usual bits/dim of an (8-bit) image likelihood.

    ``log_px`` must be the log-probability of the discrete 8-bit image (a discretised or
    Bernoulli-on-bits likelihood). For a continuous density fitted to data scaled to [0, 1],
    pass ``data_range=256``: the change of variables to the [0, 256) pixel scale subtracts
    num_dims·ln 256 from log p(x) first (the dequantisation convention of Theis et al. 2016).
    """
    if num_dims < 1:
        raise ValueError(f"num_dims must be >= 1, got {num_dims}")
    if data_range is not None:
        log_px = log_px - num_dims * math.log(data_range)
    return -log_px / (num_dims * math.log(2.0))

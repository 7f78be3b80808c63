"""Importance-weighted (IWAE) estimate of log p(x) and its conversion to bits per dimension.

log p(x) >= log (1/K) Σ_k p(x, z_k) / q(z_k|x),  z_k ~ q(z|x)   (Burda et al. 2016)

The bound is tight as K → ∞ and increases in expectation with K. The weights are formed with
the model's own ``log_likelihood_terms`` so every family (conv, ladder, factor, learned priors)
is scored the same way; only the draw of z depends on whether the model offers
``sample_posterior`` (hierarchical models, where z is the concatenation of all layers).

The bound is a negative log-likelihood of the data only when p(x|z) is a probability of the
data as stored (8-bit pixels, or bits for binarised data): :func:`likelihood_is_density`
decides, and evaluation, promotion and the CLI name the number after its verdict.

A log-weight sums thousands of per-pixel terms; summed in float32 the total is off by ~1e-7
relative (~1e-4 nats at 32×32×3), more than the differences IWAE is used to rank. The network
runs in its own precision, and every per-sample sum and the log-sum-exp accumulate in float64
(``models.sums.float64_sums``): within 1e-3 nats of scoring a float64 copy of the model
(:func:`float64_copy`, kept as the reference), at the model's own speed.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch

from models.sums import float64_sums

__all__ = ["iwae_log_likelihood", "bits_per_dim", "importance_log_weights", "float64_copy",
           "likelihood_is_density", "likelihood_name", "binarize_mode", "IWAE_METRIC"]

IWAE_METRIC = "neg_iwae_nats"  # the IWAE bound's name where it is not a data NLL
BINARIZE_MODES = ("none", "static", "dynamic")


def likelihood_name(model_config: dict) -> str:
    """The likelihood a model's p(x|z) uses; second-stage models (vq_prior) score with their parent's."""
    parent = (model_config.get("ar") or {}).get("parent_config") or {}
    return model_config.get("likelihood") or parent.get("likelihood") or "bernoulli"


def binarize_mode(data_config: Optional[dict]) -> str:
    """``data.binarize`` of a run's config: none|static|dynamic; an absent key (older runs) is none."""
    mode = (data_config or {}).get("binarize") or "none"
    if mode not in BINARIZE_MODES:
        raise ValueError(f"data.binarize={mode!r} is not one of {', '.join(BINARIZE_MODES)}")
    return mode


def likelihood_is_density(model_config: dict, data_config: Optional[dict] = None) -> tuple[bool, str]:
    """(True, why) when the model's IWAE bound is an NLL of the data as stored, else (False, why not).

    True for ``logistic_mixture`` (a probability over the 256 levels of each 8-bit pixel) and for
    ``bernoulli`` on binarised data (a probability over the bits). Every other case is the
    model's objective, not a likelihood of the stored pixels: Bernoulli cross-entropy on
    continuous pixels is not normalised over [0, 1], and gaussian / gaussian_learned / mse are
    densities over the reals, not probabilities of 8-bit values.
    """
    name, mode = likelihood_name(model_config), binarize_mode(data_config)
    if name == "logistic_mixture":
        return True, "logistic_mixture is a discretised probability over 8-bit pixels"
    if name == "bernoulli" and mode != "none":
        return True, f"bernoulli on binarised pixels (data.binarize={mode}) is a probability over the bits"
    if name == "bernoulli":
        return False, ("nll not shown: bernoulli on continuous pixels is not a density over the stored data; "
                       "set data.binarize=static|dynamic or use model.likelihood=logistic_mixture")
    return False, (f"nll not shown: {name} is a continuous density, not a probability of the stored 8-bit "
                   "pixels; use model.likelihood=logistic_mixture for a true NLL")


def float64_copy(model: Any) -> Any:
    """A float64 copy of ``model`` in eval mode: the reference the float64-sum path is checked against."""
    return copy.deepcopy(model).double().eval()


def _draw_posterior(model: Any, x: torch.Tensor, n: int, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """n draws z ~ q(z|x) per row of x; returns (x repeated [n·B, ...], z [n·B, D]), sample-major."""
    b = x.shape[0]
    x_rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * b, *x.shape[1:])
    if hasattr(model, "sample_posterior"):
        return x_rep, model.sample_posterior(x_rep)
    # Encode once and broadcast: the n draws share the posterior parameters.
    mu, logvar = model.encode(x)
    # drawn in float64 whatever the model's dtype: the same seed gives the same z in every precision
    eps = torch.randn((n, *mu.shape), generator=generator, device=mu.device, dtype=torch.float64).to(mu.dtype)
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
        with float64_sums():
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

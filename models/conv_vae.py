"""Convolutional β-VAE (``conv_vae``) with a diagonal-Gaussian posterior and N(0, I) prior.

At 32×32 with ``base_channels=32`` this is exactly the reference network; larger inputs get
extra BatchNorm down/up blocks so the flattened bottleneck is always (4·base)×4×4.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from models.kl import diag_gaussian_log_prob, free_bits_kl, standard_normal_kl
from models.layers import make_down_block, make_up_block, reparameterize
from models.likelihoods import LIKELIHOODS, build_likelihood
from models.registry import register_model

# Constructor defaults; they double as the "base" flavor (see resolve_conv_vae_config).
BASE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "resolution": 64,
    "latent_dim": 128,
    "base_channels": 32,
    "hidden_dim": 512,
    "likelihood": "bernoulli",
    "obs_std": 0.1,
    "beta": 1.0,
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    # Small enough that a forward/backward at 128 px runs in milliseconds on one CPU core.
    "debug": {"base_channels": 8, "hidden_dim": 64, "latent_dim": 8},
}

_BOTTLENECK = 4  # spatial size of the flattened feature map, fixed by the reference net
_REFERENCE_BLOCKS = 3  # 32 px -> 4 px


def resolve_conv_vae_config(cfg: Any) -> dict[str, Any]:
    """Turn a duck-typed model config into ConvVAE constructor kwargs.

    Precedence: base defaults < flavor preset < any cfg field whose value differs from the
    base default. A field left at its default therefore takes the flavor's value (this is how
    ``flavor=debug`` shrinks widths without the pipeline knowing them); the one thing this
    cannot express is "debug flavor but with a field explicitly set to the base default".
    """
    flavor = getattr(cfg, "flavor", "base") or "base"
    if flavor not in FLAVORS:
        raise ValueError(
            f"unknown model.flavor {flavor!r} for conv_vae; choose one of: {', '.join(FLAVORS)}"
        )
    resolved = {**BASE_DEFAULTS, **FLAVORS[flavor]}
    for key, default in BASE_DEFAULTS.items():
        value = getattr(cfg, key, default)
        if value is not None and value != default:
            resolved[key] = value
    return resolved


def _num_down_blocks(resolution: int) -> int:
    """Number of stride-2 stages from ``resolution`` down to 4×4; validates the resolution."""
    valid = (
        isinstance(resolution, numbers.Integral)
        and 32 <= resolution <= 256
        and resolution & (resolution - 1) == 0
    )
    if not valid:
        raise ValueError(
            "model.resolution must be a power of two in [32, 256] (32, 64, 128, 256), "
            f"got {resolution!r}"
        )
    return int(math.log2(int(resolution) // _BOTTLENECK))


def _check_positive_ints(**values: Any) -> None:
    for key, value in values.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{key} must be a positive integer, got {value!r}")


@register_model("conv_vae")
class ConvVAE(nn.Module):
    """Convolutional (β-)VAE; see the module docstring for the architecture.

    ``encoder_blocks`` / ``decoder_blocks`` are ModuleLists called block by block so the
    pipeline can wrap each one in activation checkpointing from outside.
    """

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 64,
        latent_dim: int = 128,
        base_channels: int = 32,
        hidden_dim: int = 512,
        likelihood: str = "bernoulli",
        obs_std: float = 0.1,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        num_blocks = _num_down_blocks(resolution)
        _check_positive_ints(
            in_channels=in_channels, latent_dim=latent_dim,
            base_channels=base_channels, hidden_dim=hidden_dim,
        )
        if likelihood not in LIKELIHOODS:
            raise ValueError(
                f"unknown model.likelihood {likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}"
            )
        if not beta >= 0:
            raise ValueError(f"model.beta must be >= 0, got {beta!r}")
        in_channels, resolution, latent_dim = int(in_channels), int(resolution), int(latent_dim)
        base_channels, hidden_dim = int(base_channels), int(hidden_dim)
        # Plain Python values only, so the dict can go into checkpoints and MLflow params as is.
        self.config = {
            "in_channels": in_channels, "resolution": resolution, "latent_dim": latent_dim,
            "base_channels": base_channels, "hidden_dim": hidden_dim, "likelihood": likelihood,
            "obs_std": float(obs_std), "beta": float(beta),
        }
        self.in_channels, self.resolution, self.latent_dim = in_channels, resolution, latent_dim
        self.beta = float(beta)
        self.likelihood = build_likelihood(likelihood, obs_std)
        self._flat_channels = 4 * base_channels
        self._build_encoder(in_channels, base_channels, hidden_dim, latent_dim, num_blocks)
        self._build_decoder(in_channels, base_channels, hidden_dim, latent_dim, num_blocks)

    @classmethod
    def from_config(cls, cfg: Any) -> "ConvVAE":
        """Build from a duck-typed model config (dataclass / OmegaConf node / namespace)."""
        return cls(**resolve_conv_vae_config(cfg))

    def _build_encoder(self, in_ch: int, base: int, hidden: int, latent: int, num_blocks: int) -> None:
        # Reference widths b, 2b, 4b; extra (higher-resolution inputs) blocks stay at 4b and
        # sit after the reference ones, so the first conv is always the reference C -> b.
        widths = [base, 2 * base] + [4 * base] * (num_blocks - 2)
        blocks, prev = [], in_ch
        for i, width in enumerate(widths):
            blocks.append(make_down_block(prev, width, batch_norm=i >= _REFERENCE_BLOCKS))
            prev = width
        self.encoder_blocks = nn.ModuleList(blocks)
        flat = self._flat_channels * _BOTTLENECK * _BOTTLENECK
        self.encoder_head = nn.Sequential(
            nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 2 * latent)
        )

    def _build_decoder(self, out_ch: int, base: int, hidden: int, latent: int, num_blocks: int) -> None:
        flat = self._flat_channels * _BOTTLENECK * _BOTTLENECK
        self.decoder_head = nn.Sequential(
            nn.Linear(latent, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, flat)
        )
        num_extra = num_blocks - _REFERENCE_BLOCKS
        blocks = [make_up_block(4 * base, 4 * base, batch_norm=True) for _ in range(num_extra)]
        blocks += [
            make_up_block(4 * base, 2 * base, batch_norm=False),
            make_up_block(2 * base, base, batch_norm=False),
            make_up_block(base, out_ch, batch_norm=False, activation=False),
        ]
        self.decoder_blocks = nn.ModuleList(blocks)

    def checkpoint_blocks(self) -> list[nn.ModuleList]:
        """The ModuleLists whose blocks may be wrapped with activation checkpointing."""
        return [self.encoder_blocks, self.decoder_blocks]

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Total number of parameters (optionally only those with requires_grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"conv_vae expects input of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(model.in_channels, model.resolution), got {list(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each [B, latent_dim], for images x in [0, 1]."""
        self._check_input(x)
        h = x
        for block in self.encoder_blocks:
            h = block(h)
        mu, logvar = self.encoder_head(h.flatten(start_dim=1)).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Raw likelihood parameters (logits or means) [B, C, R, R] for latents z [B, D]."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"conv_vae expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        h = self.decoder_head(z).view(-1, self._flat_channels, _BOTTLENECK, _BOTTLENECK)
        for block in self.decoder_blocks:
            h = block(h)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean image in [0, 1], [B, C, R, R], for latents z [B, D]."""
        return self.likelihood.mean(self.decode_logits(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction decode(mu(x)) in [0, 1] (no gradient)."""
        mu, _ = self.encode(x)
        return self.decode(mu)

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n images in [0, 1] decoded from z ~ N(0, I) (no gradient); device defaults to the model's."""
        if device is None:
            device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device)
        return self.decode(z)

    def forward(
        self, x: torch.Tensor, beta: float | torch.Tensor | None = None, free_bits: float = 0.0
    ) -> dict[str, torch.Tensor]:
        """One stochastic ELBO evaluation.

        ``beta`` is the KL weight already multiplied by any annealing factor (None: model.beta);
        ``free_bits`` is λ in nats per latent dim, applied to the batch-mean KL of each dim.
        Returns loss (mean recon + β·KL_free_bits), recon and kl (per-sample means, kl
        unclamped), kl_per_dim [D], elbo (mean of -(recon+kl)), x_hat, mu, logvar, z.
        """
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        params = self.decode_logits(z)
        # Loss math in fp32: exp(logvar) and pixel sums overflow or lose precision in fp16/bf16.
        recon = self.likelihood.nll(params.float(), x.float())
        kl_elem = standard_normal_kl(mu.float(), logvar.float())
        kl_per_dim = kl_elem.mean(dim=0)
        kl = kl_elem.sum(dim=1)
        beta_eff = self.beta if beta is None else beta
        loss = recon.mean() + beta_eff * free_bits_kl(kl_per_dim, free_bits)
        return {
            "loss": loss,
            "recon": recon.mean(),
            "kl": kl.mean(),
            "kl_per_dim": kl_per_dim,
            "elbo": -(recon + kl).mean(),
            "x_hat": self.likelihood.mean(params),
            "mu": mu,
            "logvar": logvar,
            "z": z,
        }

    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised log-densities for a given z [B, D]: log p(x|z), log p(z), log q(z|x), each [B].

        log p(x|z) + log p(z) - log q(z|x) is one importance weight; with z ~ q(z|x) its mean
        is the ELBO and logmeanexp over K draws is the IWAE bound.
        """
        mu, logvar = self.encode(x)
        if z.shape != mu.shape:
            raise ValueError(f"z must have shape {list(mu.shape)} to match x, got {list(z.shape)}")
        params = self.decode_logits(z).float()
        return {
            "log_px_z": self.likelihood.log_prob(params, x.float()),
            "log_pz": diag_gaussian_log_prob(z.float()),
            "log_qz_x": diag_gaussian_log_prob(z.float(), mu.float(), logvar.float()),
        }

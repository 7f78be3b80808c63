"""Progressive-growing convolutional VAE (``progressive_vae``), grown 4×4 -> ``resolution``.

The ProGAN / ALAE recipe applied to a VAE. Every resolution r above the 4×4 bottleneck owns
an encoder block (r -> r/2), a decoder block (r/2 -> r), a from-image 1×1 conv (image ->
features at r) and a to-image 1×1 conv (features at r -> likelihood parameters). A model
built at ``stage_resolution`` R holds the blocks up to R and the image layers of R and R/2
(the latter for the fade-in; a model built without ``start_resolution`` is not grown and
has neither), so growing changes the parameter set: the pipeline rebuilds
its engine and copies the shared parameters over (names are keyed by resolution and never
change between stages).

Fade-in with ``alpha`` in [0, 1] (``set_alpha``), only while R is above the start resolution:

* decoder: ``(1-α)·upsample(to_image[R/2](h)) + α·to_image[R](block[R](h))`` (nearest
  upsampling, in likelihood-parameter space), so at α=0 the output is the previous stage's
  output upsampled and at α=1 the new block alone;
* encoder, mirrored: ``(1-α)·from_image[R/2](avgpool(x)) + α·block[R](from_image[R](x))``.

Both paths are always computed, so the parameter set does not change at the end of the fade
(the old path then gets zero gradients) and no engine rebuild is needed within a stage.
``blend_lower_resolution`` is the matching *data* fade. Widths follow ProGAN's shape: narrow
at high resolution, ``base_channels · min(8, resolution / r)`` at resolution r.
Only the standard-normal prior; no BatchNorm (a frozen or freshly grown block would otherwise
carry running statistics from another resolution).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from models.config_access import check_positive_ints, make_likelihood, resolve_family_config
from models.kl import diag_gaussian_log_prob, free_bits_kl
from models.layers import make_down_block, make_up_block, reparameterize
from models.likelihoods import LIKELIHOODS, at_least_float32, build_likelihood
from models.registry import register_model

BASE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "resolution": 256,
    "stage_resolution": None,
    "start_resolution": None,
    "latent_dim": 128,
    "base_channels": 16,
    "hidden_dim": 512,
    "likelihood": "bernoulli",
    "obs_std": 0.1,
    "logistic_components": 5,
    "beta": 1.0,
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    # A forward/backward at 256 px in milliseconds on one CPU core.
    "debug": {"base_channels": 4, "hidden_dim": 32, "latent_dim": 8},
}

_BOTTLENECK = 4
_WIDTH_CAP = 8  # widths stop doubling 3 octaves below the final resolution


def downsample(x: torch.Tensor) -> torch.Tensor:
    """Halve the resolution by 2×2 averaging (ProGAN's downscale; the box filter is the antialias)."""
    return F.avg_pool2d(x, 2)


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Double the resolution by nearest-neighbour repetition (ProGAN's upscale)."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def blend_lower_resolution(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """The data fade: ``α·x + (1-α)·upsample(downsample(x))``, matching the model's effective resolution."""
    if alpha >= 1.0:
        return x
    return alpha * x + (1.0 - alpha) * upsample(downsample(x))


def stage_resolutions(start: int, end: int) -> list[int]:
    """[start, 2·start, ..., end]; both must be powers of two with 4 <= start <= end."""
    for key, r in (("start_resolution", start), ("resolution", end)):
        if not (isinstance(r, numbers.Integral) and r >= _BOTTLENECK and r & (r - 1) == 0):
            raise ValueError(f"model.{key} must be a power of two >= 4 for progressive_vae, got {r!r}")
    if start > end:
        raise ValueError(f"model.start_resolution={start} must be <= model.resolution={end}")
    return [start * 2**i for i in range(int(math.log2(end // start)) + 1)]


class GrowableConvs:
    """The growing conv part shared by the progressive families: per-resolution blocks, image layers,
    the fade-in blend. Needs ``resolution`` (stage), ``start_resolution``, ``final_resolution``,
    ``in_channels``, ``alpha`` and ``config["base_channels"]`` set by the family."""

    def width(self, r: int) -> int:
        """Feature channels at resolution r."""
        return self.config["base_channels"] * min(_WIDTH_CAP, self.final_resolution // r)

    def _grown(self) -> list[int]:
        """Resolutions above the bottleneck that have blocks at this stage (ascending)."""
        return [r for r in stage_resolutions(_BOTTLENECK, self.resolution) if r > _BOTTLENECK]

    def _build_convs(self, out_ch: int) -> None:
        grown = self._grown()
        self.encoder_blocks = nn.ModuleDict(
            {str(r): make_down_block(self.width(r), self.width(r // 2), batch_norm=False) for r in grown})
        self.decoder_blocks = nn.ModuleDict(
            {str(r): make_up_block(self.width(r // 2), self.width(r), batch_norm=False) for r in grown})
        image_res = [r for r in (self.resolution // 2, self.resolution) if r >= self.start_resolution]
        self.from_image = nn.ModuleDict({str(r): nn.Sequential(
            nn.Conv2d(self.in_channels, self.width(r), 1), nn.LeakyReLU(0.2)) for r in image_res})
        self.to_image = nn.ModuleDict({str(r): nn.Conv2d(self.width(r), out_ch, 1) for r in image_res})

    def set_alpha(self, alpha: float) -> None:
        """Fade-in weight of the newest block (1 = the new block alone)."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.alpha = float(alpha)

    @property
    def fading(self) -> bool:
        return self.resolution > self.start_resolution

    def new_parameter_names(self) -> list[str]:
        """Parameters this stage added over the previous one (the newest blocks and image layers)."""
        r = str(self.resolution)
        fresh = (f"encoder_blocks.{r}.", f"decoder_blocks.{r}.", f"from_image.{r}.", f"to_image.{r}.")
        return [n for n, _ in self.named_parameters() if n.startswith(fresh)]

    def conv_features(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder conv path: images at the stage resolution -> the 4×4 feature map (faded in)."""
        r = self.resolution
        h = self.from_image[str(r)](x)
        if self.fading:
            h = self.encoder_blocks[str(r)](h)
            old = self.from_image[str(r // 2)](downsample(x))
            h, r = self.alpha * h + (1.0 - self.alpha) * old, r // 2
        for res in range(int(math.log2(r)), 2, -1):
            h = self.encoder_blocks[str(2**res)](h)
        return h

    def conv_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Decoder conv path: the 4×4 feature map -> likelihood parameters at the stage resolution."""
        top = self.resolution // 2 if self.fading else self.resolution
        for r in self._grown():
            if r > top:
                break
            h = self.decoder_blocks[str(r)](h)
        if not self.fading:
            return self.to_image[str(self.resolution)](h)
        new = self.to_image[str(self.resolution)](self.decoder_blocks[str(self.resolution)](h))
        old = upsample(self.to_image[str(top)](h))
        return self.alpha * new + (1.0 - self.alpha) * old


def check_stage(resolution: int, stage_resolution: Any, start_resolution: Any) -> tuple[int, int]:
    """(stage, start) resolutions, validated; a missing start means an ungrown model (start = stage)."""
    stage = int(resolution if stage_resolution is None else stage_resolution)
    start = stage if start_resolution is None else int(start_resolution)
    stages = stage_resolutions(start, int(resolution))  # validates both ends
    if stage not in stages:
        raise ValueError(f"stage resolution {stage} is not one of the stages {stages}")
    return stage, start


@register_model("progressive_vae")
class ProgressiveVAE(GrowableConvs, nn.Module):
    """Progressive conv VAE at one stage of its growth; see the module docstring."""

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 256,
        stage_resolution: int | None = None,
        start_resolution: int | None = None,
        latent_dim: int = 128,
        base_channels: int = 16,
        hidden_dim: int = 512,
        likelihood: str = "bernoulli",
        obs_std: float = 0.1,
        logistic_components: int = 5,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        stage, start_resolution = check_stage(resolution, stage_resolution, start_resolution)
        check_positive_ints("progressive_vae", in_channels=in_channels, latent_dim=latent_dim,
                            base_channels=base_channels, hidden_dim=hidden_dim)
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown model.likelihood {likelihood!r}; choose one of: {', '.join(LIKELIHOODS)}")
        if not beta >= 0:
            raise ValueError(f"model.beta must be >= 0, got {beta!r}")
        self.config = {
            "in_channels": int(in_channels), "resolution": int(resolution), "stage_resolution": stage,
            "start_resolution": int(start_resolution), "latent_dim": int(latent_dim),
            "base_channels": int(base_channels), "hidden_dim": int(hidden_dim), "likelihood": likelihood,
            "obs_std": float(obs_std), "logistic_components": int(logistic_components), "beta": float(beta),
        }
        self.in_channels, self.latent_dim, self.beta = int(in_channels), int(latent_dim), float(beta)
        self.final_resolution, self.start_resolution = int(resolution), int(start_resolution)
        self.resolution = stage  # what forward expects now
        self.alpha = 1.0
        self.likelihood, per_channel = make_likelihood(likelihood, obs_std, int(logistic_components),
                                                       self.in_channels, build=build_likelihood)
        self._build(self.in_channels * per_channel, int(hidden_dim))

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs: base defaults < flavor preset < fields the config sets."""
        return resolve_family_config(cfg, BASE_DEFAULTS, FLAVORS, "progressive_vae")

    @classmethod
    def from_config(cls, cfg: Any) -> "ProgressiveVAE":
        return cls(**cls.resolve_config(cfg))

    def _build(self, out_ch: int, hidden: int) -> None:
        w4, flat = self.width(_BOTTLENECK), self.width(_BOTTLENECK) * _BOTTLENECK**2
        self._build_convs(out_ch)
        self.encoder_head = nn.Sequential(nn.Linear(flat, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, 2 * self.latent_dim))
        self.decoder_head = nn.Sequential(nn.Linear(self.latent_dim, hidden), nn.ReLU(inplace=True),
                                          nn.Linear(hidden, flat), nn.Unflatten(1, (w4, _BOTTLENECK, _BOTTLENECK)))

    def checkpoint_blocks(self) -> list[list[nn.Module]]:
        """Encoder and decoder blocks, for activation checkpointing from outside."""
        return [list(self.encoder_blocks.values()), list(self.decoder_blocks.values())]

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"progressive_vae at stage {self.resolution} expects input [B, {expected[0]}, "
                             f"{expected[1]}, {expected[2]}], got {list(x.shape)}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mu, logvar), each [B, latent_dim], for images x at the stage resolution."""
        self._check_input(x)
        mu, logvar = self.encoder_head(self.conv_features(x).flatten(start_dim=1)).chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters [B, C·params_per_channel, R, R] at the stage resolution."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"progressive_vae expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        return self.conv_logits(self.decoder_head(z))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.likelihood.mean(self.decode_logits(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encode(x)
        return self.decode(mu)

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        param = next(self.parameters())
        z = torch.randn(n, self.latent_dim, device=param.device if device is None else device)
        return self.decode(z.to(param.dtype))

    def forward(self, x: torch.Tensor, beta: float | torch.Tensor | None = None, free_bits: float = 0.0,
                target_kl: float = 0.0, aux: nn.Module | None = None) -> dict[str, torch.Tensor]:
        """One stochastic ELBO evaluation at the stage resolution; same outputs as ``conv_vae``."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar)
        params = self.decode_logits(z)
        recon = self.likelihood.nll(params.float(), x.float())
        kl_elem = 0.5 * (mu.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float())
        kl, kl_per_dim = kl_elem.sum(dim=1), kl_elem.mean(dim=0)
        kl_term = free_bits_kl(kl_per_dim, free_bits)
        if target_kl > 0:
            kl_term = torch.clamp(kl_term, min=float(target_kl))
        loss = recon.mean() + (self.beta if beta is None else beta) * kl_term
        return {"loss": loss, "recon": recon.mean(), "kl": kl.mean(), "kl_per_dim": kl_per_dim,
                "elbo": -(recon + kl).mean(), "x_hat": self.likelihood.mean(params), "mu": mu,
                "logvar": logvar, "z": z, "metrics": {}}

    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """log p(x|z), log p(z), log q(z|x), each [B], for importance-weighted bounds."""
        mu, logvar = self.encode(x)
        z32 = at_least_float32(z)
        return {"log_px_z": self.likelihood.log_prob(at_least_float32(self.decode_logits(z)), at_least_float32(x)),
                "log_pz": diag_gaussian_log_prob(z32, torch.zeros_like(z32), torch.zeros_like(z32)),
                "log_qz_x": diag_gaussian_log_prob(z32, at_least_float32(mu), at_least_float32(logvar))}

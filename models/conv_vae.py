"""Convolutional β-VAE (``conv_vae``) with a diagonal-Gaussian posterior.

At 32×32 with ``base_channels=32`` this is exactly the reference network; larger inputs get
extra BatchNorm down/up blocks so the flattened bottleneck is always (4·base)×4×4.

Options (all off by default, so the default model is the reference one):

* ``likelihood``: the decoder emits ``params_per_channel`` channels per image channel.
* ``prior``: ``normal`` (closed-form KL), ``made`` or ``mog`` (single-sample MC KL), see
  ``models.priors``.
* ``decoder_dropout`` p: Dropout after the decoder's hidden dense layer and Dropout2d at the end
  of every decoder block but the output one (train mode only). Dropout sits *inside* the blocks,
  so activation checkpointing (which replays the RNG state) recomputes the same masks.
* ``skip_connections``: at every decoder resolution above the 4×4 bottleneck, the encoder's
  feature map of that resolution (same width by construction) is added to the decoder block's
  input through a per-channel gate initialised at 0 (training starts as the plain VAE). The
  4×4 map is left out: adding it would hand the decoder everything the latent sees. When no x
  is given (``decode(z)``, ``sample``) the skips are zero, so those outputs show what z alone
  carries. Caveat: with skips, forward's recon term conditions on x itself, so its ELBO is not a
  bound on the sampler's likelihood; ``log_likelihood_terms`` therefore evaluates the
  generative path (zero skips), which is what IWAE/bits-per-dim must measure.
* ``target_kl`` (forward argument): the KL term becomes max(target_kl, KL after free bits).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from models.config_access import check_positive_ints, make_likelihood, resolve_family_config
from models.kl import diag_gaussian_log_prob, free_bits_kl
from models.layers import make_down_block, make_up_block, reparameterize
from models.likelihoods import LIKELIHOODS, at_least_float32, build_likelihood
from models.priors import PRIORS, build_prior
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

# Options added on top of the reference model. They appear in ``model.config`` only when they
# differ from these defaults, so a default model's config stays the reference key set and old
# checkpoints' configs rebuild the same network.
EXTENSION_DEFAULTS: dict[str, Any] = {
    "logistic_components": 5,
    "prior": "normal",
    "prior_components": 10,
    "prior_hidden": 256,
    "decoder_dropout": 0.0,
    "skip_connections": False,
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    # Small enough that a forward/backward at 128 px runs in milliseconds on one CPU core.
    "debug": {"base_channels": 8, "hidden_dim": 64, "latent_dim": 8},
}

_BOTTLENECK = 4  # spatial size of the flattened feature map, fixed by the reference net
_REFERENCE_BLOCKS = 3  # 32 px -> 4 px


def resolve_conv_vae_config(cfg: Any, family: str = "conv_vae") -> dict[str, Any]:
    """Turn a duck-typed model config into ConvVAE constructor kwargs.

    Precedence: base defaults < flavor preset < any cfg field whose value differs from the
    base default. A field left at its default therefore takes the flavor's value (this is how
    ``flavor=debug`` shrinks widths without the pipeline knowing them); the one thing this
    cannot express is "debug flavor but with a field explicitly set to the base default".
    ``cfg`` may be a dataclass, an OmegaConf node, a namespace or a plain dict.
    """
    return resolve_family_config(cfg, {**BASE_DEFAULTS, **EXTENSION_DEFAULTS}, FLAVORS, family)


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
        logistic_components: int = 5,
        prior: str = "normal",
        prior_components: int = 10,
        prior_hidden: int = 256,
        decoder_dropout: float = 0.0,
        skip_connections: bool = False,
    ) -> None:
        super().__init__()
        num_blocks = _num_down_blocks(resolution)
        check_positive_ints(
            None, in_channels=in_channels, latent_dim=latent_dim,
            base_channels=base_channels, hidden_dim=hidden_dim,
            logistic_components=logistic_components, prior_components=prior_components,
            prior_hidden=prior_hidden,
        )
        if prior not in PRIORS:
            raise ValueError(f"unknown model.prior {prior!r}; choose one of: {', '.join(PRIORS)}")
        if not 0.0 <= decoder_dropout < 1.0:
            raise ValueError(f"model.decoder_dropout must be in [0, 1), got {decoder_dropout!r}")
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
        extensions = {
            "logistic_components": int(logistic_components), "prior": prior,
            "prior_components": int(prior_components), "prior_hidden": int(prior_hidden),
            "decoder_dropout": float(decoder_dropout), "skip_connections": bool(skip_connections),
        }
        self.config.update({k: v for k, v in extensions.items() if v != EXTENSION_DEFAULTS[k]})
        self.in_channels, self.resolution, self.latent_dim = in_channels, resolution, latent_dim
        self.beta = float(beta)
        self.skip_connections = bool(skip_connections)
        self.likelihood, params_per_channel = make_likelihood(
            likelihood, obs_std, int(logistic_components), in_channels, build=build_likelihood
        )
        self.prior = build_prior(prior, latent_dim, int(prior_components), int(prior_hidden))
        self._flat_channels = 4 * base_channels
        self._build_encoder(in_channels, base_channels, hidden_dim, latent_dim, num_blocks)
        out_channels = in_channels * params_per_channel
        self._build_decoder(
            out_channels, base_channels, hidden_dim, latent_dim, num_blocks, float(decoder_dropout)
        )

    @classmethod
    def objective_of(cls, config: dict[str, Any]) -> str:
        """What ``-forward()["elbo"]`` is: a bound on -log p(x) only without encoder->decoder skips
        (with skips the reconstruction term conditions on x itself)."""
        return "neg_objective" if config.get("skip_connections") else "neg_elbo"

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs: base defaults < flavor preset < fields the config sets."""
        return resolve_conv_vae_config(cfg)

    @classmethod
    def from_config(cls, cfg: Any) -> "ConvVAE":
        """Build from a duck-typed model config (dataclass / OmegaConf node / namespace / dict)."""
        return cls(**cls.resolve_config(cfg))

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

    def _build_decoder(
        self, out_ch: int, base: int, hidden: int, latent: int, num_blocks: int, dropout: float
    ) -> None:
        flat = self._flat_channels * _BOTTLENECK * _BOTTLENECK
        head: list[nn.Module] = [nn.Linear(latent, hidden), nn.ReLU(inplace=True)]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        self.decoder_head = nn.Sequential(*head, nn.Linear(hidden, flat))
        num_extra = num_blocks - _REFERENCE_BLOCKS
        blocks = [make_up_block(4 * base, 4 * base, batch_norm=True) for _ in range(num_extra)]
        blocks += [
            make_up_block(4 * base, 2 * base, batch_norm=False),
            make_up_block(2 * base, base, batch_norm=False),
        ]
        if dropout > 0:
            for block in blocks:
                block.append(nn.Dropout2d(dropout))
        blocks.append(make_up_block(base, out_ch, batch_norm=False, activation=False))
        self.decoder_blocks = nn.ModuleList(blocks)
        # Decoder block j > 0 takes its input at the resolution of encoder block
        # (num_blocks - 1 - j)'s output, with the same width; see the module docstring.
        if self.skip_connections:
            widths = [self.decoder_blocks[j][0].in_channels for j in range(1, num_blocks)]
            self.skip_gates = nn.ParameterList(
                [nn.Parameter(torch.zeros(1, w, 1, 1)) for w in widths]
            )

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
                f"{self.model_name} expects input of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(model.in_channels, model.resolution), got {list(x.shape)}"
            )

    def encode_features(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(mu, logvar, skips): posterior parameters and the encoder maps the decoder's skips use.

        ``skips[j - 1]`` feeds decoder block j (empty list without skip connections).
        """
        self._check_input(x)
        h, features = x, []
        for block in self.encoder_blocks:
            h = block(h)
            features.append(h)
        mu, logvar = self.encoder_head(h.flatten(start_dim=1)).chunk(2, dim=1)
        skips = features[-2::-1] if self.skip_connections else []
        return mu, logvar, skips

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior parameters (mu, logvar), each [B, latent_dim], for images x in [0, 1]."""
        mu, logvar, _ = self.encode_features(x)
        return mu, logvar

    def decode_logits(
        self, z: torch.Tensor, skips: list[torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Raw likelihood parameters [B, C·params_per_channel, R, R] for latents z [B, D].

        ``skips`` are the encoder maps from ``encode_features``; None means absent (zero) skips.
        """
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(
                f"{self.model_name} expects z of shape [B, {self.latent_dim}], got {list(z.shape)}"
            )
        h = self.decoder_head(z).view(-1, self._flat_channels, _BOTTLENECK, _BOTTLENECK)
        for j, block in enumerate(self.decoder_blocks):
            if skips and j > 0:
                h = h + self.skip_gates[j - 1] * skips[j - 1]
            h = block(h)
        return h

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean image in [0, 1], [B, C, R, R], for latents z [B, D] (skips, if any, are zero)."""
        return self.likelihood.mean(self.decode_logits(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction at z = mu(x) in [0, 1], with x's skips (no gradient)."""
        mu, _, skips = self.encode_features(x)
        return self.likelihood.mean(self.decode_logits(mu, skips))

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n mean images in [0, 1] decoded from z ~ p(z) (no gradient); device defaults to the model's."""
        param = next(self.parameters())
        z = self.prior.sample(n, param.device if device is None else device)
        return self.decode(z.to(param.dtype))  # the decoder's dtype: bf16 under a bf16 engine

    def kl_terms(
        self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kl per sample [B], kl_per_dim [D] batch mean, kl_rest batch mean scalar), all fp32.

        kl = Σ_dims kl_elem + kl_rest per sample; kl_rest is 0 except for priors whose KL has a
        part with no per-dimension meaning (MoG, see ``models.priors``).
        """
        kl_elem, kl_rest = self.prior.kl_terms(mu.float(), logvar.float(), z.float())
        kl = kl_elem.sum(dim=1)
        rest = torch.zeros((), device=kl.device)
        if kl_rest is not None:
            kl, rest = kl + kl_rest, kl_rest.mean()
        return kl, kl_elem.mean(dim=0), rest

    def forward(
        self,
        x: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        free_bits: float = 0.0,
        target_kl: float = 0.0,
        aux: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """One stochastic ELBO evaluation.

        ``beta`` is the KL weight already multiplied by any annealing factor (None: model.beta);
        ``free_bits`` is λ in nats per latent dim, applied to the batch-mean KL of each dim;
        ``target_kl`` is the minimum KL per batch (applied after free bits; 0 disables); ``aux``
        is unused here (families with an auxiliary network take it).
        Returns loss (mean recon + β·max(target_kl, KL_free_bits)), recon and kl (per-sample
        means, kl unclamped), kl_per_dim [D], elbo (mean of -(recon+kl)), x_hat, mu, logvar, z,
        and metrics (family-specific scalars; empty here).
        """
        if target_kl < 0:
            raise ValueError(f"target_kl must be >= 0, got {target_kl}")
        mu, logvar, skips = self.encode_features(x)
        z = reparameterize(mu, logvar)
        params = self.decode_logits(z, skips)
        # Loss math in fp32: exp(logvar) and pixel sums overflow or lose precision in fp16/bf16.
        recon = self.likelihood.nll(params.float(), x.float())
        kl, kl_per_dim, kl_rest = self.kl_terms(mu, logvar, z)
        kl_term = free_bits_kl(kl_per_dim, free_bits) + kl_rest
        if target_kl > 0:
            kl_term = torch.clamp(kl_term, min=float(target_kl))
        beta_eff = self.beta if beta is None else beta
        loss = recon.mean() + beta_eff * kl_term
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
            "metrics": {},
        }

    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised log-densities for a given z [B, D]: log p(x|z), log p(z), log q(z|x), each [B].

        log p(x|z) + log p(z) - log q(z|x) is one importance weight; with z ~ q(z|x) its mean
        is the ELBO and logmeanexp over K draws is the IWAE bound.
        """
        mu, logvar = self.encode(x)
        if z.shape != mu.shape:
            raise ValueError(f"z must have shape {list(mu.shape)} to match x, got {list(z.shape)}")
        # Generative path (zero skips): with skip connections p(x|z) must not peek at x.
        params = at_least_float32(self.decode_logits(z))
        return {
            "log_px_z": self.likelihood.log_prob(params, at_least_float32(x)),
            "log_pz": self.prior.log_prob(at_least_float32(z)),
            "log_qz_x": diag_gaussian_log_prob(at_least_float32(z), at_least_float32(mu), at_least_float32(logvar)),
        }

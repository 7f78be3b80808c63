"""Hierarchical VAE (``ladder_vae``): Ladder-VAE inference over L Gaussian latent levels.

Generative path (top-down):  z_L ~ N(0, I),  z_i ~ p(z_i | z_{i+1}),  x ~ p(x | z_1, h_1).
A deterministic top-down state h_i (residual MLP of [z_{i+1}, h_{i+1}], starting from a learned
h_L) parameterises each conditional prior and is fed to the conv decoder beside z_1: it is the
decoder-side skip path, so upper levels reach the pixels without squeezing through z_1.

Inference path: a conv trunk gives d_1, residual MLPs give d_2..d_L (bottom-up). Level i's
posterior q(z_i | z_{i+1}, x) combines the bottom-up features with the top-down prior:

* ``merge="precision"`` (Sønderby et al. 2016): a head on d_i gives (μ̂, σ̂), merged with the prior
  (μ_p, σ_p) by precision weighting; the top level uses (μ̂_L, σ̂_L) directly.
* ``merge="residual"`` (NVAE / VDVAE): a head on [d_i, h_i] gives (Δμ, Δσ) and
  q = N(μ_p + Δμ, σ_p·Δσ), Δσ = softplus(·) initialised at 1; the top level's prior is N(0, I).

Every scale is ``min_std + softplus(raw)``, which keeps deep hierarchies finite. The KL of each
level is analytic between q and the conditional prior at the *sampled* parent.

The config helpers shared with the other families live in ``models.config_access``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config_access import check_positive_ints, make_likelihood, resolve_family_config, to_plain
from models.kl import diag_gaussian_log_prob, free_bits_kl, gaussian_kl
from models.layers import make_down_block, make_up_block
from models.likelihoods import at_least_float32, build_likelihood
from models.registry import register_model

# ----------------------------------------------------------------------------- Gaussian pieces

_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1


def split_scale(raw: torch.Tensor, min_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a head's output into (mean, std) with std = min_std + softplus(raw_std)."""
    mu, raw_std = raw.chunk(2, dim=-1)
    return mu, min_std + F.softplus(raw_std)


def precision_weighted_merge(
    mu_hat: torch.Tensor, std_hat: torch.Tensor, mu_p: torch.Tensor, std_p: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ladder-VAE merge: σ_q² = 1/(σ̂⁻² + σ_p⁻²), μ_q = (μ̂σ̂⁻² + μ_pσ_p⁻²)·σ_q².

    Written as σ̂²σ_p²/(σ̂²+σ_p²) and (μ̂σ_p² + μ_pσ̂²)/(σ̂²+σ_p²): the same closed form without
    reciprocals of tiny scales.
    """
    var_hat, var_p = std_hat.pow(2), std_p.pow(2)
    total = var_hat + var_p
    mu = (mu_hat * var_p + mu_p * var_hat) / total
    return mu, torch.sqrt(var_hat * var_p / total)


def residual_posterior(
    raw: torch.Tensor, mu_p: torch.Tensor, std_p: torch.Tensor, min_std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q = N(μ_p + Δμ, σ_p·Δσ) with Δσ = softplus(raw + c), c chosen so raw = 0 gives Δσ = 1."""
    delta_mu, raw_std = raw.chunk(2, dim=-1)
    return mu_p + delta_mu, min_std + std_p * F.softplus(raw_std + _SOFTPLUS_ONE)


def _logvar(std: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.log(std)


class ResidualMLP(nn.Module):
    """d -> d + Linear(SiLU(Linear(SiLU(d)))): a bottom-up step that keeps the gradient path short."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return d + self.net(d)


class TopDownBlock(nn.Module):
    """Level i < L: the top-down state h_i, the prior p(z_i|z_{i+1}) and the posterior q(z_i|z_{i+1}, x).

    Deterministic (sampling happens outside), so activation checkpointing may recompute it.
    """

    def __init__(self, parent_dim: int, latent_dim: int, hidden: int, merge: str, min_std: float) -> None:
        super().__init__()
        self.merge, self.min_std = merge, min_std
        self.state = nn.Sequential(
            nn.Linear(parent_dim + hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
        )
        self.prior_head = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))
        post_in = hidden if merge == "precision" else 2 * hidden
        self.posterior_head = nn.Linear(post_in, 2 * latent_dim)

    def prior(self, z_parent: torch.Tensor, h_parent: torch.Tensor):
        """(h_i, μ_p, σ_p) given the parent latent and the parent's top-down state."""
        h = h_parent + self.state(torch.cat([z_parent, h_parent], dim=-1))
        mu_p, std_p = split_scale(self.prior_head(h), self.min_std)
        return h, mu_p, std_p

    def forward(self, z_parent: torch.Tensor, h_parent: torch.Tensor, d: torch.Tensor):
        """(h_i, μ_p, σ_p, μ_q, σ_q) given the parent latent, parent state and bottom-up features d_i."""
        h, mu_p, std_p = self.prior(z_parent, h_parent)
        if self.merge == "precision":
            mu_hat, std_hat = split_scale(self.posterior_head(d), self.min_std)
            mu_q, std_q = precision_weighted_merge(mu_hat, std_hat, mu_p, std_p)
        else:
            raw = self.posterior_head(torch.cat([d, h], dim=-1))
            mu_q, std_q = residual_posterior(raw, mu_p, std_p, self.min_std)
        return h, mu_p, std_p, mu_q, std_q


# ----------------------------------------------------------------------------- the model

BASE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "resolution": 64,
    "base_channels": 32,
    "hidden_dim": 512,
    "likelihood": "bernoulli",
    "obs_std": 0.1,
    "logistic_components": 5,
    "beta": 1.0,
    "ladder": {"latent_dims": [32, 16, 8], "merge": "precision", "hidden": 256, "min_std": 1e-3},
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    "debug": {"base_channels": 8, "hidden_dim": 32, "ladder": {"latent_dims": [8, 4, 2], "hidden": 32}},
}

_BOTTLENECK = 4
_PLAIN_BLOCKS = 3  # blocks without BatchNorm, as in conv_vae's reference stack


def _num_conv_stages(resolution: Any) -> int:
    valid = (
        isinstance(resolution, numbers.Integral) and 32 <= resolution <= 256
        and resolution & (resolution - 1) == 0
    )
    if not valid:
        raise ValueError(
            f"model.resolution must be a power of two in [32, 256] for ladder_vae, got {resolution!r}"
        )
    return int(math.log2(int(resolution) // _BOTTLENECK))


@register_model("ladder_vae")
class LadderVAE(nn.Module):
    """Ladder VAE; see the module docstring. Latents are handled as the concatenation
    [z_1, ..., z_L] (bottom first), width ``latent_dim = sum(latent_dims)``."""

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 64,
        base_channels: int = 32,
        hidden_dim: int = 512,
        likelihood: str = "bernoulli",
        obs_std: float = 0.1,
        logistic_components: int = 5,
        beta: float = 1.0,
        ladder: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        ladder = {**BASE_DEFAULTS["ladder"], **(to_plain(ladder) or {})}
        latent_dims = [int(d) for d in ladder["latent_dims"]] if ladder["latent_dims"] else []
        merge, hidden, min_std = ladder["merge"], ladder["hidden"], float(ladder["min_std"])
        num_stages = _num_conv_stages(resolution)
        check_positive_ints(
            "ladder_vae", in_channels=in_channels, base_channels=base_channels,
            hidden_dim=hidden_dim, **{"ladder.hidden": hidden},
        )
        if not latent_dims or any(d < 1 for d in latent_dims):
            raise ValueError(
                f"model.ladder.latent_dims must be a non-empty list of positive ints, got {ladder['latent_dims']!r}"
            )
        if merge not in ("precision", "residual"):
            raise ValueError(f"model.ladder.merge must be 'precision' or 'residual', got {merge!r}")
        if not min_std > 0:
            raise ValueError(f"model.ladder.min_std must be > 0, got {min_std!r}")
        if not beta >= 0:
            raise ValueError(f"model.beta must be >= 0, got {beta!r}")
        self.config = {
            "in_channels": int(in_channels), "resolution": int(resolution),
            "base_channels": int(base_channels), "hidden_dim": int(hidden_dim),
            "likelihood": likelihood, "obs_std": float(obs_std),
            "logistic_components": int(logistic_components), "beta": float(beta),
            "ladder": {"latent_dims": latent_dims, "merge": merge, "hidden": int(hidden), "min_std": min_std},
        }
        self.in_channels, self.resolution = int(in_channels), int(resolution)
        self.latent_dims, self.latent_dim = latent_dims, sum(latent_dims)
        self.merge, self.min_std, self.beta = merge, min_std, float(beta)
        self.likelihood, params_per_channel = make_likelihood(
            likelihood, obs_std, int(logistic_components), self.in_channels, build=build_likelihood
        )
        self._flat_channels = 4 * int(base_channels)
        self._build_inference(int(base_channels), int(hidden_dim), int(hidden), num_stages)
        self._build_generative(int(base_channels), int(hidden_dim), int(hidden), num_stages, params_per_channel)

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs: base defaults < flavor preset < fields the config sets."""
        return resolve_family_config(cfg, BASE_DEFAULTS, FLAVORS, "ladder_vae")

    @classmethod
    def from_config(cls, cfg: Any) -> "LadderVAE":
        """Build from a duck-typed model config (dataclass / OmegaConf / namespace / dict)."""
        return cls(**cls.resolve_config(cfg))

    def _build_inference(self, base: int, hidden_dim: int, hidden: int, num_stages: int) -> None:
        widths = [base, 2 * base] + [4 * base] * (num_stages - 2)
        blocks, prev = [], self.in_channels
        for i, width in enumerate(widths):
            blocks.append(make_down_block(prev, width, batch_norm=i >= _PLAIN_BLOCKS))
            prev = width
        self.encoder_blocks = nn.ModuleList(blocks)
        flat = self._flat_channels * _BOTTLENECK * _BOTTLENECK
        self.encoder_head = nn.Sequential(
            nn.Linear(flat, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, hidden)
        )
        self.bottom_up_blocks = nn.ModuleList(ResidualMLP(hidden) for _ in self.latent_dims[1:])
        top_in = hidden if self.merge == "precision" else 2 * hidden
        self.top_posterior = nn.Linear(top_in, 2 * self.latent_dims[-1])

    def _build_generative(
        self, base: int, hidden_dim: int, hidden: int, num_stages: int, params_per_channel: int
    ) -> None:
        self.h_top = nn.Parameter(torch.zeros(hidden))
        dims = self.latent_dims
        # top_down_blocks[i] produces level i from level i+1 (i = 0 is the bottom level).
        self.top_down_blocks = nn.ModuleList(
            TopDownBlock(dims[i + 1], dims[i], hidden, self.merge, self.min_std)
            for i in range(len(dims) - 1)
        )
        flat = self._flat_channels * _BOTTLENECK * _BOTTLENECK
        self.decoder_head = nn.Sequential(
            nn.Linear(dims[0] + hidden, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, flat)
        )
        num_extra = num_stages - _PLAIN_BLOCKS
        blocks = [make_up_block(4 * base, 4 * base, batch_norm=True) for _ in range(num_extra)]
        blocks += [
            make_up_block(4 * base, 2 * base, batch_norm=False),
            make_up_block(2 * base, base, batch_norm=False),
            make_up_block(base, self.in_channels * params_per_channel, batch_norm=False, activation=False),
        ]
        self.decoder_blocks = nn.ModuleList(blocks)

    def checkpoint_blocks(self) -> list[nn.ModuleList]:
        """Conv blocks, bottom-up MLPs and per-level top-down blocks (all deterministic)."""
        return [self.encoder_blocks, self.bottom_up_blocks, self.top_down_blocks, self.decoder_blocks]

    # -- paths ------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"ladder_vae expects input of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(model.in_channels, model.resolution), got {list(x.shape)}"
            )

    def split_levels(self, z: torch.Tensor) -> list[torch.Tensor]:
        """[B, sum(latent_dims)] -> [z_1, ..., z_L]."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"ladder_vae expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        return list(z.split(self.latent_dims, dim=1))

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x)
        h = x
        for block in self.encoder_blocks:
            h = block(h)
        d = self.encoder_head(h.flatten(start_dim=1))
        features = [d]
        for block in self.bottom_up_blocks:
            d = block(d)
            features.append(d)
        return features

    def _infer(
        self, x: torch.Tensor, z_given: list[torch.Tensor] | None = None, use_mean: bool = False
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """Top-down inference. Each level's z is sampled from q, its posterior mean (use_mean),
        or taken from ``z_given``. Returns per-level dicts (bottom first) and h_1."""
        features = self._bottom_up(x)
        top = len(self.latent_dims) - 1
        h = self.h_top.expand(x.shape[0], -1)
        mu_p = torch.zeros_like(features[top][:, : self.latent_dims[top]])
        std_p = torch.ones_like(mu_p)
        if self.merge == "precision":
            mu_q, std_q = split_scale(self.top_posterior(features[top]), self.min_std)
        else:
            raw = self.top_posterior(torch.cat([features[top], h], dim=-1))
            mu_q, std_q = residual_posterior(raw, mu_p, std_p, self.min_std)
        levels: list[dict[str, torch.Tensor]] = []
        for i in range(top, -1, -1):
            if i < top:
                h, mu_p, std_p, mu_q, std_q = self.top_down_blocks[i](levels[-1]["z"], h, features[i])
            if z_given is not None:
                z = z_given[i]
            elif use_mean:
                z = mu_q
            else:
                z = mu_q + std_q * torch.randn_like(mu_q)
            levels.append({"z": z, "mu_q": mu_q, "std_q": std_q, "mu_p": mu_p, "std_p": std_p})
        return levels[::-1], h

    def _top_down_state(self, z_levels: list[torch.Tensor]) -> torch.Tensor:
        """h_1 from given latents (the generative path, no x)."""
        h = self.h_top.expand(z_levels[0].shape[0], -1)
        for i in range(len(self.latent_dims) - 2, -1, -1):
            h, _, _ = self.top_down_blocks[i].prior(z_levels[i + 1], h)
        return h

    def decode_logits(self, z1: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        """Raw likelihood parameters [B, C·params_per_channel, R, R] from z_1 and the skip state h_1."""
        h = self.decoder_head(torch.cat([z1, h1], dim=1))
        h = h.view(-1, self._flat_channels, _BOTTLENECK, _BOTTLENECK)
        for block in self.decoder_blocks:
            h = block(h)
        return h

    # -- protocol ---------------------------------------------------------------------------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar) of all levels concatenated [B, latent_dim], each level conditioned on its
        parent's posterior mean (the deterministic path through the hierarchy)."""
        levels, _ = self._infer(x, use_mean=True)
        mu = torch.cat([lv["mu_q"] for lv in levels], dim=1)
        logvar = torch.cat([_logvar(lv["std_q"]) for lv in levels], dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean image in [0, 1] for concatenated latents z [B, latent_dim]."""
        z_levels = self.split_levels(z)
        return self.likelihood.mean(self.decode_logits(z_levels[0], self._top_down_state(z_levels)))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(posterior means) in [0, 1] (no gradient)."""
        return self.decode(self.encode(x)[0])

    @torch.no_grad()
    def sample_prior_latents(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """z ~ p(z) top-down from z_L ~ N(0, I), concatenated [n, latent_dim]."""
        if device is None:
            device = self.h_top.device
        h = self.h_top.expand(n, -1).to(device)
        z = torch.randn(n, self.latent_dims[-1], device=device, dtype=self.h_top.dtype)
        levels = [z]
        for i in range(len(self.latent_dims) - 2, -1, -1):
            h, mu_p, std_p = self.top_down_blocks[i].prior(z, h)
            z = mu_p + std_p * torch.randn_like(mu_p)
            levels.append(z)
        return torch.cat(levels[::-1], dim=1)

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n images in [0, 1] from ancestral sampling of the hierarchy (no gradient)."""
        return self.decode(self.sample_prior_latents(n, device))

    @torch.no_grad()
    def sample_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """One draw z ~ q(z|x), all levels concatenated [B, latent_dim]."""
        levels, _ = self._infer(x)
        return torch.cat([lv["z"] for lv in levels], dim=1)

    def forward(
        self,
        x: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        free_bits: float = 0.0,
        target_kl: float = 0.0,
        aux: Any = None,
    ) -> dict[str, Any]:
        """One stochastic ELBO evaluation.

        loss = mean recon + β·max(target_kl, Σ_dims max(λ, KL_dim)), with KL_dim the batch-mean KL
        of every latent dimension of every level (free bits λ = ``free_bits``). ``aux`` is unused.
        """
        levels, h1 = self._infer(x)
        params = self.decode_logits(levels[0]["z"], h1)
        recon = self.likelihood.nll(params.float(), x.float())
        kl_levels = [
            gaussian_kl(lv["mu_q"].float(), _logvar(lv["std_q"].float()),
                        lv["mu_p"].float(), _logvar(lv["std_p"].float()))
            for lv in levels
        ]
        kl_elem = torch.cat(kl_levels, dim=1)
        kl_per_dim = kl_elem.mean(dim=0)
        kl = kl_elem.sum(dim=1)
        kl_term = free_bits_kl(kl_per_dim, free_bits)
        if target_kl > 0:
            kl_term = torch.clamp(kl_term, min=float(target_kl))
        beta_eff = self.beta if beta is None else beta
        loss = recon.mean() + beta_eff * kl_term
        metrics = {f"kl_level/{i}": k.sum(dim=1).mean().detach() for i, k in enumerate(kl_levels)}
        return {
            "loss": loss,
            "recon": recon.mean(),
            "kl": kl.mean(),
            "kl_per_dim": kl_per_dim,
            "elbo": -(recon + kl).mean(),
            "x_hat": self.likelihood.mean(params),
            "z": torch.cat([lv["z"] for lv in levels], dim=1),
            "metrics": metrics,
        }

    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """For concatenated z [B, latent_dim]: log p(x|z), log p(z) = Σ_i log p(z_i|z_{i+1}) and
        log q(z|x) = Σ_i log q(z_i|z_{i+1}, x), each [B] with all constants (true nats)."""
        levels, h1 = self._infer(x, z_given=self.split_levels(z))
        params = at_least_float32(self.decode_logits(levels[0]["z"], h1))
        log_pz = sum(
            diag_gaussian_log_prob(at_least_float32(lv["z"]), at_least_float32(lv["mu_p"]), _logvar(at_least_float32(lv["std_p"])))
            for lv in levels
        )
        log_qz = sum(
            diag_gaussian_log_prob(at_least_float32(lv["z"]), at_least_float32(lv["mu_q"]), _logvar(at_least_float32(lv["std_q"])))
            for lv in levels
        )
        return {"log_px_z": self.likelihood.log_prob(params, at_least_float32(x)), "log_pz": log_pz, "log_qz_x": log_qz}

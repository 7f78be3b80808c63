"""Progressive hierarchical VAE (``progressive_ladder_vae``): the Ladder VAE grown 4×4 -> ``resolution``.

The latent hierarchy (bottom-up MLPs, top-down blocks, conditional priors, precision or residual
merge) is ``ladder_vae``'s, unchanged; its conv trunk and conv decoder are replaced by the
growing conv part of ``progressive_vae`` (per-resolution blocks, from/to-image layers, the
fade-in blend), so the hierarchy gains output resolution stage by stage while its parameters
keep their names. Needs ``resolution`` >= 32, like ``ladder_vae``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.config_access import resolve_family_config
from models.ladder_vae import BASE_DEFAULTS as LADDER_DEFAULTS
from models.ladder_vae import FLAVORS as LADDER_FLAVORS
from models.ladder_vae import LadderVAE, ResidualMLP, TopDownBlock
from models.progressive_vae import _BOTTLENECK, GrowableConvs, check_stage
from models.registry import register_model

BASE_DEFAULTS: dict[str, Any] = {**LADDER_DEFAULTS, "stage_resolution": None, "start_resolution": None}


@register_model("progressive_ladder_vae")
class ProgressiveLadderVAE(GrowableConvs, LadderVAE):
    """Ladder VAE whose conv parts grow; see the module docstring."""

    def __init__(self, *, resolution: int = 64, stage_resolution: int | None = None,
                 start_resolution: int | None = None, **ladder_kwargs: Any) -> None:
        stage, start = check_stage(resolution, stage_resolution, start_resolution)
        self._stage_args = (stage, start, int(resolution))  # read by the _build_* overrides
        super().__init__(resolution=resolution, **ladder_kwargs)
        self.resolution, self.start_resolution, self.final_resolution = stage, start, int(resolution)
        self.alpha = 1.0
        self.config.update({"stage_resolution": stage, "start_resolution": start})

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        return resolve_family_config(cfg, BASE_DEFAULTS, LADDER_FLAVORS, "progressive_ladder_vae")

    @classmethod
    def from_config(cls, cfg: Any) -> "ProgressiveLadderVAE":
        return cls(**cls.resolve_config(cfg))

    def _set_stage_attrs(self, base: int) -> None:
        self.resolution, self.start_resolution, self.final_resolution = self._stage_args
        self.config = {**self.config, "base_channels": base}

    def _build_inference(self, base: int, hidden_dim: int, hidden: int, num_stages: int) -> None:
        self._set_stage_attrs(base)
        flat = self.width(_BOTTLENECK) * _BOTTLENECK**2
        self.encoder_head = nn.Sequential(nn.Linear(flat, hidden_dim), nn.ReLU(inplace=True),
                                          nn.Linear(hidden_dim, hidden))
        self.bottom_up_blocks = nn.ModuleList(ResidualMLP(hidden) for _ in self.latent_dims[1:])
        top_in = hidden if self.merge == "precision" else 2 * hidden
        self.top_posterior = nn.Linear(top_in, 2 * self.latent_dims[-1])

    def _build_generative(self, base: int, hidden_dim: int, hidden: int, num_stages: int,
                          params_per_channel: int) -> None:
        self.h_top = nn.Parameter(torch.zeros(hidden))
        dims = self.latent_dims
        self.top_down_blocks = nn.ModuleList(
            TopDownBlock(dims[i + 1], dims[i], hidden, self.merge, self.min_std) for i in range(len(dims) - 1))
        w4 = self.width(_BOTTLENECK)
        self.decoder_head = nn.Sequential(nn.Linear(dims[0] + hidden, hidden_dim), nn.ReLU(inplace=True),
                                          nn.Linear(hidden_dim, w4 * _BOTTLENECK**2),
                                          nn.Unflatten(1, (w4, _BOTTLENECK, _BOTTLENECK)))
        self._build_convs(self.in_channels * params_per_channel)

    def checkpoint_blocks(self) -> list:
        return [list(self.encoder_blocks.values()), self.bottom_up_blocks, self.top_down_blocks,
                list(self.decoder_blocks.values())]

    def _bottom_up(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._check_input(x)
        d = self.encoder_head(self.conv_features(x).flatten(start_dim=1))
        features = [d]
        for block in self.bottom_up_blocks:
            d = block(d)
            features.append(d)
        return features

    def decode_logits(self, z1: torch.Tensor, h1: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters at the stage resolution from z_1 and the top-down state h_1."""
        return self.conv_logits(self.decoder_head(torch.cat([z1, h1], dim=1)))

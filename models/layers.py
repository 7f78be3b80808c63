"""Convolutional building blocks shared by the VAE families."""

from __future__ import annotations

import torch
from torch import nn


def make_down_block(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    """3×3 conv (padding 1) -> [BatchNorm] -> ReLU -> 2×2 max-pool: halves the resolution.

    The conv drops its bias under BatchNorm because BN's shift makes it redundant.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


def make_up_block(
    in_channels: int, out_channels: int, batch_norm: bool, activation: bool = True
) -> nn.Sequential:
    """4×4 stride-2 transposed conv (padding 1) -> [BatchNorm] -> [ReLU]: doubles the resolution.

    Kernel 4 with stride 2 gives an exact 2× upsampling with even kernel overlap, which
    avoids the checkerboard pattern of kernel 3. ``activation=False`` is for the output layer,
    whose raw values are likelihood parameters.
    """
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(
            in_channels, out_channels, kernel_size=4, stride=2, padding=1, bias=not batch_norm
        )
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    if activation:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Draw z = mu + exp(0.5·logvar)·eps, eps ~ N(0, I), differentiably in mu and logvar."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

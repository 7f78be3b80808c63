"""Factor-VAE (``factor_vae``, Kim & Mnih 2018): the conv VAE plus γ·TC(z).

TC(z) = KL[q(z) || ∏_j q(z_j)] is estimated with the density-ratio trick: a discriminator D
with two logits learns to tell codes z ~ q(z) (class 0) from codes whose dimensions were each
shuffled independently across the batch (class 1, samples of ∏_j q(z_j)); then
TC ≈ E_q[log D_0(z) − log D_1(z)] = E_q[logit_0 − logit_1].

The discriminator is **not** a submodule: the VAE goes into DeepSpeed while the pipeline trains
the discriminator with its own plain Adam (``auxiliary_optim``) and all-reduces its gradients.
Order per micro-batch:

1. ``out = vae(x, ..., aux=disc)``  (loss includes γ·TC, computed through D)
2. VAE backward + step            (this backward also leaves gradients in D's parameters)
3. zero D's gradients              (so the VAE's TC gradient never updates D)
4. ``loss_d, metrics = vae.auxiliary_loss(disc, out)``  (on ``out["z"].detach()``)
5. D backward (+ all-reduce) + D step

Simplification vs. the paper: the permuted codes come from the same batch rather than a
second one; the batch still gives an unbiased sample of ∏_j q(z_j) per dimension.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config_access import cfg_get, resolve_flavor, resolve_flavored
from models.conv_vae import ConvVAE, resolve_conv_vae_config
from models.registry import register_model

FACTOR_DEFAULTS: dict[str, Any] = {
    "gamma": 10.0,
    "disc_hidden": 1000,
    "disc_layers": 6,
    "disc_lr": 1e-4,
    "disc_betas": [0.5, 0.9],
}

FACTOR_FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    "debug": {"disc_hidden": 32, "disc_layers": 2},
}


def permute_dims(z: torch.Tensor) -> torch.Tensor:
    """Shuffle every column of z [B, D] with its own random permutation of the batch.

    Each marginal q(z_j) is kept exactly (a column is a permutation of itself) while the joint
    is broken, so the rows are samples of ∏_j q(z_j).
    """
    if z.dim() != 2:
        raise ValueError(f"permute_dims expects z of shape [B, D], got {list(z.shape)}")
    index = torch.rand(z.shape, device=z.device).argsort(dim=0)
    return torch.gather(z, 0, index)


class TCDiscriminator(nn.Sequential):
    """MLP: ``layers`` hidden Linear+LeakyReLU(0.2) layers of ``hidden`` units, then 2 logits."""

    def __init__(self, latent_dim: int, hidden: int, layers: int) -> None:
        modules: list[nn.Module] = []
        width = latent_dim
        for _ in range(layers):
            modules += [nn.Linear(width, hidden), nn.LeakyReLU(0.2, inplace=True)]
            width = hidden
        modules.append(nn.Linear(width, 2))
        super().__init__(*modules)


def _plain_factor(group: Any) -> dict[str, Any]:
    factor = {key: cfg_get(group, key, default) for key, default in FACTOR_DEFAULTS.items()}
    factor["disc_betas"] = [float(b) for b in factor["disc_betas"]]  # ListConfig/tuple -> list
    return factor


@register_model("factor_vae")
class FactorVAE(ConvVAE):
    """ConvVAE + γ·TC(z) through an external discriminator; see the module docstring."""

    def __init__(self, factor: dict[str, Any] | None = None, **conv_kwargs: Any) -> None:
        super().__init__(**conv_kwargs)
        factor = _plain_factor(factor)
        gamma, hidden, layers = factor["gamma"], factor["disc_hidden"], factor["disc_layers"]
        if not gamma >= 0:
            raise ValueError(f"model.factor.gamma must be >= 0, got {gamma!r}")
        for key in ("disc_hidden", "disc_layers"):
            value = factor[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.factor.{key} must be a positive integer, got {value!r}")
        if not factor["disc_lr"] > 0:
            raise ValueError(f"model.factor.disc_lr must be > 0, got {factor['disc_lr']!r}")
        if len(factor["disc_betas"]) != 2 or not all(0 <= b < 1 for b in factor["disc_betas"]):
            raise ValueError(
                f"model.factor.disc_betas must be two numbers in [0, 1), got {factor['disc_betas']!r}"
            )
        factor["gamma"], factor["disc_lr"] = float(gamma), float(factor["disc_lr"])
        self.gamma = factor["gamma"]
        self.config["factor"] = factor

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs; ``cfg.factor`` may be an object, a dict or absent."""
        conv = resolve_conv_vae_config(cfg, family="factor_vae")
        preset = resolve_flavor(cfg, FACTOR_FLAVORS, "factor_vae")
        factor = resolve_flavored(cfg_get(cfg, "factor"), FACTOR_DEFAULTS, preset)
        return {"factor": _plain_factor(factor), **conv}

    @classmethod
    def from_config(cls, cfg: Any) -> "FactorVAE":
        """Build from a duck-typed config; ``cfg.factor`` may be an object, a dict or absent."""
        return cls(**cls.resolve_config(cfg))

    def build_auxiliary(self) -> nn.Module:
        """A fresh TC discriminator (fp32, on the CPU; the caller moves it)."""
        factor = self.config["factor"]
        return TCDiscriminator(self.latent_dim, factor["disc_hidden"], factor["disc_layers"])

    def auxiliary_optim(self) -> dict[str, Any]:
        """Adam arguments for the discriminator: ``dict(lr=, betas=)``."""
        factor = self.config["factor"]
        return {"lr": factor["disc_lr"], "betas": tuple(factor["disc_betas"])}

    def forward(
        self,
        x: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        free_bits: float = 0.0,
        target_kl: float = 0.0,
        aux: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """ConvVAE forward plus γ·TC(z) in the loss and ``metrics["tc"]`` when ``aux`` is given.

        With ``aux=None`` the TC term is 0 (plain β-VAE loss) and ``tc`` is not reported.
        """
        out = super().forward(x, beta=beta, free_bits=free_bits, target_kl=target_kl)
        if aux is not None:
            logits = aux(out["z"].float())  # the discriminator stays fp32 under bf16/fp16
            tc = (logits[:, 0] - logits[:, 1]).mean()
            out["loss"] = out["loss"] + self.gamma * tc
            out["metrics"] = {**out["metrics"], "tc": tc.detach()}
        return out

    def auxiliary_loss(
        self, aux: nn.Module, out: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Discriminator cross-entropy: codes of ``out`` are class 0, permuted codes class 1.

        Returns (loss, {"disc_loss", "disc_acc"}); only the discriminator gets gradient.
        """
        z = out["z"].detach().float()
        logits = aux(torch.cat([z, permute_dims(z)]))
        labels = torch.cat([
            torch.zeros(len(z), dtype=torch.long, device=z.device),
            torch.ones(len(z), dtype=torch.long, device=z.device),
        ])
        loss = F.cross_entropy(logits, labels)  # mean over both halves = ½(CE_0 + CE_1)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"disc_loss": loss.detach(), "disc_acc": acc}

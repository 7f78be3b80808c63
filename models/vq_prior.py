"""Autoregressive prior over a trained VQ-VAE's code grid (``vq_prior``), the VQ-VAE's second stage.

The model owns the frozen parent VQ-VAE as ``self.parent`` (built from ``cfg.ar.parent_config``,
the parent's ``{"name": "vqvae", **config}``). The pipeline fills ``parent_config`` from
``model.ar.parent_uri`` and loads the parent's weights with ``model.parent.load_state_dict``;
the parent's parameters have ``requires_grad=False`` and it stays in eval mode whatever
``train()`` is called with, so its codebook statistics never move.

p(codes) = Π_t p(c_t | c_<t) in raster order, by either

* ``arch="pixelcnn"``: gated PixelCNN (van den Oord et al. 2016): a vertical stack (rows above)
  and a horizontal stack (pixels to the left in the row), gated tanh·sigmoid units, a first
  layer of mask type A (excludes the current position) then type B layers, no blind spot; or
* ``arch="transformer"``: a pre-norm causal transformer over the flattened grid with learned
  positions; the input is shifted right by one (a start token), so position t sees c_<t only.

``forward(x)`` returns the cross-entropy in nats per code as ``loss``/``recon`` and the code grid's
log-likelihood as ``elbo`` (= −loss·h·w per image).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config_access import check_positive_ints, resolve_family_config, to_plain
from models.registry import build_model, register_model


class MaskedConv2d(nn.Conv2d):
    """Conv2d whose kernel is multiplied by a fixed 0/1 mask (masked weights get zero gradient)."""

    def __init__(self, *args: Any, mask: torch.Tensor, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", mask.expand_as(self.weight).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the mask stays fp32 when an engine casts only parameters to bf16
        return self._conv_forward(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


def _gate(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedPixelCNNLayer(nn.Module):
    """One gated layer: (v, h) -> (v', h').

    The vertical conv has a (k//2+1)×k kernel padded so output row r sees input rows r−k//2..r;
    the horizontal conv a 1×(k//2+1) kernel so column c sees columns c−k//2..c. Mask type A
    removes row r (vertical) and column c (horizontal): after the first layer the vertical stack
    only carries rows above, which is why type B may keep them. The vertical stack feeds the
    horizontal one through a 1×1 conv; only the horizontal stack has a residual (type B).
    """

    def __init__(self, channels: int, kernel: int, mask_type: str) -> None:
        super().__init__()
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        self.residual = mask_type == "B"
        half = kernel // 2
        v_mask = torch.ones(half + 1, kernel)
        h_mask = torch.ones(1, half + 1)
        if mask_type == "A":
            v_mask[-1].zero_()
            h_mask[:, -1].zero_()
        self.vertical = MaskedConv2d(channels, 2 * channels, (half + 1, kernel), padding=(half, half), mask=v_mask)
        self.horizontal = MaskedConv2d(channels, 2 * channels, (1, half + 1), padding=(0, half), mask=h_mask)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.h_out = nn.Conv2d(channels, channels, 1)

    def forward(self, v: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = v.shape[-2:]
        v_pre = self.vertical(v)[:, :, :height, :]
        h_pre = self.horizontal(h)[:, :, :, :width]
        h_new = self.h_out(_gate(self.v_to_h(v_pre) + h_pre))
        if self.residual:
            h_new = h_new + h
        return _gate(v_pre), h_new


class GatedPixelCNN(nn.Module):
    """Codes [B, h, w] -> logits [B, K, h, w]; a 7×7 type-A layer, then 3×3 type-B layers."""

    def __init__(self, num_codes: int, channels: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_codes, channels)
        self.blocks = nn.ModuleList(
            GatedPixelCNNLayer(channels, 7 if i == 0 else 3, "A" if i == 0 else "B") for i in range(layers)
        )
        self.head = nn.Sequential(
            nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, num_codes, 1)
        )

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        v = h = self.embed(codes).permute(0, 3, 1, 2)
        for block in self.blocks:
            v, h = block(v, h)
        return self.head(h)


class CausalSelfAttentionBlock(nn.Module):
    """Pre-norm transformer block with causal scaled-dot-product attention: x [B, T, C] -> same."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (u.view(b, t, self.heads, c // self.heads).transpose(1, 2) for u in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class CausalTransformer(nn.Module):
    """Codes [B, h, w] -> logits [B, K, h, w] over the raster-flattened grid.

    Inputs are shifted right by a start token (id K), so the output at t conditions on c_<t.
    """

    def __init__(self, num_codes: int, grid: int, width: int, layers: int, heads: int) -> None:
        super().__init__()
        self.num_codes = num_codes
        self.embed = nn.Embedding(num_codes + 1, width)
        self.pos = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.blocks = nn.ModuleList(CausalSelfAttentionBlock(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_codes)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        b, hh, ww = codes.shape
        flat = codes.reshape(b, hh * ww)
        start = torch.full((b, 1), self.num_codes, dtype=flat.dtype, device=flat.device)
        x = self.embed(torch.cat([start, flat[:, :-1]], dim=1)) + self.pos[: hh * ww]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x)).transpose(1, 2).reshape(b, self.num_codes, hh, ww)


BASE_DEFAULTS: dict[str, Any] = {
    "ar": {"arch": "pixelcnn", "hidden": 128, "layers": 6, "heads": 4, "parent_uri": None, "parent_config": None},
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    "debug": {"ar": {"hidden": 16, "layers": 3, "heads": 2}},
}


@register_model("vq_prior")
class VQPrior(nn.Module):
    """Autoregressive code prior with its frozen parent VQ-VAE; see the module docstring."""

    latent_kind = "codes"  # the parent's code grid (see VQVAE.latent_kind)

    def __init__(self, ar: dict[str, Any] | None = None) -> None:
        super().__init__()
        ar = {**BASE_DEFAULTS["ar"], **(to_plain(ar) or {})}
        parent_config = ar.get("parent_config")
        if not parent_config:
            raise ValueError(
                "model.ar.parent_config missing: train vq_prior with model.ar.parent_uri=<registered vqvae>"
            )
        if ar["arch"] not in ("pixelcnn", "transformer"):
            raise ValueError(f"model.ar.arch must be 'pixelcnn' or 'transformer', got {ar['arch']!r}")
        check_positive_ints("vq_prior", **{"ar.hidden": ar["hidden"], "ar.layers": ar["layers"], "ar.heads": ar["heads"]})
        if ar["arch"] == "transformer" and ar["hidden"] % ar["heads"]:
            raise ValueError(f"model.ar.hidden={ar['hidden']} must be divisible by model.ar.heads={ar['heads']}")
        parent_config = {"name": "vqvae", **to_plain(parent_config)}
        self.parent = build_model(parent_config)
        for attr in ("encode_codes", "decode_codes", "codebook_size", "grid"):
            if not hasattr(self.parent, attr):
                raise ValueError(
                    f"model.ar.parent_config names {parent_config['name']!r}, which has no {attr!r}; "
                    "the parent must be a VQ-VAE (name: vqvae)"
                )
        self.parent.requires_grad_(False)
        self.parent.eval()
        self.config = {"ar": {
            "arch": ar["arch"], "hidden": int(ar["hidden"]), "layers": int(ar["layers"]),
            "heads": int(ar["heads"]), "parent_uri": ar.get("parent_uri"), "parent_config": parent_config,
        }}
        self.num_codes, self.grid = int(self.parent.codebook_size), int(self.parent.grid)
        if ar["arch"] == "pixelcnn":
            self.net = GatedPixelCNN(self.num_codes, int(ar["hidden"]), int(ar["layers"]))
        else:
            self.net = CausalTransformer(self.num_codes, self.grid, int(ar["hidden"]), int(ar["layers"]), int(ar["heads"]))

    @classmethod
    def objective_of(cls, config: dict[str, Any]) -> str:
        """``-forward()["elbo"]`` is the negative log-likelihood of the parent's codes (nats per
        image), not a bound on the pixels' likelihood."""
        return "code_nll"

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs: base defaults < flavor preset < fields the config sets."""
        return resolve_family_config(cfg, BASE_DEFAULTS, FLAVORS, "vq_prior")

    @classmethod
    def from_config(cls, cfg: Any) -> "VQPrior":
        """Build from a duck-typed model config; needs ``ar.parent_config`` (see the module docstring)."""
        return cls(**cls.resolve_config(cfg))

    def train(self, mode: bool = True) -> "VQPrior":
        """Train/eval the prior; the parent always stays in eval mode (frozen codebook, BN stats)."""
        super().train(mode)
        self.parent.eval()
        return self

    def checkpoint_blocks(self) -> list[nn.ModuleList]:
        """The gated PixelCNN layers or the transformer blocks (the frozen parent is never recomputed)."""
        return [self.net.blocks]

    def prior_logits(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits [B, K, h, w] of p(c_t | c_<t) for every position of a code grid [B, h, w]."""
        return self.net(codes.long())

    def code_nll(self, codes: torch.Tensor) -> torch.Tensor:
        """−log p(codes) per image, [B], in nats."""
        nll = F.cross_entropy(self.prior_logits(codes).float(), codes.long(), reduction="none")
        return nll.flatten(1).sum(1)

    def sample_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """A draw of the parent's one-hot posterior: x's own codes [B, h, w]."""
        return self.parent.encode_codes(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The parent's code grid [B, h, w] (no gradient)."""
        return self.parent.encode_codes(x)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from codes [B, h, w] through the parent's decoder."""
        return self.parent.decode_codes(codes)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The parent's reconstruction (the prior does not change it)."""
        return self.parent.reconstruct(x)

    @torch.no_grad()
    def sample_codes(self, n: int, device: torch.device | str | None = None, temperature: float = 1.0) -> torch.Tensor:
        """Ancestral sampling in raster order: h·w passes of the network, [n, h, w]."""
        if device is None:
            device = next(self.net.parameters()).device
        codes = torch.zeros(n, self.grid, self.grid, dtype=torch.long, device=device)
        for r in range(self.grid):
            for c in range(self.grid):
                logits = self.prior_logits(codes)[:, :, r, c].float() / temperature
                codes[:, r, c] = torch.multinomial(torch.softmax(logits, dim=1), 1).squeeze(1)
        return codes

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n images in [0, 1]: codes from the prior, decoded by the parent."""
        return self.parent.decode_codes(self.sample_codes(n, device))

    def forward(
        self,
        x: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        free_bits: float = 0.0,
        target_kl: float = 0.0,
        aux: Any = None,
    ) -> dict[str, Any]:
        """Cross-entropy of the parent's codes of x under the prior; the KL arguments do not apply."""
        with torch.no_grad():
            codes = self.parent.encode_codes(x)
            x_hat = self.parent.decode_codes(codes)
        logits = self.prior_logits(codes)
        loss = F.cross_entropy(logits.float(), codes)
        zero = loss.new_zeros(())
        return {
            "loss": loss,
            "recon": loss,
            "kl": zero,
            "kl_per_dim": loss.new_zeros(0),
            "elbo": -loss * codes[0].numel(),
            "x_hat": x_hat,
            "codes": codes,
            "metrics": {"bits_per_code": loss.detach() / math.log(2.0)},
        }

    @torch.no_grad()
    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parent's terms with log p(z) from this prior instead of the uniform one (z = codes [B, h, w])."""
        terms = dict(self.parent.log_likelihood_terms(x, z))
        terms["log_pz"] = -self.code_nll(z)
        return terms

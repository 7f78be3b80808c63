"""Very deep hierarchical VAE (``vdvae``): Child 2021 "Very Deep VAEs", with NVAE's stabilisers.

Inference (bottom-up): a 3x3 input conv, then a stack of residual bottleneck blocks described by
``model.vdvae.enc_blocks``; the last activation at every resolution r is kept as a_r.

Generation (top-down): a state tensor starts as a learned bias at the lowest decoder
resolution. ``model.vdvae.dec_blocks`` lists the top-down blocks; each has its own latent group
z_i of shape [latent_channels, r_i, r_i] and does, on the incoming state s:

    (μ_p, σ_p, Δ) = prior(s)          p(z_i | z_<i) = N(μ_p, σ_p)
    (μ_q, σ_q)    = posterior([s, a_r])  q(z_i | z_<i, x) = N(μ_q, σ_q)
    s <- resnet(s + Δ + z_proj(z_i))

The state is upsampled (nearest) where the resolution grows; a 1x1 conv feeds the final state to
the likelihood (``logistic_mixture`` for images, ``bernoulli`` for binarised data). Each KL is
analytic between the two diagonal Gaussians at the sampled parents.

Stabilisers that make dozens of stochastic layers train (VDVAE §4, NVAE §3.2):

* every scale is ``min_std + softplus(raw)`` (bounded below and growing linearly, where
  exp(log σ) lets one bad step blow a KL up); the raw input is shifted so a raw 0 means σ ≈ 1;
* the prior's output conv is zero-initialised, so every group starts at N(0, ~1) and Δ = 0;
* the residual output convs and z_proj are scaled by 1/sqrt(#top-down blocks) at init, so the
  state's variance does not grow with depth;
* optional per-group free bits (``group_free_bits``) against posterior collapse of whole groups.

Latents travel through the pipeline as one flat vector [B, latent_dim], the groups' elements
concatenated in decoder order (``split_groups`` / ``flatten_groups`` convert).

Layout strings (VDVAE's syntax):

* ``enc_blocks``: ``RxN`` = N residual blocks at resolution R; ``RdK`` = one residual block at
  R followed by average pooling by K. E.g. ``"32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2"``.
* ``dec_blocks``: ``RxN`` = N top-down blocks at R; ``RmS`` = one top-down block at R whose
  incoming state is first upsampled from resolution S (VDVAE's "mixin"). Every token is a block
  with a latent group, as in VDVAE. E.g. ``"1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2"``.
* Empty strings derive a layout from ``resolution``: every power of two from ``resolution``
  down to 4, then 1, with ``blocks_per_resolution`` blocks at each.
* ``widths`` (VDVAE's custom_width_str) overrides ``width`` per resolution, ``"256:64,128:128"``;
  where the width changes between resolutions a 1x1 conv projects the tensor (VDVAE pads or
  slices channels instead).
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config_access import check_positive_ints, resolve_family_config, to_plain
from models.kl import diag_gaussian_log_prob, free_bits_kl, gaussian_kl
from models.likelihoods import at_least_float32, build_likelihood
from models.registry import register_model

_SOFTPLUS_ONE = math.log(math.e - 1.0)  # softplus(_SOFTPLUS_ONE) == 1
_ACTIVE_GROUP_NATS = 0.01  # a group whose batch-mean KL exceeds this counts as active

# ----------------------------------------------------------------------------- layout strings

_TOKEN = re.compile(r"^(\d+)([xdm])(\d+)$")


def _tokens(spec: str, key: str, kinds: str) -> list[tuple[int, str, int]]:
    """Split ``"32x2,32d2"`` into [(32, "x", 2), (32, "d", 2)]; bad tokens raise naming the key."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"model.vdvae.{key} must be a non-empty layout string, got {spec!r}")
    out = []
    for token in spec.replace(" ", "").split(","):
        match = _TOKEN.match(token)
        if not match or match.group(2) not in kinds:
            forms = " or ".join(f"R{k}N" for k in kinds)
            raise ValueError(f"model.vdvae.{key}: cannot parse token {token!r} of {spec!r} (expected {forms})")
        res, kind, num = int(match.group(1)), match.group(2), int(match.group(3))
        if res < 1 or num < 1:
            raise ValueError(f"model.vdvae.{key}: token {token!r} of {spec!r} needs positive numbers")
        out.append((res, kind, num))
    return out


def parse_enc_blocks(spec: str, resolution: int) -> list[tuple[int, int | None]]:
    """[(resolution, down_rate or None)], one entry per residual block of the encoder.

    The string must start at ``resolution`` and every token must sit at the resolution the
    previous tokens left (``32d2`` is followed by 16), so a typo cannot silently skip a scale.
    """
    layout: list[tuple[int, int | None]] = []
    current = resolution
    for res, kind, num in _tokens(spec, "enc_blocks", "xd"):
        if res != current:
            raise ValueError(
                f"model.vdvae.enc_blocks: token {res}{kind}{num} of {spec!r} is at resolution {res}, "
                f"but the encoder is at {current} there (model.resolution={resolution})"
            )
        if kind == "x":
            layout += [(res, None)] * num
        else:
            if res % num:
                raise ValueError(f"model.vdvae.enc_blocks: {res}d{num} of {spec!r} does not divide {res}")
            layout.append((res, num))
            current = res // num
    return layout


def parse_dec_blocks(spec: str, resolution: int) -> list[tuple[int, int | None]]:
    """[(resolution, mixin_from or None)], one entry per top-down block (one latent group each).

    The first token must be ``RxN`` (the state starts at R), each ``RmS`` must grow from the
    current resolution S by an integer factor, and the last block must be at ``resolution``.
    """
    layout: list[tuple[int, int | None]] = []
    current = None
    for res, kind, num in _tokens(spec, "dec_blocks", "xm"):
        if kind == "x" and current not in (None, res):
            raise ValueError(
                f"model.vdvae.dec_blocks: {res}x{num} of {spec!r} is at resolution {res} but the "
                f"state is at {current}; grow it with {res}m{current} first"
            )
        if kind == "m":
            if current is None or num != current or res <= num or res % num:
                raise ValueError(
                    f"model.vdvae.dec_blocks: {res}m{num} of {spec!r} must upsample from the current "
                    f"resolution ({current}) to an integer multiple of it"
                )
            layout.append((res, num))
        else:
            layout += [(res, None)] * num
        current = res
    if current != resolution:
        raise ValueError(
            f"model.vdvae.dec_blocks: {spec!r} ends at resolution {current}, "
            f"but model.resolution is {resolution}"
        )
    return layout


def derived_layout(resolution: int, per_res: int) -> tuple[str, str]:
    """(enc_blocks, dec_blocks) strings for every power of two from ``resolution`` to 4, then 1."""
    if not (isinstance(resolution, numbers.Integral) and resolution >= 4 and resolution & (resolution - 1) == 0):
        raise ValueError(
            f"model.vdvae.enc_blocks/dec_blocks are empty, so the layout is derived from "
            f"model.resolution, which must then be a power of two >= 4, got {resolution!r}"
        )
    scales = [resolution >> i for i in range(int(math.log2(resolution)) - 1)] + [1]  # ..., 8, 4, 1
    enc = []
    for res, nxt in pairwise(scales):
        enc += [f"{res}x{per_res}", f"{res}d{res // nxt}"]
    enc.append(f"1x{per_res}")
    dec = [f"1x{per_res}"]
    for prev, res in pairwise(scales[::-1]):
        dec.append(f"{res}m{prev}")
        if per_res > 1:
            dec.append(f"{res}x{per_res - 1}")
    return ",".join(enc), ",".join(dec)


def parse_widths(spec: str) -> dict[int, int]:
    """``"256:64,128:128"`` -> {256: 64, 128: 128}; "" -> {}."""
    if spec is None or not str(spec).strip():
        return {}
    widths = {}
    for token in str(spec).replace(" ", "").split(","):
        parts = token.split(":")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"model.vdvae.widths: cannot parse {token!r} of {spec!r} (expected 'resolution:width,...')"
            )
        widths[int(parts[0])] = int(parts[1])
    return widths


# ----------------------------------------------------------------------------- building blocks


def _scale(raw: torch.Tensor, min_std: float) -> torch.Tensor:
    """σ = min_std + softplus(raw + c), c = softplus⁻¹(1): a zero raw output means σ ≈ 1."""
    return min_std + F.softplus(raw + _SOFTPLUS_ONE)


def _logvar(std: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.log(std)


class Block(nn.Module):
    """VDVAE's bottleneck block: GELU-1x1-GELU-3x3-GELU-3x3-GELU-1x1 (+ x if residual), then
    average pooling by ``down_rate``.

    The 3x3 convs become 1x1 where ``use_3x3`` is False (resolutions <= 2, where a 3x3 kernel
    would mostly see zero padding). The output conv is zero-initialised (``zero_last``: the
    block starts as the identity / as emitting zeros) or scaled by ``last_scale``.
    """

    def __init__(
        self, in_w: int, mid_w: int, out_w: int, residual: bool, down_rate: int | None = None,
        zero_last: bool = False, last_scale: float = 1.0, use_3x3: bool = True,
    ) -> None:
        super().__init__()
        if residual and in_w != out_w:
            raise ValueError(f"a residual Block needs in_w == out_w, got {in_w} and {out_w}")
        k = 3 if use_3x3 else 1
        self.residual, self.down_rate = residual, down_rate
        self.c1 = nn.Conv2d(in_w, mid_w, 1)
        self.c2 = nn.Conv2d(mid_w, mid_w, k, padding=k // 2)
        self.c3 = nn.Conv2d(mid_w, mid_w, k, padding=k // 2)
        self.c4 = nn.Conv2d(mid_w, out_w, 1)
        with torch.no_grad():
            if zero_last:
                self.c4.weight.zero_()
                self.c4.bias.zero_()
            elif last_scale != 1.0:
                self.c4.weight.mul_(last_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c1(F.gelu(x))
        h = self.c2(F.gelu(h))
        h = self.c3(F.gelu(h))
        h = self.c4(F.gelu(h))
        out = x + h if self.residual else h
        return F.avg_pool2d(out, self.down_rate) if self.down_rate else out


class TopDownBlock(nn.Module):
    """One stochastic layer at resolution ``res`` with a latent group [latent_channels, res, res].

    A deterministic function of (state, activation, noise, z), so activation checkpointing can
    recompute it: the caller draws the noise. ``mixin`` (the incoming state's resolution, or
    None) makes the block first upsample the state (nearest), after a 1x1 projection if the
    width changes.
    """

    def __init__(
        self, res: int, width: int, mid: int, latent_channels: int, min_std: float, num_blocks: int,
        mixin: int | None = None, mixin_width: int | None = None,
    ) -> None:
        super().__init__()
        self.res, self.mixin, self.width = res, mixin, width
        self.latent_channels, self.min_std = latent_channels, min_std
        zc, use_3x3, scale = latent_channels, res > 2, 1.0 / math.sqrt(num_blocks)
        needs_proj = mixin is not None and mixin_width != width
        self.mixin_proj = nn.Conv2d(mixin_width, width, 1) if needs_proj else None
        self.prior = Block(width, mid, 2 * zc + width, residual=False, zero_last=True, use_3x3=use_3x3)
        self.posterior = Block(2 * width, mid, 2 * zc, residual=False, use_3x3=use_3x3)
        self.z_proj = nn.Conv2d(zc, width, 1)
        with torch.no_grad():
            self.z_proj.weight.mul_(scale)
        self.resnet = Block(width, mid, width, residual=True, last_scale=scale, use_3x3=use_3x3)

    def enter(self, state: torch.Tensor) -> torch.Tensor:
        """The incoming state brought to this block's resolution and width."""
        if self.mixin is None:
            return state
        if self.mixin_proj is not None:
            state = self.mixin_proj(state)  # a 1x1 conv commutes with nearest upsampling: do it small
        return F.interpolate(state, scale_factor=self.res // self.mixin, mode="nearest")

    def forward(
        self,
        state: torch.Tensor,
        act: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        z: torch.Tensor | None = None,
    ):
        """(new state, z, μ_q, σ_q, μ_p, σ_p); μ_q and σ_q are None without an activation.

        z is the given ``z`` if any, else μ + σ·noise of the posterior (with ``act``) or of the
        prior (without), or the mean when ``noise`` is None (the deterministic path).
        """
        state = self.enter(state)
        zc = self.latent_channels
        p_mu, p_raw, delta = self.prior(state).split([zc, zc, self.width], dim=1)
        p_std = _scale(p_raw, self.min_std)
        q_mu = q_std = None
        if act is not None:
            q_mu, q_raw = self.posterior(torch.cat([state, act], dim=1)).chunk(2, dim=1)
            q_std = _scale(q_raw, self.min_std)
        if z is None:
            mu, std = (p_mu, p_std) if act is None else (q_mu, q_std)
            z = mu if noise is None else mu + std * noise
        state = self.resnet(state + delta + self.z_proj(z))
        return state, z, q_mu, q_std, p_mu, p_std


# ----------------------------------------------------------------------------- configuration

# Base defaults are celeba64-sized (width 128, 16 latent channels) on a derived layout, so an
# unflavored config works at any power-of-two resolution.
BASE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "resolution": 64,
    "likelihood": "logistic_mixture",
    "obs_std": 0.1,
    "logistic_components": 10,
    "beta": 1.0,
    "bits": 8,
    "vdvae": {
        "width": 128,
        "widths": "",
        "bottleneck": 0.25,
        "latent_channels": 16,
        "enc_blocks": "",
        "dec_blocks": "",
        "blocks_per_resolution": 2,
        "min_std": 1e-3,
        "group_free_bits": 0.0,
    },
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    # Tiny, derived layout: any power-of-two resolution 8..256, a 32 px step well under a second.
    "debug": {
        "logistic_components": 2,
        "vdvae": {"width": 32, "latent_channels": 4, "blocks_per_resolution": 1},
    },
    # Binarised 32 px digits: 15 latent groups, 0.39 M parameters. Depth sits at 4-8 px where it
    # is cheap (VDVAE's habit): 87 M MACs per image, 30% less than 3 blocks at every resolution.
    # For another resolution set enc_blocks="" dec_blocks="" (the derived layout).
    "mnist": {
        "in_channels": 1, "resolution": 32, "likelihood": "bernoulli",
        "vdvae": {
            "width": 64, "latent_channels": 8, "blocks_per_resolution": 3,
            "enc_blocks": "32x1,32d2,16x2,16d2,8x3,8d2,4x3,4d4,1x2",
            "dec_blocks": "1x2,4m1,4x3,8m4,8x3,16m8,16x2,32m16,32x1",
        },
    },
    # 64 px faces: most depth at 8-32 px as in VDVAE's ImageNet-64 layout; 26 latent groups,
    # 2.9 M parameters.
    "celeba64": {
        "in_channels": 3, "resolution": 64, "likelihood": "logistic_mixture",
        "vdvae": {
            "width": 128, "latent_channels": 16,
            "enc_blocks": "64x3,64d2,32x5,32d2,16x5,16d2,8x4,8d2,4x4,4d4,1x2",
            "dec_blocks": "1x2,4m1,4x3,8m4,8x4,16m8,16x5,32m16,32x5,64m32,64x2",
        },
    },
    # VDVAE's FFHQ-256 layout at ~3/4 of its depth, width 448, narrow at 256/128/64 px:
    # 43.5 M parameters, 49 latent groups. Scaling to VDVAE's size is config only:
    #   model.vdvae.width=512 model.vdvae.latent_channels=16 model.vdvae.widths=""
    #   model.vdvae.enc_blocks="256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4"
    #   model.vdvae.dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128"
    # gives 112 M here (VDVAE reports ~115 M; it also learns a bias tensor at every resolution);
    # with widths="256:64,128:128,64:128" instead it is 74 M. The 64 px pooling token must be
    # 64d2: "64d4" lands at 16 px while the next token is 32x17, which the layout check rejects.
    "celebahq256": {
        "in_channels": 3, "resolution": 256, "likelihood": "logistic_mixture",
        "vdvae": {
            "width": 448, "latent_channels": 16, "widths": "256:64,128:64,64:128",
            "enc_blocks": "256x2,256d2,128x4,128d2,64x8,64d2,32x10,32d2,16x6,16d2,8x4,8d2,4x4,4d4,1x3",
            "dec_blocks": "1x2,4m1,4x3,8m4,8x4,16m8,16x7,32m16,32x14,64m32,64x8,128m64,128x4,256m128",
        },
    },
}


def _check_group(group: dict[str, Any]) -> dict[str, Any]:
    """The ``vdvae`` group with types checked; errors name ``model.vdvae.<key>`` and the value."""
    check_positive_ints(
        "vdvae", **{f"vdvae.{k}": group[k] for k in ("width", "latent_channels", "blocks_per_resolution")}
    )
    for key, low in (("bottleneck", 0.0), ("min_std", 0.0)):
        value = group[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > low:
            raise ValueError(f"model.vdvae.{key} must be a number > {low}, got {value!r}")
    gfb = group["group_free_bits"]
    if isinstance(gfb, bool) or not isinstance(gfb, numbers.Real) or not gfb >= 0:
        raise ValueError(f"model.vdvae.group_free_bits must be a number >= 0, got {gfb!r}")
    for key in ("widths", "enc_blocks", "dec_blocks"):
        if not isinstance(group[key], str):  # a config error, ValueError like every other one
            raise ValueError(  # noqa: TRY004
                f"model.vdvae.{key} must be a string, got {group[key]!r}"
            )
    return {
        "width": int(group["width"]), "widths": group["widths"], "bottleneck": float(group["bottleneck"]),
        "latent_channels": int(group["latent_channels"]), "enc_blocks": group["enc_blocks"],
        "dec_blocks": group["dec_blocks"], "blocks_per_resolution": int(group["blocks_per_resolution"]),
        "min_std": float(group["min_std"]), "group_free_bits": float(gfb),
    }


def _layouts(group: dict[str, Any], resolution: int) -> tuple[list, list]:
    """Parsed (encoder, decoder) layouts, derived where a string is empty, cross-checked."""
    enc_spec, dec_spec = group["enc_blocks"], group["dec_blocks"]
    if not enc_spec.strip() or not dec_spec.strip():
        enc_default, dec_default = derived_layout(resolution, group["blocks_per_resolution"])
        enc_spec = enc_spec if enc_spec.strip() else enc_default
        dec_spec = dec_spec if dec_spec.strip() else dec_default
    enc, dec = parse_enc_blocks(enc_spec, resolution), parse_dec_blocks(dec_spec, resolution)
    enc_res = {resolution} | {res // (down or 1) for res, down in enc} | {res for res, _ in enc}
    missing = sorted({res for res, _ in dec} - enc_res)
    if missing:
        raise ValueError(
            f"model.vdvae.dec_blocks: {dec_spec!r} has blocks at resolutions {missing} where the "
            f"encoder ({enc_spec!r}) has no activation for the posterior"
        )
    last = enc[-1][0] // (enc[-1][1] or 1)
    if last not in {res for res, _ in dec}:
        # Blocks after the last activation the decoder reads would get no gradient (DDP error).
        raise ValueError(
            f"model.vdvae.enc_blocks: {enc_spec!r} ends at resolution {last}, which no block of "
            f"model.vdvae.dec_blocks ({dec_spec!r}) reads"
        )
    return enc, dec


# ----------------------------------------------------------------------------- the model


@register_model("vdvae")
class VDVAE(nn.Module):
    """Very deep VAE; see the module docstring. One latent group per top-down block."""

    default_ema_rate = 0.9999  # the pipeline keeps VDVAE's weight EMA unless train.ema_rate says otherwise
    samples_at_temperature = True  # sample(n, temperature=...): the pyfunc's temperature param
    # Spatial Gaussian groups, each conditioned on the ones above: encode's flat vector has one
    # element per position and channel of every group, and kl_per_dim one entry per channel of
    # each group, so evaluation counts and traverses no per-element units (sample_posterior draws).
    latent_kind = "groups"

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 64,
        likelihood: str = "logistic_mixture",
        obs_std: float = 0.1,
        logistic_components: int = 10,
        beta: float = 1.0,
        bits: int = 8,
        vdvae: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        group = _check_group({**BASE_DEFAULTS["vdvae"], **(to_plain(vdvae) or {})})
        check_positive_ints("vdvae", in_channels=in_channels, resolution=resolution)
        if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not beta >= 0:
            raise ValueError(f"model.beta must be >= 0, got {beta!r}")
        self.likelihood = build_likelihood(likelihood, obs_std, int(logistic_components), bits=bits)
        self.config = {
            "in_channels": int(in_channels), "resolution": int(resolution), "likelihood": likelihood,
            "obs_std": float(obs_std), "logistic_components": int(logistic_components),
            "beta": float(beta), "bits": int(bits), "vdvae": group,
        }
        self.in_channels, self.resolution, self.beta = int(in_channels), int(resolution), float(beta)
        self.min_std, self.group_free_bits = group["min_std"], group["group_free_bits"]
        self.latent_channels = group["latent_channels"]
        self._width_overrides = parse_widths(group["widths"])
        self._default_width, self._bottleneck = group["width"], group["bottleneck"]
        self.enc_layout, self.dec_layout = _layouts(group, self.resolution)
        self._build_encoder()
        self._build_decoder(int(getattr(self.likelihood, "params_per_channel", 1)))
        self.group_shapes = [(self.latent_channels, res, res) for res, _ in self.dec_layout]
        self.group_sizes = [c * h * w for c, h, w in self.group_shapes]
        self.latent_dim = sum(self.group_sizes)

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs: base defaults < flavor preset < fields the config sets. The group and
        its layout strings are checked here too, so the pipeline's config validation refuses a bad
        layout before any worker starts."""
        resolved = resolve_family_config(cfg, BASE_DEFAULTS, FLAVORS, "vdvae")
        _layouts(_check_group(resolved["vdvae"]), resolved["resolution"])
        return resolved

    @classmethod
    def from_config(cls, cfg: Any) -> VDVAE:
        """Build from a duck-typed model config (dataclass / OmegaConf / namespace / dict)."""
        return cls(**cls.resolve_config(cfg))

    # -- construction -----------------------------------------------------------------------

    def width_at(self, res: int) -> int:
        """Channel width of the residual stream at resolution ``res`` (``widths`` override)."""
        return self._width_overrides.get(res, self._default_width)

    def _mid(self, res: int) -> int:
        return max(1, int(self.width_at(res) * self._bottleneck))

    def _build_encoder(self) -> None:
        """Input conv, then one Block per layout entry; a 1x1 projection follows a pooling block
        where the width changes, so every entry maps a tensor to a tensor (checkpointable)."""
        self.in_conv = nn.Conv2d(self.in_channels, self.width_at(self.resolution), 3, padding=1)
        scale = 1.0 / math.sqrt(len(self.enc_layout))
        blocks: list[nn.Module] = []
        for res, down in self.enc_layout:
            w = self.width_at(res)
            blocks.append(Block(w, self._mid(res), w, residual=True, down_rate=down,
                                last_scale=scale, use_3x3=res > 2))
            if down and self.width_at(res // down) != w:
                blocks.append(nn.Conv2d(w, self.width_at(res // down), 1))
        self.enc_blocks = nn.ModuleList(blocks)

    def _build_decoder(self, params_per_channel: int) -> None:
        """The learned start state, one TopDownBlock per layout entry, the 1x1 output conv."""
        first = self.dec_layout[0][0]
        self.state_bias = nn.Parameter(torch.zeros(1, self.width_at(first), first, first))
        n = len(self.dec_layout)
        self.dec_blocks = nn.ModuleList(
            TopDownBlock(res, self.width_at(res), self._mid(res), self.latent_channels, self.min_std, n,
                         mixin=mixin, mixin_width=self.width_at(mixin) if mixin else None)
            for res, mixin in self.dec_layout
        )
        self.out_conv = nn.Conv2d(self.width_at(self.resolution), self.in_channels * params_per_channel, 1)

    def checkpoint_blocks(self) -> list[nn.ModuleList]:
        """Encoder blocks and top-down blocks: deterministic given their tensor inputs."""
        return [self.enc_blocks, self.dec_blocks]

    @property
    def num_groups(self) -> int:
        return len(self.dec_layout)

    # -- latent layout ------------------------------------------------------------------------

    def split_groups(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Flat [B, latent_dim] -> per-group tensors [B, latent_channels, r_i, r_i]."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"vdvae expects z of shape [B, {self.latent_dim}], got {list(z.shape)}")
        return [part.reshape(z.shape[0], *shape)
                for part, shape in zip(z.split(self.group_sizes, dim=1), self.group_shapes)]

    def flatten_groups(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-group tensors -> flat [B, latent_dim] (the inverse of ``split_groups``)."""
        if len(groups) != self.num_groups:
            raise ValueError(f"vdvae expects {self.num_groups} latent groups, got {len(groups)}")
        for i, (g, shape) in enumerate(zip(groups, self.group_shapes)):
            if tuple(g.shape[1:]) != shape:
                raise ValueError(f"vdvae latent group {i} must be [B, {', '.join(map(str, shape))}], "
                                 f"got {list(g.shape)}")
        return torch.cat([g.flatten(start_dim=1) for g in groups], dim=1)

    def _as_groups(self, z: torch.Tensor | Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if torch.is_tensor(z):
            return self.split_groups(z)
        groups = list(z)
        self.flatten_groups(groups)  # validates count and shapes
        return groups

    # -- paths ------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"vdvae expects input of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(model.in_channels, model.resolution), got {list(x.shape)}"
            )

    def _activations(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Bottom-up pass: resolution -> the last encoder activation at that resolution."""
        self._check_input(x)
        h = self.in_conv(x.to(self.in_conv.weight.dtype))
        acts = {h.shape[-1]: h}
        for block in self.enc_blocks:
            h = block(h)
            acts[h.shape[-1]] = h
        return acts

    def _temperatures(self, temperature: float | Sequence[float]) -> list[float]:
        if isinstance(temperature, numbers.Real):
            temps = [float(temperature)] * self.num_groups
        else:
            temps = [float(t) for t in temperature]
            if len(temps) != self.num_groups:
                raise ValueError(
                    f"temperature needs one value per latent group ({self.num_groups}), got {len(temps)}"
                )
        if any(not t >= 0 for t in temps):
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        return temps

    def _noise(self, n: int, temps: Sequence[float] | None = None) -> list[torch.Tensor | None]:
        """Standard-normal noise per group, scaled by its temperature (None where it is 0).

        Drawn here, outside the top-down blocks, so a checkpointed block recomputes exactly.
        """
        temps = [1.0] * self.num_groups if temps is None else temps
        ref = self.state_bias
        return [
            None if t == 0 else torch.randn(n, *shape, device=ref.device, dtype=ref.dtype) * t
            for shape, t in zip(self.group_shapes, temps)
        ]

    def _top_down(
        self,
        n: int,
        acts: dict[int, torch.Tensor] | None = None,
        noise: Sequence[torch.Tensor | None] | None = None,
        z_given: Sequence[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor | None]]]:
        """Run the top-down blocks. With ``acts`` each group's z comes from q, without from p;
        ``z_given`` overrides z; ``noise`` None means the means. Returns (final state, groups)."""
        state = self.state_bias.expand(n, -1, -1, -1)
        groups = []
        for i, block in enumerate(self.dec_blocks):
            act = None if acts is None else acts[block.res]
            eps = None if noise is None else noise[i]
            zi = None if z_given is None else z_given[i].to(state.dtype)
            state, z, q_mu, q_std, p_mu, p_std = block(state, act, eps, zi)
            groups.append({"z": z, "mu_q": q_mu, "std_q": q_std, "mu_p": p_mu, "std_p": p_std})
        return state, groups

    def decode_params(self, state: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters [B, C·params_per_channel, R, R] in at least float32."""
        return at_least_float32(self.out_conv(state))

    def _mean_image(self, state: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean image in [0, 1], in the model's dtype (as every family returns it)."""
        return self.likelihood.mean(self.decode_params(state)).to(state.dtype)

    # -- protocol ---------------------------------------------------------------------------

    def encode_groups(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Posterior means per group, each conditioned on the parents' posterior means."""
        _, groups = self._top_down(x.shape[0], self._activations(x))
        return [g["mu_q"] for g in groups]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each flat [B, latent_dim], along the deterministic path (parents at
        their posterior means)."""
        _, groups = self._top_down(x.shape[0], self._activations(x))
        mu = torch.cat([g["mu_q"].flatten(start_dim=1) for g in groups], dim=1)
        logvar = torch.cat([_logvar(g["std_q"]).flatten(start_dim=1) for g in groups], dim=1)
        return mu, logvar

    def decode(self, z: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Mean image in [0, 1] for flat latents [B, latent_dim] or a list of group tensors."""
        groups = self._as_groups(z)
        state, _ = self._top_down(groups[0].shape[0], z_given=groups)
        return self._mean_image(state)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean image at the posterior means (= decode(encode(x)[0]), in one pass)."""
        state, _ = self._top_down(x.shape[0], self._activations(x))
        return self._mean_image(state)

    @torch.no_grad()
    def sample_prior_latents(
        self, n: int, device: torch.device | str | None = None, temperature: float | Sequence[float] = 1.0
    ) -> torch.Tensor:
        """Flat z ~ p(z) by ancestral sampling; ``temperature`` (one number or one per group)
        scales each prior σ, 0 gives the prior means (deterministic)."""
        _, groups = self._top_down(n, noise=self._noise(n, self._temperatures(temperature)))
        z = torch.cat([g["z"].flatten(start_dim=1) for g in groups], dim=1)
        return z if device is None else z.to(device)

    @torch.no_grad()
    def sample(
        self, n: int, device: torch.device | str | None = None, temperature: float | Sequence[float] = 1.0
    ) -> torch.Tensor:
        """n mean images in [0, 1] from ancestral sampling at ``temperature`` (no gradient)."""
        state, _ = self._top_down(n, noise=self._noise(n, self._temperatures(temperature)))
        images = self._mean_image(state)
        return images if device is None else images.to(device)

    @torch.no_grad()
    def sample_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """One draw z ~ q(z|x), flat [B, latent_dim]."""
        _, groups = self._top_down(x.shape[0], self._activations(x), noise=self._noise(x.shape[0]))
        return torch.cat([g["z"].flatten(start_dim=1) for g in groups], dim=1)

    def _group_kls(self, groups: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Per-element KL[q || p] of every group, float32 (float64 stays), [B, zc, r, r] each."""
        f = at_least_float32
        return [
            gaussian_kl(f(g["mu_q"]), _logvar(f(g["std_q"])), f(g["mu_p"]), _logvar(f(g["std_p"])))
            for g in groups
        ]

    def _kl_term(self, kl_per_dim: torch.Tensor, free_bits: float, target_kl: float) -> torch.Tensor:
        """The KL part of the loss: per-dim free bits within each group, then per-group free bits
        (``group_free_bits``), then the ``target_kl`` floor on the total."""
        per_group = torch.stack([free_bits_kl(k, free_bits) for k in kl_per_dim.split(self.latent_channels)])
        if self.group_free_bits > 0:
            per_group = torch.clamp(per_group, min=self.group_free_bits)
        term = per_group.sum()
        return torch.clamp(term, min=float(target_kl)) if target_kl > 0 else term

    def forward(
        self,
        x: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        free_bits: float = 0.0,
        target_kl: float = 0.0,
        aux: Any = None,
    ) -> dict[str, Any]:
        """One stochastic ELBO evaluation; ``aux`` is unused.

        ``kl_per_dim`` has one entry per latent *channel* of each group (length
        num_groups·latent_channels, decoder order): that channel's KL summed over the group's
        r_i² positions, batch-averaged. It sums to ``kl``, and ``free_bits`` applies to these
        entries (a per-position floor would grant 256² free nats per channel at 256 px).
        loss = mean recon + β·max(target_kl, Σ_groups max(group_free_bits, Σ_ch max(free_bits, KL_ch))).
        """
        n = x.shape[0]
        state, groups = self._top_down(n, self._activations(x), noise=self._noise(n))
        params = self.decode_params(state)
        recon = self.likelihood.nll(params, at_least_float32(x))
        kl_channels = torch.cat([k.sum(dim=(2, 3)) for k in self._group_kls(groups)], dim=1)  # [B, G·zc]
        kl_per_dim = kl_channels.mean(dim=0)
        kl = kl_channels.sum(dim=1)
        beta_eff = self.beta if beta is None else beta
        loss = recon.mean() + beta_eff * self._kl_term(kl_per_dim, free_bits, target_kl)
        group_kl = kl_per_dim.detach().view(self.num_groups, self.latent_channels).sum(dim=1)
        metrics = {f"kl_group/{i:02d}": k for i, k in enumerate(group_kl)}
        metrics["active_groups"] = (group_kl > _ACTIVE_GROUP_NATS).sum().to(group_kl.dtype)
        return {
            "loss": loss,
            "recon": recon.mean(),
            "kl": kl.mean(),
            "kl_per_dim": kl_per_dim,
            "elbo": -(recon + kl).mean(),
            "x_hat": self.likelihood.mean(params),
            "z": torch.cat([g["z"].flatten(start_dim=1) for g in groups], dim=1),
            "metrics": metrics,
        }

    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """For flat z [B, latent_dim]: log p(x|z), log p(z) = Σ_i log p(z_i|z_<i) and
        log q(z|x) = Σ_i log q(z_i|z_<i, x), each [B] in nats with all constants."""
        given = self.split_groups(z)
        state, groups = self._top_down(x.shape[0], self._activations(x), z_given=given)
        f = at_least_float32

        def log_density(g: dict[str, Any], which: str) -> torch.Tensor:
            mu, std = f(g[f"mu_{which}"]).flatten(start_dim=1), f(g[f"std_{which}"]).flatten(start_dim=1)
            return diag_gaussian_log_prob(f(g["z"]).flatten(start_dim=1), mu, _logvar(std))

        return {
            "log_px_z": self.likelihood.log_prob(self.decode_params(state), f(x)),
            "log_pz": sum(log_density(g, "p") for g in groups),
            "log_qz_x": sum(log_density(g, "q") for g in groups),
        }

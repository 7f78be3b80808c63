"""Pictures of a VAE's latent space: traversals, interpolations, image grids, the per-dim KL plot.

Everything returns plain tensors / numpy arrays / matplotlib Figures; logging them (MLflow,
rank 0 only) is the caller's business. Figures are built with ``matplotlib.figure.Figure``
directly (Agg canvas, no pyplot global state), so this is safe in headless Ray workers.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch

__all__ = ["latent_traversals", "interpolate", "interpolate_latents", "slerp", "make_grid", "kl_bar_plot", "save_png"]


def _single(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0) if x.dim() == 3 else x[:1]


def _device_of(model: Any) -> Optional[torch.device]:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return None


def _posterior_mean(model: Any, x: torch.Tensor) -> torch.Tensor:
    device = _device_of(model)
    mu, _ = model.encode(x if device is None else x.to(device))
    return mu


def _eval_no_grad(fn):
    """Run ``fn(model, ...)`` in eval mode without gradient, restoring the model's mode."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        try:
            with torch.no_grad():
                return fn(model, *args, **kwargs)
        finally:
            if was_training:
                model.train(True)
    return wrapper


@_eval_no_grad
def latent_traversals(model: Any, x0: torch.Tensor, dims: Optional[Sequence[int]] = None, steps: int = 7,
                      span: float = 3.0, prior_std: Any = None) -> torch.Tensor:
    """Decoded traversals [len(dims), steps, C, H, W] around the posterior mean of ``x0``.

    Row r moves latent ``dims[r]`` alone through ``steps`` evenly spaced values from
    mu − span·σ to mu + span·σ (σ = the prior std of that unit: ``prior_std`` if given (scalar
    or [D]), else ``model.prior_std`` if the model has one, else 1 for N(0, I)); every other
    latent stays at the posterior mean. ``dims=None`` traverses all dims. ``make_grid`` turns
    the result into one picture (rows = dims, columns = values).
    """
    if steps < 2:
        raise ValueError(f"latent_traversals needs steps >= 2, got {steps}")
    mu = _posterior_mean(model, _single(x0))[0]
    d = mu.shape[0]
    dims = list(range(d)) if dims is None else [int(i) for i in dims]
    bad = [i for i in dims if not 0 <= i < d]
    if bad:
        raise ValueError(f"latent dims {bad} out of range for a {d}-dim latent")
    std = prior_std if prior_std is not None else getattr(model, "prior_std", 1.0)
    std = torch.as_tensor(std, dtype=mu.dtype, device=mu.device).expand(d)
    offsets = torch.linspace(-span, span, steps, dtype=mu.dtype, device=mu.device)
    z = mu.repeat(len(dims), steps, 1)  # [R, S, D]
    for r, i in enumerate(dims):
        z[r, :, i] = mu[i] + offsets * std[i]
    images = model.decode(z.reshape(len(dims) * steps, d))
    return images.reshape(len(dims), steps, *images.shape[1:]).float().cpu()


def slerp(z_a: torch.Tensor, z_b: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, Ω = angle(a, b), over the last dim.

    Falls back to linear interpolation when a and b are (anti)parallel within 1e-7 (sin Ω ≈ 0).
    ``t`` may be a scalar or a tensor broadcasting against z[..., :1].
    """
    t = torch.as_tensor(t, dtype=z_a.dtype, device=z_a.device)
    cos = (z_a * z_b).sum(-1, keepdim=True) / (z_a.norm(dim=-1, keepdim=True) * z_b.norm(dim=-1, keepdim=True)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    linear = (1 - t) * z_a + t * z_b
    safe = torch.where(sin.abs() < 1e-7, torch.ones_like(sin), sin)
    spherical = (torch.sin((1 - t) * omega) * z_a + torch.sin(t * omega) * z_b) / safe
    return torch.where(sin.abs() < 1e-7, linear, spherical)


def interpolate_latents(z_a: torch.Tensor, z_b: torch.Tensor, steps: int = 8,
                        mode: Literal["linear", "slerp"] = "linear") -> torch.Tensor:
    """``steps`` latents [steps, D] from z_a to z_b inclusive (t = 0 … 1)."""
    if steps < 2:
        raise ValueError(f"interpolation needs steps >= 2, got {steps}")
    if mode not in ("linear", "slerp"):
        raise ValueError(f"mode must be 'linear' or 'slerp', got {mode!r}")
    z_a, z_b = z_a.reshape(1, -1), z_b.reshape(1, -1)
    t = torch.linspace(0, 1, steps, dtype=z_a.dtype, device=z_a.device)[:, None]
    if mode == "linear":
        return (1 - t) * z_a + t * z_b
    return slerp(z_a, z_b, t)


@_eval_no_grad
def interpolate(model: Any, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8,
                mode: Literal["linear", "slerp"] = "linear") -> torch.Tensor:
    """Decoded images [steps, C, H, W] between the posterior means of x_a and x_b.

    ``slerp`` keeps intermediate codes at a typical radius of a Gaussian prior (a straight
    line through the origin region passes where N(0, I) in high dimension has no mass).
    """
    z_a = _posterior_mean(model, _single(x_a))[0]
    z_b = _posterior_mean(model, _single(x_b))[0]
    return model.decode(interpolate_latents(z_a, z_b, steps, mode)).float().cpu()


def make_grid(images: Any, nrow: Optional[int] = None, padding: int = 1, pad_value: float = 1.0) -> np.ndarray:
    """Tile images in [0, 1] into one uint8 picture [H', W', C] (C = 3), or [H', W'] for 1 channel.

    ``images`` is [N, C, H, W] (``nrow`` images per row, default ceil(sqrt(N))) or
    [R, S, C, H, W] as returned by :func:`latent_traversals` (R rows of S images).
    """
    x = images.detach().float().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, np.float32)
    if x.ndim == 5:
        nrow = x.shape[1]
        x = x.reshape(-1, *x.shape[2:])
    if x.ndim != 4:
        raise ValueError(f"make_grid expects [N, C, H, W] or [R, S, C, H, W], got shape {x.shape}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = np.full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, np.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    out = (np.clip(grid, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(1, 2, 0)
    return out[..., 0] if c == 1 else out


def kl_bar_plot(kl_per_dim: Any, threshold: float = 0.01, title: Optional[str] = None):
    """Bar chart of the data-averaged KL per latent dim (nats); inactive dims (≤ threshold) in grey."""
    from matplotlib.figure import Figure

    values = torch.as_tensor(kl_per_dim).detach().double().cpu().reshape(-1).numpy()
    active = values > threshold
    fig = Figure(figsize=(max(4.0, min(16.0, 0.15 * len(values) + 2)), 3.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(np.arange(len(values)), values, color=np.where(active, "tab:blue", "tab:gray"))
    ax.axhline(threshold, color="tab:red", linewidth=0.8, linestyle="--")
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("KL (nats)")
    ax.set_title(title or f"KL per dimension: {int(active.sum())}/{len(values)} active (> {threshold:g} nats)")
    fig.tight_layout()
    return fig


def save_png(array: Any, path: str | os.PathLike) -> Path:
    """Write an image to ``path`` (parents created): uint8 [H, W] / [H, W, C], or floats in [0, 1]
    ([H, W, C] numpy, or a [C, H, W] tensor)."""
    from PIL import Image

    if isinstance(array, torch.Tensor):
        a = array.detach().cpu()
        a = a.permute(1, 2, 0) if a.dim() == 3 and a.shape[0] in (1, 3, 4) else a
        array = a.numpy()
    a = np.asarray(array)
    if a.dtype != np.uint8:
        a = (np.clip(a.astype(np.float64), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3):
        raise ValueError(f"save_png expects [H, W] or [H, W, C], got shape {a.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, format="PNG")
    return path

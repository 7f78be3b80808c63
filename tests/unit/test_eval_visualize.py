"""Latent traversals, interpolation (linear / slerp), image grids, the KL plot and PNG output."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.evaluate.visualize import (
    interpolate,
    interpolate_latents,
    kl_bar_plot,
    latent_traversals,
    make_grid,
    save_png,
    slerp,
)

D = 5


class RecordingVAE(torch.nn.Module):
    """encode: mu = first D pixels; decode records its z and paints sigmoid(z·w) into 1×4×6 images."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(D, 24))
        self.decoded = []

    def encode(self, x):
        mu = x.flatten(1)[:, :D] * 4 - 2
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        self.decoded.append(z.clone())
        return torch.sigmoid(z @ self.w).reshape(-1, 1, 4, 6)


def test_traversal_row_i_varies_only_latent_i():
    torch.manual_seed(0)
    model = RecordingVAE().train()
    x0 = torch.rand(1, 24)
    mu = model.encode(x0)[0][0]
    grid = latent_traversals(model, x0, dims=[3, 0, 2], steps=7, span=3.0)
    assert grid.shape == (3, 7, 1, 4, 6) and model.training
    z = model.decoded[-1].reshape(3, 7, D)
    for row, dim in enumerate([3, 0, 2]):
        others = [j for j in range(D) if j != dim]
        torch.testing.assert_close(z[row][:, others], mu[others].expand(7, -1))
        torch.testing.assert_close(z[row][:, dim], mu[dim] + torch.linspace(-3, 3, 7))
    torch.testing.assert_close(grid[1, 2], model.decode(z[1, 2:3])[0])


def test_traversal_uses_prior_std_and_defaults_to_all_dims():
    model = RecordingVAE()
    model.prior_std = 0.5
    x0 = torch.rand(1, 4, 6)  # an unbatched [C, H, W] image works too
    grid = latent_traversals(model, x0, steps=3, span=2.0)
    assert grid.shape == (D, 3, 1, 4, 6)
    z = model.decoded[-1].reshape(D, 3, D)
    mu = model.encode(x0[None])[0][0]
    torch.testing.assert_close(z[4][:, 4], mu[4] + torch.tensor([-1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="out of range"):
        latent_traversals(model, x0, dims=[D])


def test_slerp_endpoints_norms_and_angles():
    torch.manual_seed(1)
    a = torch.randn(16, dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    b = b / b.norm() * a.norm()  # same radius
    path = interpolate_latents(a, b, steps=9, mode="slerp")
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b)
    torch.testing.assert_close(path.norm(dim=1), a.norm().expand(9))  # stays on the sphere
    omega = torch.arccos(torch.dot(a, b) / a.norm() ** 2)
    angles = torch.arccos(((path @ a) / (path.norm(dim=1) * a.norm())).clamp(-1.0, 1.0))  # cos may round past 1
    torch.testing.assert_close(angles, torch.linspace(0, 1, 9, dtype=torch.float64) * omega, atol=1e-6, rtol=0)
    # unequal norms: the textbook formula
    c = 3 * torch.randn(16, dtype=torch.float64)
    t = 0.3
    om = torch.arccos(torch.dot(a, c) / (a.norm() * c.norm()))
    expected = (torch.sin((1 - t) * om) * a + torch.sin(t * om) * c) / torch.sin(om)
    torch.testing.assert_close(slerp(a, c, t), expected)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: falls back to lerp
    lin = interpolate_latents(a, c, steps=3, mode="linear")
    torch.testing.assert_close(lin[1], (a + c) / 2)
    with pytest.raises(ValueError, match="mode"):
        interpolate_latents(a, c, mode="cubic")


def test_interpolate_decodes_between_posterior_means():
    model = RecordingVAE()
    xa, xb = torch.rand(1, 24), torch.rand(1, 24)
    images = interpolate(model, xa, xb, steps=8, mode="slerp")
    assert images.shape == (8, 1, 4, 6)
    z = model.decoded[-1]
    torch.testing.assert_close(z[0], model.encode(xa)[0][0])
    torch.testing.assert_close(z[-1], model.encode(xb)[0][0])


def test_make_grid_layout():
    imgs = torch.zeros(5, 3, 2, 3)
    imgs[4] = 1.0
    grid = make_grid(imgs, nrow=2, padding=1)
    assert grid.dtype == np.uint8 and grid.shape == (3 * 3 + 1, 2 * 4 + 1, 3)
    assert (grid[7:9, 1:4] == 255).all() and (grid[1:3, 1:4] == 0).all()  # image 4 at row 2, col 0
    assert (grid[7:9, 5:8] == 255).all()  # the empty slot keeps the pad value
    rows = make_grid(torch.rand(2, 4, 1, 5, 5))  # traversal tensor: 2 rows × 4 columns, grayscale
    assert rows.shape == (2 * 6 + 1, 4 * 6 + 1)
    assert make_grid(torch.rand(9, 3, 4, 4)).shape == (3 * 5 + 1, 3 * 5 + 1, 3)


def test_kl_bar_plot_and_save_png(tmp_path):
    kl = torch.tensor([0.0, 0.5, 2.0, 0.001])
    fig = kl_bar_plot(kl)
    ax = fig.axes[0]
    assert len(ax.patches) == 4 and "2/4 active" in ax.get_title()
    np.testing.assert_allclose([p.get_height() for p in ax.patches], kl.numpy(), rtol=1e-6)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    grid = make_grid(torch.rand(4, 3, 8, 8))
    path = save_png(grid, tmp_path / "sub" / "grid.png")
    np.testing.assert_array_equal(np.asarray(Image.open(path)), grid)
    chw = torch.rand(3, 5, 7)
    back = np.asarray(Image.open(save_png(chw, tmp_path / "chw.png")))
    assert back.shape == (5, 7, 3)
    np.testing.assert_array_equal(back, (chw.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

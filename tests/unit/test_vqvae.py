"""VQ-VAE: protocol, nearest codes, straight-through, EMA math, dead-code restarts, frozen codebook."""

from types import SimpleNamespace

import math
import pytest
import torch
from omegaconf import OmegaConf

import models
from models.vqvae import VQVAE, VectorQuantizer
from pipeline.config import ModelConfig, VQConfig

try:
    from tests.model_helpers import rectangles
except ImportError:
    from model_helpers import rectangles


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(**vq) -> VQVAE:
    return models.build_model({"name": "vqvae", "flavor": "debug", "resolution": 32, "in_channels": 1, "vq": vq})


def grid_of(flat: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    return flat.view(b, h, w, -1).permute(0, 3, 1, 2).contiguous()


def test_forward_keys_shapes_and_metrics():
    model = build()
    assert (model.codebook_size, model.code_dim, model.grid) == (16, 8, 8)  # debug flavor, 32/4
    out = model(rectangles(4))
    assert {"loss", "recon", "kl", "kl_per_dim", "elbo", "x_hat", "metrics"} <= set(out)
    # KL(one-hot q || uniform p) over the 8x8 code grid: 64 log 16 nats, the same for every image
    assert out["kl"].dim() == 0 and out["kl"].item() == pytest.approx(64 * math.log(16)) and out["kl_per_dim"].numel() == 0
    torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"]))
    assert out["x_hat"].shape == (4, 1, 32, 32) and out["codes"].shape == (4, 8, 8)
    assert set(out["metrics"]) == {"commitment", "codebook_perplexity", "codebook_usage", "dead_codes_restarted"}
    m = out["metrics"]
    assert torch.allclose(out["loss"], out["recon"] + 0.25 * m["commitment"])
    assert 1.0 <= m["codebook_perplexity"] <= 16.0 + 1e-4
    used = out["codes"].unique().numel()
    assert math.isclose(m["codebook_usage"].item(), used / 16)


def test_nearest_code_assignment_equals_brute_force():
    q = VectorQuantizer(codebook_size=37, code_dim=5)
    q.codebook.normal_()
    flat = torch.randn(300, 5) * 2
    brute = ((flat[:, None, :] - q.codebook[None, :, :]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(q.nearest_codes(flat), brute)


def test_straight_through_passes_the_decoder_gradient_unchanged():
    model = build().eval()
    z_e = (torch.randn(2, 8, 8, 8)).requires_grad_(True)
    out = model.quantizer(z_e)
    z_q = out["z_q"]
    z_q.retain_grad()
    assert torch.allclose(z_q, model.quantizer.lookup(out["codes"]), atol=1e-6)  # value = code vector
    model.decode_logits(z_q).pow(2).sum().backward()
    assert z_q.grad.abs().sum() > 0
    assert torch.equal(z_e.grad, z_q.grad)


def test_ema_codebook_gets_no_gradient_and_everything_else_does():
    model = build(update="ema")
    names = dict(model.named_parameters())
    assert "quantizer.codebook" not in names and "quantizer.codebook" in dict(model.named_buffers())
    model(rectangles(4))["loss"].backward()
    for name, p in names.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_codebook_is_trained_by_gradient():
    model = build(update="grad", dead_code_threshold=0.0)
    out = model(rectangles(4))
    assert torch.allclose(out["loss"], out["recon"] + 0.25 * out["metrics"]["commitment"]
                          + out["metrics"]["codebook_loss"])
    out["loss"].backward()
    grad = model.quantizer.codebook.grad
    assert grad is not None
    used = out["codes"].unique()
    assert grad[used].abs().sum() > 0
    unused = torch.ones(16, dtype=torch.bool)
    unused[used] = False
    assert torch.all(grad[unused] == 0)


def test_ema_update_follows_the_formula_for_one_step():
    decay, eps = 0.9, 1e-5
    q = VectorQuantizer(codebook_size=3, code_dim=2, update="ema", ema_decay=decay, ema_epsilon=eps,
                        dead_code_threshold=0.0)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    q.ema_embed_sum.copy_(q.codebook)
    flat = torch.tensor([[1.0, 1.0], [2.0, 0.0], [9.0, 1.0], [0.0, 12.0], [1.0, 11.0], [-1.0, 9.0]])
    z_e = grid_of(flat, 1, 2, 3)
    q.train()(z_e)
    counts = torch.tensor([2.0, 1.0, 3.0])
    sums = torch.stack([flat[:2].sum(0), flat[2], flat[3:].sum(0)])
    size = decay * 1.0 + (1 - decay) * counts
    embed_sum = decay * torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]) + (1 - decay) * sums
    n = size.sum()
    expected = embed_sum / ((size + eps) / (n + 3 * eps) * n)[:, None]
    assert torch.allclose(q.ema_cluster_size, size)
    assert torch.allclose(q.codebook, expected, atol=1e-6)
    # Code 0 moved toward the mean (1.5, 0.5) of its assigned outputs.
    assert q.codebook[0].sub(torch.tensor([1.5, 0.5])).norm() < torch.tensor([1.5, 0.5]).norm()
    # Eval mode never touches the statistics.
    before = q.codebook.clone()
    q.eval()(z_e)
    assert torch.equal(q.codebook, before)


def test_stat_reducer_makes_the_update_global():
    """A reducer that sums over two identical 'ranks' equals one rank seeing the batch twice."""
    flat = torch.randn(40, 4)
    a = VectorQuantizer(8, 4, ema_decay=0.5, dead_code_threshold=0.0)
    b = VectorQuantizer(8, 4, ema_decay=0.5, dead_code_threshold=0.0)
    b.load_state_dict(a.state_dict())
    b.stat_reducer = lambda t: 2 * t
    a.train()(grid_of(torch.cat([flat, flat]), 1, 8, 10))
    b.train()(grid_of(flat, 1, 4, 10))
    assert torch.allclose(a.codebook, b.codebook, atol=1e-6)
    assert torch.allclose(a.ema_cluster_size, b.ema_cluster_size)


def test_dead_codes_are_restarted_from_batch_outputs():
    q = VectorQuantizer(codebook_size=4, code_dim=3, ema_decay=0.99, dead_code_threshold=1.0)
    q.codebook.copy_(torch.tensor([[0.0, 0, 0], [0.1, 0, 0], [100.0, 100, 100], [-100.0, -100, -100]]))
    q.ema_embed_sum.copy_(q.codebook)
    flat = torch.randn(16, 3) * 0.1
    out = q.train()(grid_of(flat, 1, 4, 4))
    dead = torch.tensor([False, False, True, True])
    assert out["restarted"].item() >= 2  # codes 2 and 3 were never chosen
    for k in torch.nonzero(dead).flatten():
        assert torch.isclose(q.codebook[k][None], flat, atol=1e-6).all(dim=1).any(), k
    assert torch.all(q.ema_cluster_size[dead] == 1.0)
    # Eval mode restarts nothing.
    q.codebook[3] = torch.tensor([-100.0, -100, -100])
    q.ema_cluster_size[3] = 0.0
    assert q.eval()(grid_of(flat, 1, 4, 4))["restarted"].item() == 0
    assert q.codebook[3, 0] == -100.0


def test_model_reports_dead_code_restarts_metric():
    model = build(dead_code_threshold=1.0)
    out = model(rectangles(4))  # random init: most codes unused in the first batch
    assert out["metrics"]["dead_codes_restarted"] > 0
    assert model(rectangles(4))["metrics"]["codebook_usage"] > out["metrics"]["codebook_usage"]


@pytest.mark.parametrize("update", ["ema", "grad"])
def test_overfits_one_batch(update):
    model = build(update=update)
    x = rectangles(8)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(120):
        loss = model(x)["loss"]
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = model.eval()(x)["loss"].item()
    assert final < 0.5 * first, (first, final)


def test_codes_sample_and_reconstruct():
    model = build().eval()
    x = rectangles(3)
    codes = model.encode_codes(x)
    assert codes.dtype == torch.long and codes.shape == (3, 8, 8) and 0 <= codes.min() and codes.max() < 16
    recon = model.decode_codes(codes)
    assert recon.shape == (3, 1, 32, 32)
    assert torch.equal(model.reconstruct(x), recon)
    assert torch.equal(model.decode(model.encode(x)), recon)
    assert torch.equal(model.decode(codes), recon)
    imgs = model.sample(5)
    assert imgs.shape == (5, 1, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    terms = model.log_likelihood_terms(x, codes)
    assert torch.allclose(terms["log_pz"], torch.full((3,), -64 * math.log(16)))
    assert torch.all(terms["log_qz_x"] == 0)


def test_round_trip_state_dict_and_rebuild_from_config():
    model = build(codebook_size=12, downsample=2, update="grad")
    model(rectangles(4))  # train-mode statistics change buffers too
    model.eval()
    clone = models.build_model({"name": "vqvae", **model.config})
    assert clone.config == model.config and clone.grid == 16
    clone.load_state_dict(model.state_dict())
    clone.eval()
    x = rectangles(4)
    a, b = model(x), clone(x)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["codes"], b["codes"])
    assert torch.equal(clone.quantizer.codebook, model.quantizer.codebook)
    assert torch.equal(clone.quantizer.ema_cluster_size, model.quantizer.ema_cluster_size)


def test_from_config_accepts_dataclass_omegaconf_namespace():
    dc = ModelConfig(name="vqvae", flavor="debug", resolution=32, in_channels=1, vq=VQConfig(code_dim=4))
    for cfg in (dc, OmegaConf.structured(dc),
                SimpleNamespace(name="vqvae", flavor="debug", resolution=32, in_channels=1,
                                vq={"code_dim": 4})):
        model = models.build_model(cfg)
        assert model.config["vq"]["code_dim"] == 4 and model.config["vq"]["codebook_size"] == 16
    with pytest.raises(ValueError, match="model.vq.downsample"):
        build(downsample=3)

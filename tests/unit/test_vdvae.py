"""VDVAE family: protocol, KL bookkeeping, layouts, density terms, sizes.

Models are the ``debug`` flavor at 8-32 px so the whole file runs in well under a minute on CPU.
Activation checkpointing and the bf16 cast are checked with every family in
tests/unit/test_family_contract.py.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf

import models
from models.likelihoods import build_likelihood
from models.vdvae import VDVAE, derived_layout, parse_dec_blocks, parse_enc_blocks

try:
    from tests.model_helpers import rectangles
except ImportError:
    from model_helpers import rectangles


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, single-threaded: these tiny convs gain nothing from threads, and on a loaded
    2-core machine two spinning intra-op threads made one step ~40x slower."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(resolution=32, in_channels=3, **overrides) -> VDVAE:
    cfg = {"name": "vdvae", "flavor": "debug", "resolution": resolution, "in_channels": in_channels, **overrides}
    return models.build_model(cfg)


def images(n, channels=3, resolution=32):
    """Rectangle images; below 16 px (too small for the helper) nearest-downsampled from 16 px."""
    if resolution >= 16:
        return rectangles(n, channels=channels, resolution=resolution)
    return torch.nn.functional.interpolate(rectangles(n, channels=channels, resolution=16), size=resolution)


# ----------------------------------------------------------------------------- protocol


def test_forward_keys_shapes_and_kl_bookkeeping():
    model = build()
    assert [res for res, _ in model.dec_layout] == [1, 4, 8, 16, 32]  # debug: derived, 1 per res
    groups, zc = model.num_groups, model.latent_channels
    assert model.latent_dim == zc * (1 + 16 + 64 + 256 + 1024)
    out = model(images(4))
    assert {"loss", "recon", "kl", "kl_per_dim", "elbo", "x_hat", "z", "metrics"} <= set(out)
    assert out["kl_per_dim"].shape == (groups * zc,)  # one entry per channel of each group
    assert out["x_hat"].shape == (4, 3, 32, 32) and 0 <= out["x_hat"].min() and out["x_hat"].max() <= 1
    assert out["z"].shape == (4, model.latent_dim)
    assert set(out["metrics"]) == {f"kl_group/{i:02d}" for i in range(groups)} | {"active_groups"}
    assert all(v.dim() == 0 and not v.requires_grad for v in out["metrics"].values())
    group_sum = sum(out["metrics"][f"kl_group/{i:02d}"] for i in range(groups))
    torch.testing.assert_close(group_sum, out["kl"].detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["kl_per_dim"].sum(), out["kl"], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"]))
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"], rtol=1e-6, atol=1e-3)
    assert out["recon"].dtype == torch.float32 and out["metrics"]["active_groups"].item() == groups


def test_beta_free_bits_target_kl_and_group_free_bits_enter_the_loss():
    model = build(resolution=16)
    x = images(4, resolution=16)
    dims, groups = model.num_groups * model.latent_channels, model.num_groups

    def run(m, **kw):
        torch.manual_seed(1)
        return m(x, **kw)

    base, target = run(model, beta=0.5), run(model, beta=0.5, target_kl=1e5)
    fb = run(model, free_bits=1e3)
    torch.testing.assert_close(base["loss"], base["recon"] + 0.5 * base["kl"])
    torch.testing.assert_close(target["loss"], target["recon"] + 0.5 * 1e5)
    torch.testing.assert_close(fb["loss"], fb["recon"] + 1e3 * dims)
    # Per-group free bits far above every group's KL: the KL term is groups * value.
    high = build(resolution=16, vdvae={"group_free_bits": 1e4})
    high.load_state_dict(model.state_dict())
    out = run(high)
    torch.testing.assert_close(out["loss"], out["recon"] + groups * 1e4)
    # At a floor between the groups' KLs only the groups below it are raised.
    group_kl = torch.stack([base["metrics"][f"kl_group/{i:02d}"] for i in range(groups)])
    floor = group_kl.median().item()
    mid = build(resolution=16, vdvae={"group_free_bits": floor})
    mid.load_state_dict(model.state_dict())
    out = run(mid)
    torch.testing.assert_close(out["loss"], out["recon"] + group_kl.clamp(min=floor).sum(), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="model.vdvae.group_free_bits"):
        build(vdvae={"group_free_bits": -1.0})


def test_gradients_reach_every_parameter():
    """Every gradient exists and is finite. At init only the prior blocks' inner convs get zero:
    the prior's output conv is zero-initialised (NVAE/VDVAE), so nothing flows back through it
    until one step has moved it; after one step every parameter gets a nonzero gradient."""
    model = build(resolution=16)
    x = images(4, resolution=16)
    model(x)["loss"].backward()
    zero = set()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if p.grad.abs().sum() == 0:
            zero.add(name)
    behind_zero_init = {n for n, _ in model.named_parameters() if ".prior.c" in n and ".prior.c4." not in n}
    assert zero == behind_zero_init
    torch.optim.SGD(model.parameters(), lr=1e-3).step()
    model.zero_grad()
    model(x)["loss"].backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_encode_decode_sample_shapes():
    model = build().eval()
    x = images(3)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, model.latent_dim) and torch.isfinite(logvar).all()
    groups = model.encode_groups(x)
    assert [tuple(g.shape) for g in groups] == [(3, *s) for s in model.group_shapes]
    torch.testing.assert_close(model.flatten_groups(groups), mu)
    torch.testing.assert_close(model.split_groups(mu)[2], groups[2])
    with torch.no_grad():
        from_flat, from_list = model.decode(mu), model.decode(groups)
    assert from_flat.shape == (3, 3, 32, 32) and 0 <= from_flat.min() and from_flat.max() <= 1
    torch.testing.assert_close(from_flat, from_list)
    torch.testing.assert_close(model.reconstruct(x), from_flat)
    imgs = model.sample(5)
    assert imgs.shape == (5, 3, 32, 32) and 0 <= imgs.min() and imgs.max() <= 1
    assert model.sample_posterior(x).shape == (3, model.latent_dim)
    with pytest.raises(ValueError, match="z of shape"):
        model.decode(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="latent groups"):
        model.decode(groups[:-1])
    with pytest.raises(ValueError, match=r"model.in_channels, model.resolution"):
        model(torch.zeros(2, 3, 16, 16))


def test_temperature():
    model = build(resolution=16).eval()
    assert torch.equal(model.sample(3, temperature=0.0), model.sample(3, temperature=0.0))
    z0 = model.sample_prior_latents(3, temperature=0)
    assert torch.equal(z0, model.sample_prior_latents(3, temperature=[0.0] * model.num_groups))
    assert not torch.equal(model.sample(3), model.sample(3))
    # Top group at temperature 1, the rest at 0: only the top group varies between calls.
    temps = [1.0] + [0.0] * (model.num_groups - 1)
    a, b = model.sample_prior_latents(2, temperature=temps), model.sample_prior_latents(2, temperature=temps)
    top = model.group_sizes[0]
    assert not torch.equal(a[:, :top], b[:, :top])
    with pytest.raises(ValueError, match="one value per latent group"):
        model.sample(2, temperature=[1.0, 0.5])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.sample(2, temperature=-1.0)


def test_log_likelihood_terms_match_the_analytic_kl_and_recon():
    """E_q[log q − log p] over many draws equals the analytic KL of forward (same x, same model).

    The tolerance is 5 Monte-Carlo standard errors of the mean, estimated from the draws
    themselves, plus a small float32 slack: the test fails only on a real bias.
    """
    model = build(resolution=8).eval()
    x = images(2, resolution=8).repeat(500, 1, 1, 1)  # 1000 draws
    with torch.no_grad():
        kl = model(x)["kl"]
        z = model.sample_posterior(x)
        terms = model.log_likelihood_terms(x, z)
    assert set(terms) == {"log_px_z", "log_pz", "log_qz_x"}
    assert all(t.shape == (1000,) and torch.isfinite(t).all() for t in terms.values())
    diff = terms["log_qz_x"] - terms["log_pz"]
    stderr = diff.std() / math.sqrt(diff.numel())
    assert abs(diff.mean() - kl) < 5 * stderr + 1e-3 * kl, (diff.mean(), kl, stderr)
    # log p(x|z) at forward's own z is exactly forward's reconstruction term.
    x = images(4, resolution=8)
    with torch.no_grad():
        out = model(x)
        terms = model.log_likelihood_terms(x, out["z"])
    torch.testing.assert_close(terms["log_px_z"].mean(), -out["recon"], rtol=1e-5, atol=1e-3)


def test_overfits_one_batch():
    model = build(resolution=16, in_channels=1, likelihood="bernoulli")
    x = images(8, channels=1, resolution=16)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(100):
        loss = model(x)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    final = sum(losses[-5:]) / 5
    assert final < 0.5 * losses[0], (losses[0], final)


# ----------------------------------------------------------------------------- layouts


def test_derived_layouts():
    assert derived_layout(16, 1) == ("16x1,16d2,8x1,8d2,4x1,4d4,1x1", "1x1,4m1,8m4,16m8")
    enc, dec = derived_layout(64, 2)
    assert enc == "64x2,64d2,32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2"
    assert dec == "1x2,4m1,4x1,8m4,8x1,16m8,16x1,32m16,32x1,64m32,64x1"
    model = build(resolution=64, vdvae={"blocks_per_resolution": 2})
    assert [r for r, _ in model.dec_layout] == [1, 1, 4, 4, 8, 8, 16, 16, 32, 32, 64, 64]
    assert model.config["vdvae"]["enc_blocks"] == ""  # the config keeps what was asked for
    with pytest.raises(ValueError, match="power of two >= 4"):
        build(resolution=24)


def test_explicit_layout_and_width_overrides():
    enc = "32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2"
    dec = "1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2"
    assert parse_enc_blocks(enc, 32)[:4] == [(32, None), (32, None), (32, 2), (16, None)]
    assert parse_dec_blocks(dec, 32)[:3] == [(1, None), (4, 1), (4, None)]
    model = build(vdvae={"enc_blocks": enc, "dec_blocks": dec, "widths": "32:8,16:24"})
    assert model.num_groups == 13  # every token of dec_blocks, mixins included, has a latent group
    assert model.width_at(32) == 8 and model.width_at(16) == 24 and model.width_at(8) == 32
    out = model(images(2))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("vdvae, key", [
    ({"enc_blocks": "32x2,32q2,16x1"}, "model.vdvae.enc_blocks"),
    ({"enc_blocks": "16x2,16d2,8x1"}, "model.vdvae.enc_blocks"),  # starts below model.resolution
    ({"enc_blocks": "32x1,32d2,8x1"}, "model.vdvae.enc_blocks"),  # skips 16
    ({"dec_blocks": "1x1,4m1,8m4,16m8"}, "model.vdvae.dec_blocks"),  # ends at 16, resolution is 32
    ({"dec_blocks": "1x1,4x2"}, "model.vdvae.dec_blocks"),  # 4x2 without growing the state
    ({"enc_blocks": "32x1,32d2,16x1,16d4,4x1", "dec_blocks": "4x1,8m4,16m8,32m16"}, "model.vdvae.dec_blocks"),
    ({"enc_blocks": "32x1,32d2,16x1,16d2,8x1,8d8,1x1", "dec_blocks": "8x1,16m8,32m16"}, "model.vdvae.enc_blocks"),
    ({"widths": "32-8"}, "model.vdvae.widths"),
    ({"width": 0}, "model.vdvae.width"),
    ({"min_std": 0.0}, "model.vdvae.min_std"),
])
def test_bad_layouts_and_sizes_raise_naming_the_key(vdvae, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")) as info:
        build(vdvae=vdvae)
    bad = next(iter(vdvae.values()))
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_config_and_state_dict():
    model = build(resolution=16, vdvae={"latent_channels": 3, "widths": "16:24"})
    clone = models.build_model({"name": "vdvae", **model.config})
    assert clone.config == model.config
    clone.load_state_dict(model.state_dict())
    x = images(2, resolution=16)
    torch.testing.assert_close(model.eval().reconstruct(x), clone.eval().reconstruct(x))
    dict_cfg = OmegaConf.create({"name": "vdvae", "flavor": "debug", "resolution": 16, "vdvae": {"latent_channels": 3}})
    from_omegaconf = models.build_model(dict_cfg)
    assert from_omegaconf.config["vdvae"]["latent_channels"] == 3
    assert from_omegaconf.config["vdvae"]["width"] == 32  # debug preset for a field left unset
    with pytest.raises(ValueError, match="model.flavor"):
        models.build_model({"name": "vdvae", "flavor": "huge"})


# ----------------------------------------------------------------------------- likelihood bits


def test_logistic_mixture_at_5_bits_sums_to_one_and_samples_on_the_grid():
    lik = build_likelihood("logistic_mixture", components=3, bits=5)
    assert lik.bits == 5
    params = torch.randn(1, 9, 1, 1) * 2
    probs = torch.stack([lik.log_prob(params, torch.full((1, 1, 1, 1), k / 31)) for k in range(32)]).exp()
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # Targets are rounded to the 32 levels k/31 and samples land on them.
    torch.testing.assert_close(lik.log_prob(params, torch.full((1, 1, 1, 1), 0.5 / 31 + 3 / 31 - 0.01)),
                               lik.log_prob(params, torch.full((1, 1, 1, 1), 3 / 31)))
    draws = lik.sample(params.expand(64, -1, 4, 4))
    torch.testing.assert_close(draws * 31, torch.round(draws * 31))
    for bad in (0, 9, 5.0, True):
        with pytest.raises(ValueError, match="data.bits"):
            build_likelihood("logistic_mixture", components=3, bits=bad)
    with pytest.raises(ValueError, match="data.bits"):
        build_likelihood("bernoulli", bits=12)
    eight = build_likelihood("logistic_mixture", components=3)
    x = torch.rand(2, 1, 3, 3)
    assert torch.equal(eight.log_prob(params.expand(2, -1, 3, 3), x),
                       build_likelihood("logistic_mixture", components=3, bits=8).log_prob(params.expand(2, -1, 3, 3), x))


def test_model_passes_bits_to_its_likelihood():
    model = build(resolution=8, bits=5)
    assert model.config["bits"] == 5 and model.likelihood.bits == 5
    assert torch.isfinite(model(images(2, resolution=8))["loss"])
    assert build(resolution=8, in_channels=1, likelihood="bernoulli", bits=5).config["bits"] == 5


# ----------------------------------------------------------------------------- sizes


def _num_params(flavor, **overrides):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = models.build_model({"name": "vdvae", "flavor": flavor, **overrides})
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_of_the_flavors():
    assert _num_params("debug", resolution=32) < 100_000
    assert _num_params("mnist") < 2_000_000
    assert _num_params("celebahq256") >= 30_000_000

"""Conv VAE: reference architecture, shapes, gradients, loss terms, overfitting, round trips."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import models
from models.conv_vae import ConvVAE

try:
    from tests.model_helpers import rectangles
except ImportError:
    from model_helpers import rectangles


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(**overrides) -> ConvVAE:
    cfg = {"name": "conv_vae", "flavor": "debug", "resolution": 32, "in_channels": 1, **overrides}
    return models.build_model(SimpleNamespace(**cfg))


def layers_of(module: nn.Module, kind: type) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, kind)]


def test_reference_architecture_at_32px():
    model = build(flavor="base", in_channels=1, latent_dim=20)
    convs = layers_of(model.encoder_blocks, nn.Conv2d)
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 128, (3, 3), (1, 1))
    ]
    assert all(c.bias is not None for c in convs)
    assert len(layers_of(model.encoder_blocks, nn.MaxPool2d)) == 3
    assert [(l.in_features, l.out_features) for l in layers_of(model.encoder_head, nn.Linear)] == [
        (2048, 512), (512, 40)
    ]
    assert [(l.in_features, l.out_features) for l in layers_of(model.decoder_head, nn.Linear)] == [
        (20, 512), (512, 2048)
    ]
    deconvs = layers_of(model.decoder_blocks, nn.ConvTranspose2d)
    assert [(d.in_channels, d.out_channels, d.stride) for d in deconvs] == [
        (128, 64, (2, 2)), (64, 32, (2, 2)), (32, 1, (2, 2))
    ]
    assert not layers_of(model, nn.BatchNorm2d)
    # The output layer emits likelihood parameters, so nothing may follow it.
    assert isinstance(model.decoder_blocks[-1][-1], nn.ConvTranspose2d)
    mu, logvar = model.encode(torch.rand(2, 1, 32, 32))
    assert mu.shape == logvar.shape == (2, 20)


@pytest.mark.parametrize("resolution,extra", [(64, 1), (128, 2), (256, 3)])
def test_extra_blocks_use_batchnorm_and_keep_bottleneck(resolution, extra):
    model = build(flavor="base", resolution=resolution, in_channels=3)
    assert len(model.encoder_blocks) == len(model.decoder_blocks) == 3 + extra
    assert len(layers_of(model.encoder_blocks, nn.BatchNorm2d)) == extra
    assert len(layers_of(model.decoder_blocks, nn.BatchNorm2d)) == extra
    for conv in layers_of(model, nn.Conv2d) + layers_of(model, nn.ConvTranspose2d):
        followed_by_bn = any(
            isinstance(block[1], nn.BatchNorm2d) and block[0] is conv
            for block in list(model.encoder_blocks) + list(model.decoder_blocks) if len(block) > 1
        )
        assert (conv.bias is None) == followed_by_bn
    assert layers_of(model.encoder_blocks, nn.Conv2d)[-1].out_channels == 128
    assert layers_of(model.encoder_head, nn.Linear)[0].in_features == 2048
    assert layers_of(model.encoder_blocks, nn.Conv2d)[0].in_channels == 3


@pytest.mark.parametrize("resolution", [32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_keys_and_shapes(resolution, channels):
    model = build(resolution=resolution, in_channels=channels)
    x = torch.rand(3, channels, resolution, resolution)
    out = model(x)
    assert {"loss", "recon", "kl", "kl_per_dim", "elbo", "x_hat", "mu", "logvar", "z"} <= set(out)
    for key in ("loss", "recon", "kl", "elbo"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    assert out["kl_per_dim"].shape == (8,)
    assert out["mu"].shape == out["logvar"].shape == out["z"].shape == (3, 8)
    assert out["x_hat"].shape == x.shape
    assert out["x_hat"].min() >= 0 and out["x_hat"].max() <= 1
    torch.testing.assert_close(out["kl_per_dim"].sum(), out["kl"])
    torch.testing.assert_close(out["elbo"], -(out["recon"] + out["kl"]))
    assert model.decode(out["z"]).shape == x.shape


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "mse"])
def test_every_parameter_gets_a_finite_nonzero_gradient(likelihood):
    model = build(resolution=64, in_channels=3, likelihood=likelihood)
    model(torch.rand(4, 3, 64, 64))["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_free_bits_with_large_lambda_makes_kl_term_lambda_d_beta():
    model = build()
    lam, beta = 5.0, 0.5
    out = model(torch.rand(4, 1, 32, 32), beta=beta, free_bits=lam)
    assert out["kl"] < lam * model.latent_dim  # the clamp is active on every dim
    torch.testing.assert_close(out["loss"], out["recon"] + lam * model.latent_dim * beta)


def test_free_bits_below_every_dims_kl_changes_nothing():
    model = build()
    x = torch.rand(4, 1, 32, 32)
    torch.manual_seed(3)
    plain = model(x, beta=1.0)
    torch.manual_seed(3)
    clamped = model(x, beta=1.0, free_bits=1e-6)
    assert (clamped["kl_per_dim"] > 1e-6).all()
    torch.testing.assert_close(clamped["loss"], plain["loss"], rtol=0, atol=0)
    torch.testing.assert_close(clamped["kl"], plain["kl"], rtol=0, atol=0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 2.0])
def test_beta_scales_the_kl_term(beta):
    model = build()
    out = model(torch.rand(4, 1, 32, 32), beta=beta)
    torch.testing.assert_close(out["loss"], out["recon"] + beta * out["kl"])


def test_beta_defaults_to_config_value():
    model = build(beta=4.0)
    out = model(torch.rand(4, 1, 32, 32))
    torch.testing.assert_close(out["loss"], out["recon"] + 4.0 * out["kl"])


def test_overfits_one_batch():
    x = rectangles(8)
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with torch.no_grad():
        initial = model(x)["recon"].item()
    for _ in range(200):
        loss = model(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        final = model(x)["recon"].item()
    # Bernoulli NLL starts near 1024·log 2 ≈ 710 nats; memorising 8 images must cut it >3×.
    assert initial / final > 3.0, (initial, final)


def test_sample_and_reconstruct_shapes():
    model = build(resolution=64, in_channels=3).eval()
    samples = model.sample(4)
    assert samples.shape == (4, 3, 64, 64) and not samples.requires_grad
    assert samples.min() >= 0 and samples.max() <= 1
    assert model.sample(2, device="cpu").shape == (2, 3, 64, 64)
    x = torch.rand(2, 3, 64, 64)
    mu, _ = model.encode(x)
    torch.testing.assert_close(model.reconstruct(x), model.decode(mu))


def test_log_likelihood_terms_match_forward_for_the_same_z():
    model = build(likelihood="gaussian", obs_std=0.2).eval()
    x = torch.rand(5, 1, 32, 32)
    with torch.no_grad():
        out = model(x)
        terms = model.log_likelihood_terms(x, out["z"])
        at_mu = model.log_likelihood_terms(x, out["mu"])
    assert all(t.shape == (5,) for t in terms.values())
    torch.testing.assert_close(-terms["log_px_z"].mean(), out["recon"])
    expected_px = model.likelihood.log_prob(model.decode_logits(out["mu"]), x)
    torch.testing.assert_close(at_mu["log_px_z"], expected_px)
    # At z = mu the Gaussian posterior density has its mode: -D/2·log 2π - ½Σ logvar.
    mode = -0.5 * (model.latent_dim * math.log(2 * math.pi) + out["logvar"].sum(1))
    torch.testing.assert_close(at_mu["log_qz_x"], mode)


def test_importance_weights_average_to_the_elbo():
    model = build().eval()
    with torch.no_grad():  # an informative posterior, so KL and log q(z|x) are far from trivial
        model.encoder_head[-1].weight.mul_(10.0)
        model.encoder_head[-1].bias.normal_()
    x = rectangles(2).repeat(512, 1, 1, 1)
    with torch.no_grad():
        out = model(x)
        mu, logvar = model.encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        terms = model.log_likelihood_terms(x, z)
    assert out["kl"] > 1.0
    log_w = terms["log_px_z"] + terms["log_pz"] - terms["log_qz_x"]
    log_ratio = terms["log_qz_x"] - terms["log_pz"]
    n = len(log_w)
    # forward() draws its own z, so both sides are noisy: allow ~4σ of their difference.
    elbo_tol = 6 * log_w.std().item() / math.sqrt(n) + 1e-3 * abs(out["elbo"].item())
    assert abs(log_w.mean().item() - out["elbo"].item()) < elbo_tol
    kl_tol = 5 * log_ratio.std().item() / math.sqrt(n)
    assert abs(log_ratio.mean().item() - out["kl"].item()) < kl_tol


def test_log_likelihood_terms_reject_mismatched_z():
    model = build()
    with pytest.raises(ValueError, match=r"\[3, 8\]"):
        model.log_likelihood_terms(torch.rand(3, 1, 32, 32), torch.randn(2, 8))


def test_state_dict_round_trip_gives_identical_outputs():
    model = build(resolution=64, in_channels=3)
    x = torch.rand(4, 3, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):  # move weights and BatchNorm running stats away from their init
        loss = model(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.manual_seed(123)
    clone = models.build_model({"name": "conv_vae", **model.config})
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    z = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(clone.reconstruct(x), model.reconstruct(x), rtol=0, atol=0)
        a, b = model.log_likelihood_terms(x, z), clone.log_likelihood_terms(x, z)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
        torch.manual_seed(7)
        out_a = model(x)
        torch.manual_seed(7)
        out_b = clone(x)
    torch.testing.assert_close(out_a["loss"], out_b["loss"], rtol=0, atol=0)


@pytest.mark.parametrize(
    "shape,got",
    [
        ((2, 1, 64, 64), "[2, 1, 64, 64]"),
        ((2, 3, 32, 32), "[2, 3, 32, 32]"),
        ((3, 64, 64), "[3, 64, 64]"),
    ],
)
def test_bad_input_shape_names_expected_and_got(shape, got):
    model = build(resolution=64, in_channels=3)
    with pytest.raises(ValueError) as err:
        model(torch.rand(*shape))
    assert "[B, 3, 64, 64]" in str(err.value) and got in str(err.value)


@pytest.mark.parametrize("resolution", [16, 48, 512, 100])
def test_bad_resolution_names_the_config_key(resolution):
    with pytest.raises(ValueError, match="model.resolution") as err:
        build(resolution=resolution)
    assert str(resolution) in str(err.value)


@pytest.mark.parametrize(
    "overrides,key",
    [({"likelihood": "poisson"}, "model.likelihood"), ({"latent_dim": 0}, "model.latent_dim"),
     ({"beta": -1.0}, "model.beta"), ({"likelihood": "gaussian", "obs_std": -0.1}, "model.obs_std")],
)
def test_bad_config_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build(**overrides)


def test_checkpoint_blocks_can_be_wrapped_from_outside():
    x = rectangles(4, channels=3, resolution=64)
    plain = build(resolution=64, in_channels=3)
    wrapped = build(resolution=64, in_channels=3)
    wrapped.load_state_dict(plain.state_dict())
    block_lists = wrapped.checkpoint_blocks()
    assert all(isinstance(blocks, nn.ModuleList) for blocks in block_lists)
    assert sum(len(blocks) for blocks in block_lists) == 8
    calls = []
    for blocks in block_lists:
        for block in blocks:
            inner = block.forward

            def counted(*args, _inner=inner):
                calls.append(1)
                return _inner(*args)

            block.forward = functools.partial(checkpoint, counted, use_reentrant=False)
    torch.manual_seed(1)
    out_plain = plain(x)
    out_plain["loss"].backward()
    torch.manual_seed(1)
    out_wrapped = wrapped(x)
    out_wrapped["loss"].backward()
    assert len(calls) == 16  # each block ran once forward and once more in the recompute
    torch.testing.assert_close(out_wrapped["loss"], out_plain["loss"])
    for (name, p), q in zip(plain.named_parameters(), wrapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_config_is_plain_and_num_parameters_counts_everything():
    model = build()
    assert all(isinstance(v, (int, float, str)) for v in model.config.values())
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    model.decoder_head.requires_grad_(False)
    assert model.num_parameters(trainable_only=True) < model.num_parameters()

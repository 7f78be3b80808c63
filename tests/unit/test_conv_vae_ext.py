"""Conv VAE options: likelihood-sized decoder, decoder dropout, skip connections, target KL, configs."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import models
from models import bits_per_dim
from pipeline.config import ModelConfig

try:
    from tests.model_helpers import rectangles
except ImportError:
    from model_helpers import rectangles


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def build(**overrides):
    cfg = {"name": "conv_vae", "flavor": "debug", "resolution": 32, "in_channels": 1, **overrides}
    return models.build_model(cfg)


@pytest.mark.parametrize("likelihood,per_channel", [("gaussian_learned", 2), ("logistic_mixture", 9)])
def test_decoder_emits_the_likelihoods_channels(likelihood, per_channel):
    model = build(resolution=64, in_channels=3, likelihood=likelihood, logistic_components=3)
    x = torch.randint(0, 256, (3, 3, 64, 64)).float() / 255
    out = model(x)
    assert model.decode_logits(out["z"]).shape == (3, 3 * per_channel, 64, 64)
    assert out["x_hat"].shape == x.shape and 0 <= out["x_hat"].min() and out["x_hat"].max() <= 1
    assert model.decode(out["z"]).shape == x.shape
    for key in ("loss", "recon", "kl", "elbo"):
        assert out[key].shape == () and torch.isfinite(out[key]), key
    out["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    model.eval()
    assert model.sample(2).shape == (2, 3, 64, 64)


def test_logistic_mixture_vae_overfits_one_batch_in_bits_per_dim():
    x = torch.round(rectangles(8) * 200 + 20) / 255
    model = build(likelihood="logistic_mixture", logistic_components=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    with torch.no_grad():
        start = bits_per_dim(-model(x)["recon"], x[:1]).item()
    for _ in range(60):
        loss = model(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        end = bits_per_dim(-model(x)["recon"], x[:1]).item()
    # Starts near 8 bits/dim (uniform over 256 levels); the log-scales move ~lr per step, so
    # 60 steps buy a clear drop rather than full memorisation.
    assert start > 7.0 and end < start - 1.5, (start, end)


def test_decoder_dropout_only_in_train_mode():
    model = build(decoder_dropout=0.5)
    assert model.config["decoder_dropout"] == 0.5
    assert any(isinstance(m, nn.Dropout2d) for m in model.decoder_blocks.modules())
    assert any(isinstance(m, nn.Dropout) for m in model.decoder_head)
    assert isinstance(model.decoder_blocks[-1][-1], nn.ConvTranspose2d)  # output layer untouched
    z = torch.randn(4, 8)
    with torch.no_grad():
        a, b = model.decode(z), model.decode(z)
        assert not torch.allclose(a, b)
        model.eval()
        torch.testing.assert_close(model.decode(z), model.decode(z), rtol=0, atol=0)
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in build().modules())


def test_skip_connections_are_gated_and_absent_without_x():
    model = build(resolution=64, in_channels=3, skip_connections=True)
    assert [tuple(g.shape) for g in model.skip_gates] == [(1, 32, 1, 1), (1, 16, 1, 1), (1, 8, 1, 1)]
    x = torch.rand(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        mu, _, skips = model.encode_features(x)
        assert [s.shape[-1] for s in skips] == [8, 16, 32]
        # Gates start at 0: the skip model starts as the plain VAE.
        torch.testing.assert_close(model.reconstruct(x), model.decode(mu))
        for gate in model.skip_gates:
            gate.fill_(1.0)
        assert not torch.allclose(model.reconstruct(x), model.decode(mu))
        # decode(z) / sample need no x: absent skips are zeros.
        torch.testing.assert_close(model.decode(mu), model.likelihood.mean(model.decode_logits(mu, None)))
        assert model.sample(2).shape == (2, 3, 64, 64)
        # Likelihood terms score the generative path, which cannot see x.
        terms = model.log_likelihood_terms(x, mu)
        torch.testing.assert_close(terms["log_px_z"], model.likelihood.log_prob(model.decode_logits(mu), x))


def test_skip_connections_give_every_parameter_a_gradient():
    x = rectangles(8)
    model = build(skip_connections=True)
    model(x)["loss"].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_target_kl_above_kl_makes_kl_term_constant():
    model = build()
    x, beta, target = torch.rand(4, 1, 32, 32), 0.7, 1e4
    torch.manual_seed(2)
    out = model(x, beta=beta, target_kl=target)
    assert out["kl"] < target
    torch.testing.assert_close(out["loss"], out["recon"] + beta * target)
    grads_loss = torch.autograd.grad(out["loss"], list(model.parameters()))
    torch.manual_seed(2)
    plain = model(x, beta=beta)
    grads_recon = torch.autograd.grad(plain["recon"], list(model.parameters()))
    for g_loss, g_recon in zip(grads_loss, grads_recon):
        torch.testing.assert_close(g_loss, g_recon)  # the KL part contributes no gradient


def test_target_kl_below_kl_changes_nothing_and_applies_after_free_bits():
    model = build()
    x = torch.rand(4, 1, 32, 32)
    torch.manual_seed(4)
    plain = model(x, beta=1.0)
    torch.manual_seed(4)
    low = model(x, beta=1.0, target_kl=1e-3)
    torch.testing.assert_close(low["loss"], plain["loss"], rtol=0, atol=0)
    # free bits first (8 dims · 2 nats = 16), then the target (20 > 16)
    torch.manual_seed(4)
    both = model(x, beta=1.0, free_bits=2.0, target_kl=20.0)
    torch.testing.assert_close(both["loss"], both["recon"] + 20.0)
    with pytest.raises(ValueError, match="target_kl"):
        model(x, target_kl=-1.0)


def test_full_option_round_trip_through_config():
    model = build(
        resolution=64, in_channels=3, likelihood="logistic_mixture", logistic_components=3,
        prior="made", prior_hidden=16, decoder_dropout=0.3, skip_connections=True,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 64, 64)
    for _ in range(2):
        loss = model(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
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


def test_default_config_keeps_the_reference_keys():
    assert set(build().config) == {
        "in_channels", "resolution", "latent_dim", "base_channels", "hidden_dim", "likelihood",
        "obs_std", "beta",
    }
    assert build(prior="mog").config["prior"] == "mog"


def test_from_config_accepts_pipeline_dataclass_omegaconf_namespace_and_dict():
    fields = dict(name="conv_vae", flavor="debug", resolution=32, in_channels=1,
                  likelihood="gaussian_learned", prior="mog", prior_components=3, decoder_dropout=0.2)
    sources = [
        ModelConfig(**fields),
        OmegaConf.structured(ModelConfig(**fields)),
        SimpleNamespace(**fields),
        dict(fields),
    ]
    configs = []
    for cfg in sources:
        model = models.build_model(cfg)
        direct = type(model).from_config(cfg)
        assert direct.config == model.config
        configs.append(model.config)
    assert all(c == configs[0] for c in configs)
    assert configs[0]["prior_components"] == 3 and configs[0]["latent_dim"] == 8


@pytest.mark.parametrize("overrides,key", [
    ({"decoder_dropout": 1.0}, "model.decoder_dropout"),
    ({"logistic_components": 0, "likelihood": "logistic_mixture"}, "model.logistic_components"),
    ({"prior_components": -2}, "model.prior_components"),
])
def test_bad_option_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=key):
        build(**overrides)

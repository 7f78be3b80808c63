"""The vdvae family through the pipeline's pieces, without Ray: its config section and flavors,
the family's EMA default, the pyfunc's encode/decode/sample with a temperature, and the
job files' parameter counts (the issue's presets)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config, to_dict

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_flavor_fills_the_vdvae_section_and_the_family_keeps_an_ema():
    cfg = load_config(None, ["model.name=vdvae", "model.flavor=mnist", "data.channels=1", "data.resolution=32"])
    assert cfg.model.likelihood == "bernoulli" and cfg.model.vdvae.width == 64  # the flavor's, written back
    assert cfg.train.ema_rate == 0.9999  # VDVAE's default, declared by the family
    assert load_config(None, []).train.ema_rate == 0.0  # the other families keep none
    explicit = load_config(None, ["model.name=vdvae", "model.flavor=debug", "model.vdvae.width=24", "train.ema_rate=0"])
    assert explicit.model.vdvae.width == 24 and explicit.train.ema_rate == 0.0


@pytest.mark.parametrize("override, named", [
    ("model.vdvae.enc_blocks=32x2,32d2,8x1", "model.vdvae.enc_blocks"),
    ("model.flavor=huge", "model.flavor"),
    ("train.ema_rate=1.5", "train.ema_rate"),
    ("optim.skip_threshold=-1", "optim.skip_threshold"),
    ("data.bits=9", "data.bits"),
])
def test_bad_vdvae_settings_fail_naming_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, ["model.name=vdvae", "model.flavor=debug", "data.resolution=32", override])


def test_five_bit_data_only_for_a_family_that_models_it():
    assert load_config(None, ["model.name=vdvae", "model.flavor=debug", "data.bits=5"]).model.bits == 5
    with pytest.raises(ConfigError, match="data.bits"):
        load_config(None, ["model.name=conv_vae", "data.bits=5"])


def test_pyfunc_encodes_decodes_and_samples_at_a_temperature(tmp_path):
    from models import build_model
    from pipeline.serving import VaePyfunc
    from pipeline.train.export import weights_blob

    cfg = load_config(None, ["model.name=vdvae", "model.flavor=debug", "data.resolution=16"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    path = tmp_path / "weights.pt"
    torch.save(weights_blob({"name": "vdvae", **model.config}, model.state_dict(), to_dict(cfg)), path)

    class Context:
        artifacts = {"weights": str(path)}

    served = VaePyfunc()
    served.load_context(Context())
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    codes = served.predict(None, x, {"method": "encode"})
    assert codes.shape == (2, model.latent_dim, 1, 1)
    np.testing.assert_allclose(served.predict(None, codes, {"method": "decode"}), served.predict(None, x), atol=1e-5)
    cold = [served.predict(None, x[:1], {"method": "sample", "n": 3, "seed": s, "temperature": 0.0}) for s in (1, 2)]
    np.testing.assert_array_equal(cold[0], cold[1])  # temperature 0: the prior means, whatever the seed
    warm = served.predict(None, x[:1], {"method": "sample", "n": 3, "seed": 1})
    assert warm.shape == (3, 3, 16, 16) and not np.array_equal(warm, cold[0])


def test_the_pyfunc_refuses_a_temperature_for_a_family_without_one(tmp_path):
    from models import build_model
    from pipeline.serving import VaePyfunc

    served = VaePyfunc()
    served.model = build_model(load_config(None, ["model.flavor=debug", "data.resolution=32"]).model).eval()
    with pytest.raises(ValueError, match="temperature"):
        served.predict(None, np.zeros((1, 1, 1, 1), np.float32), {"method": "sample", "n": 2, "temperature": 0.5})


def test_presets_sizes():
    """Parameter counts of the job files' models, built on the meta device (no memory)."""
    from models import build_model

    counts = {}
    for job in ("vdvae_mnist", "vdvae_celeba64", "vdvae_celebahq256"):
        cfg = load_config(JOBS / f"{job}.yaml")
        with torch.device("meta"):
            counts[job] = sum(p.numel() for p in build_model(cfg.model).parameters())
    assert counts["vdvae_celebahq256"] >= 30e6  # the floor for the 256 px preset
    assert counts["vdvae_mnist"] < counts["vdvae_celeba64"] < counts["vdvae_celebahq256"]

"""Registry behaviour and the models/ import boundary."""

import pathlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import pytest
import torch

import models
from models import registry
from models.conv_vae import ConvVAE

MODELS_DIR = pathlib.Path(models.__file__).parent


@dataclass
class ModelConfigLike:
    """Mirror of the pipeline's ModelConfig fields, to prove duck typing works with a dataclass."""

    name: str = "conv_vae"
    flavor: str = "base"
    latent_dim: Optional[int] = None  # unset: the flavor's size
    in_channels: int = 3
    resolution: int = 64
    base_channels: Optional[int] = None
    hidden_dim: Optional[int] = None
    likelihood: str = "bernoulli"
    obs_std: float = 0.1
    beta: float = 1.0


def test_conv_vae_is_registered_on_import():
    assert "conv_vae" in models.list_models()
    assert models.list_models() == sorted(models.list_models())
    assert ConvVAE.model_name == "conv_vae"


def test_build_by_name_from_dataclass_namespace_and_dict():
    from_dc = models.build_model(ModelConfigLike(flavor="debug", resolution=32))
    from_ns = models.build_model(SimpleNamespace(name="conv_vae", flavor="debug", resolution=32))
    from_dict = models.build_model({"name": "conv_vae", "flavor": "debug", "resolution": 32})
    for model in (from_dc, from_ns, from_dict):
        assert isinstance(model, ConvVAE)
        assert model.config["latent_dim"] == 8 and model.config["base_channels"] == 8
        assert model.config["hidden_dim"] == 64 and model.config["resolution"] == 32


def test_base_flavor_uses_config_values():
    model = models.build_model(ModelConfigLike(resolution=32, latent_dim=20, in_channels=1, beta=4.0))
    assert model.config == {
        "in_channels": 1, "resolution": 32, "latent_dim": 20, "base_channels": 32,
        "hidden_dim": 512, "likelihood": "bernoulli", "obs_std": 0.1, "beta": 4.0,
    }


def test_debug_flavor_yields_to_explicit_non_default_fields():
    model = models.build_model(ModelConfigLike(flavor="debug", resolution=32, latent_dim=16))
    assert model.config["latent_dim"] == 16
    assert model.config["base_channels"] == 8


def test_explicit_value_equal_to_base_default_wins_over_flavor():
    """flavor=debug latent_dim=128 used to give 8: a value equal to the base default was taken as unset."""
    model = models.build_model(ModelConfigLike(flavor="debug", resolution=32, latent_dim=128, base_channels=32))
    assert model.config["latent_dim"] == 128 and model.config["base_channels"] == 32
    assert model.config["hidden_dim"] == 64  # left unset: still the debug flavor's


def test_pipeline_config_keeps_explicit_sizes_and_saves_the_flavor_sizes():
    from pipeline.config import load_config

    explicit = load_config(None, ["model.flavor=debug", "model.latent_dim=128"])
    assert explicit.model.latent_dim == 128 and explicit.model.base_channels == 8
    assert models.build_model(explicit.model).latent_dim == 128
    ladder = load_config(None, ["model.name=ladder_vae", "model.flavor=debug", "model.ladder.hidden=256"])
    assert ladder.model.ladder.latent_dims == [8, 4, 2] and ladder.model.ladder.hidden == 256
    vq = load_config(None, ["model.name=vqvae", "model.flavor=debug", "model.vq.codebook_size=512"])
    assert (vq.model.vq.codebook_size, vq.model.vq.code_dim) == (512, 8)


def test_unknown_model_name_fails_in_config_naming_the_key():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.name='convvae'.*registered: .*conv_vae"):
        load_config(None, ["model.name=convvae"])


def test_unknown_flavor_is_rejected():
    with pytest.raises(ValueError, match="model.flavor"):
        models.build_model(ModelConfigLike(flavor="huge"))


def test_unknown_name_lists_registered_models():
    with pytest.raises(ValueError) as err:
        models.build_model(SimpleNamespace(name="nope"))
    message = str(err.value)
    assert "unknown model 'nope'" in message
    assert "registered: " in message and "conv_vae" in message


def test_duplicate_registration_raises_and_keeps_original():
    class Impostor:
        @classmethod
        def from_config(cls, cfg):
            return cls()

    with pytest.raises(ValueError, match="already registered"):
        models.register_model("conv_vae")(Impostor)
    assert registry._REGISTRY["conv_vae"] is ConvVAE


def test_register_and_build_custom_family():
    class Tiny(torch.nn.Module):
        def __init__(self, width):
            super().__init__()
            self.width = width

        @classmethod
        def from_config(cls, cfg):
            return cls(cfg.width)

    try:
        models.register_model("tiny_test_model")(Tiny)
        built = models.build_model(SimpleNamespace(name="tiny_test_model", width=3))
        assert isinstance(built, Tiny) and built.width == 3
        assert "tiny_test_model" in models.list_models()
        with pytest.raises(ValueError):
            models.register_model("tiny_test_model")(Tiny)
    finally:
        registry._REGISTRY.pop("tiny_test_model", None)


def test_class_without_from_config_is_rejected():
    with pytest.raises(TypeError, match="from_config"):
        models.register_model("no_from_config_test")(type("NoFromConfig", (), {}))
    assert "no_from_config_test" not in models.list_models()

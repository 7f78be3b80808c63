"""Config: defaults <- YAML <- overrides; bad keys/values fail naming the key; round trips."""

import pytest

from pipeline.config import ConfigError, VaepipeConfig, flatten, from_dict, known_keys, load_config, to_dict


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model:\n  latent_dim: 16\noptim:\n  lr: 0.0005\n")
    cfg = load_config(job, ["model.latent_dim=24", "dist.zero_stage=3"])
    assert cfg.model.latent_dim == 24  # override beats YAML
    assert cfg.optim.lr == 0.0005  # YAML beats default
    assert cfg.dist.zero_stage == 3
    assert cfg.train.max_steps == VaepipeConfig().train.max_steps  # default kept


def test_model_shape_is_derived_from_data():
    cfg = load_config(None, ["data.resolution=128", "data.channels=1"])
    assert (cfg.model.resolution, cfg.model.in_channels) == (128, 1)


@pytest.mark.parametrize(
    "override, named",
    [
        ("model.latnt_dim=3", "model.latnt_dim"),
        ("nosuchgroup.x=1", "nosuchgroup"),
        ("train.max_steps=abc", "train.max_steps"),
        ("train.precision=fp8", "train.precision"),
        ("dist.zero_stage=5", "dist.zero_stage"),
        ("data.resolution=48", "data.resolution"),
        ("optim.lr=-1", "optim.lr"),
        ("dist.offload_params=true", "dist.offload_params"),
        ("train.precision=fp16", "train.precision"),  # no fp16 on CPU workers
    ],
)
def test_bad_key_or_value_fails_naming_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert named in str(err.value)


def test_bad_key_in_yaml_names_file_and_key(tmp_path):
    job = tmp_path / "bad.yaml"
    job.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(job)
    assert "train.max_stepz" in str(err.value) and "bad.yaml" in str(err.value)


def test_override_without_equals_is_rejected():
    with pytest.raises(ConfigError, match="model.latent_dim"):
        load_config(None, ["model.latent_dim"])


def test_missing_file_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config("nope.yaml")


def test_dict_round_trip_is_identity():
    cfg = load_config(None, ["model.latent_dim=12", "schedule.free_bits=0.25"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
    flat = flatten(cfg)
    assert flat["model.latent_dim"] == 12 and flat["schedule.free_bits"] == 0.25
    assert set(flat) == set(known_keys())


def test_removed_skip_grad_norm_is_an_unknown_key():
    """optim.skip_grad_norm was documented but never read; it is gone rather than silently ignored
    (non-finite steps are skipped on all ranks and large norms clipped by optim.grad_clip)."""
    with pytest.raises(ConfigError, match="skip_grad_norm"):
        load_config(None, ["optim.skip_grad_norm=100"])


def test_saved_config_with_the_removed_key_still_loads():
    from pipeline.config import from_dict, to_dict

    saved = to_dict(load_config(None, []))
    saved["optim"]["skip_grad_norm"] = 1e4  # written by vaepipe before the key was removed
    assert from_dict(saved).optim.lr == saved["optim"]["lr"]


def test_decoded_cache_refuses_loader_processes_naming_both_keys():
    with pytest.raises(ConfigError, match=r"data.cache_mb.*loader_workers=0 \(is 2\)"):
        load_config(None, ["data.cache_mb=512", "data.loader_workers=2"])
    assert load_config(None, ["data.cache_mb=512", "data.loader_workers=0"]).data.cache_mb == 512

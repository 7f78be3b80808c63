"""Bad input is refused before any worker starts, with a message naming it.

| bad input                                   | where it is refused                  | test |
|---------------------------------------------|--------------------------------------|------|
| unknown key                                 | config merge (CLI exit 2)            | CONFIG_CASES |
| wrong type                                  | config merge                         | CONFIG_CASES |
| negative lr, latent_dim 0                   | config.validate                      | CONFIG_CASES |
| resolution not a power of two               | config.validate                      | CONFIG_CASES |
| model name not in the registry              | config.validate (flavor resolution)  | CONFIG_CASES |
| data path missing / without shards          | trainer.preflight (CLI exit 2)       | test_data_path_refused |
| more workers than the cluster's CPUs        | trainer.check_fits_cluster           | test_more_workers_than_cluster_cpus |
| no CPU left for the off-loop validation task | trainer.check_fits_cluster           | test_off_loop_validation_with_no_cpu_left_beside_the_workers |
| sweep trials that cannot be placed (CPU, GPU) | tune.concurrency_cap, before the parent run | test_a_sweep_whose_trials_cannot_be_placed_* |
| an alias that does not exist                | serving.check_model_uri (CLI exit 2) | test_missing_alias_named |
| --resume target that is not committed       | trainer.find_checkpoint              | test_checkpoint_commit.py::test_resume_refuses_* |
| --resume s3:// URL with nothing there       | trainer.find_checkpoint              | test_checkpoint_s3.py::test_resume_from_an_s3_run_folder_* |
| train.storage_path in a bucket that is not there | trainer.preflight               | test_checkpoint_s3.py::test_a_storage_bucket_* |
| non-finite training (K in a row)            | loop.check_divergence                | test_tune.py::test_asha_sweep_* (failed trial) |
| a shard set without a valid split           | trainer.without_missing_validation (trains, says so); a sweep on a val_ metric is refused | test_shards_without_a_valid_split_* |
"""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from conftest import base_overrides
from pipeline.cli import app

CONFIG_CASES = [
    ("model.latnt_dim=8", "model.latnt_dim"),
    ("train.max_steps=many", "train.max_steps"),
    ("optim.lr=-0.001", "optim.lr=-0.001 is invalid"),
    ("model.latent_dim=0", "model.latent_dim=0 is invalid"),
    ("data.resolution=48", "data.resolution=48 is invalid: must be a power of two"),
    ("model.name=pixelvae", "model.name='pixelvae'"),
    ("dist.zero_stage=4", "dist.zero_stage=4 is invalid"),
]


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *args])


@pytest.mark.parametrize("override, named", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_refused_naming_it(override, named):
    res = _train(override)
    assert res.exit_code == 2, res.output
    assert named in " ".join(res.output.split()), res.output


def test_data_path_refused(tmp_path, shards32):
    missing = _train(*base_overrides(str(tmp_path / "nowhere"), tmp_path))
    text = " ".join(missing.output.split())
    assert missing.exit_code == 2 and "data.path=" in text and "no manifest.json" in text
    broken = tmp_path / "broken"
    shutil.copytree(shards32, broken)
    first = json.loads((broken / "manifest.json").read_text())["splits"]["train"]["shards"][0]["name"]
    (broken / first).unlink()
    res = _train(*base_overrides(str(broken), tmp_path))
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "shards that are not there" in text and first in text


def _without_valid(shards32, tmp_path):
    folder = tmp_path / "no_valid"
    shutil.copytree(shards32, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["splits"].pop("valid")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def test_shards_without_a_valid_split_train_without_validation_and_say_so(shards32, tmp_path, capsys):
    from pipeline.config import load_config
    from pipeline.train.trainer import preflight, without_missing_validation

    cfg = load_config(None, base_overrides(_without_valid(shards32, tmp_path), tmp_path, **{"data.val_batches": 4}))
    assert without_missing_validation(cfg, preflight(cfg)).data.val_batches == 0
    said = capsys.readouterr().out
    assert "no 'valid' split" in said and "data.val_batches=0" in said and len(said.strip().splitlines()) == 1
    with_valid = load_config(None, base_overrides(shards32, tmp_path))
    assert without_missing_validation(with_valid, preflight(with_valid)) is with_valid


def test_shards_without_a_valid_split_refuse_a_sweep_on_a_validation_metric(shards32, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.tune import run_sweep

    cfg = load_config(None, base_overrides(_without_valid(shards32, tmp_path), tmp_path))
    with pytest.raises(ConfigError, match="tune.metric=val_neg_elbo needs a 'valid' split"):
        run_sweep(cfg, {"optim.lr": {"choice": [1e-3]}})


@pytest.mark.integration
def test_more_workers_than_cluster_cpus(ray_session, shards32, tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"dist.num_workers": 16, "data.batch_size": 2}))
    with pytest.raises(ConfigError, match=r"dist.num_workers=16 .* needs 16 CPUs but the Ray cluster has 4"):
        run_training(cfg)
    client = make_client(cfg.tracking.tracking_uri)
    assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())  # no run opened


def test_off_loop_validation_with_no_cpu_left_beside_the_workers(ray_session, shards32, tmp_path):
    """The session's Ray has 4 CPUs: 2 workers and a 3-CPU validation task could never run side by
    side, and Ray's controller would wait for the task forever: refused before any run is opened."""
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.validation": "off_loop", "train.val_cpus": 3}))
    with pytest.raises(ConfigError, match=r"train.val_cpus=3: .* needs 5 CPUs but the Ray cluster has 4"):
        run_training(cfg)
    client = make_client(cfg.tracking.tracking_uri)
    assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())


def test_missing_alias_named(tmp_path, monkeypatch):
    from pipeline.tracking import make_client

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    make_client(uri).create_registered_model("vae-x")
    res = CliRunner().invoke(app, ["sample", "--model", "models:/vae-x@champion", "--tracking-uri", uri])
    assert res.exit_code == 2
    assert "has no alias 'champion' (its aliases: none)" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["sample", "--model", "models:/vae-y@champion", "--tracking-uri", uri])
    assert res.exit_code == 2 and "no registered model named 'vae-y'" in " ".join(res.output.split())


@pytest.mark.integration
def test_workers_that_cannot_be_placed_fail_with_the_resources_named(ray_session, shards32, tmp_path):
    """The cluster is big enough on paper but another job holds its CPUs: instead of waiting for
    ever, the run fails after dist.start_retries tries naming what it asked for and what was free."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pipeline.config import load_config
    from pipeline.train.trainer import run_training

    total = int(ray.cluster_resources()["CPU"])
    held = placement_group([{"CPU": 1}] * (total - 1))  # leaves one CPU: not enough for 2 workers
    ray.get(held.ready(), timeout=60)
    try:
        cfg = load_config(None, base_overrides(shards32, tmp_path, **{
            "dist.start_timeout_s": 3, "dist.start_retries": 0, "tracking.log_model": False}))
        with pytest.raises(RuntimeError, match=r"the 2 training workers .* could not be placed after 1 tries; "
                                               r"the cluster has .* free"):
            run_training(cfg)
    finally:
        remove_placement_group(held)


@pytest.mark.integration
def test_a_sweep_whose_trials_cannot_be_placed_fails_before_anything_is_written(ray_session, shards32, tmp_path):
    """Tune would leave such trials pending for ever: the sweep is refused, naming what to lower,
    before its parent run or its folder exist."""
    from pipeline.config import ConfigError, load_config
    from pipeline.tracking import make_client
    from pipeline.tune import run_sweep

    space = {"optim.lr": {"grid": [1e-3]}}
    cpu = r"dist.num_workers\*dist.cpus_per_worker = 4(\.0)? CPUs plus 0.01 for its driver, but the Ray cluster has 4"
    gpu = r"dist.num_workers\*dist.gpus_per_worker = 2 GPUs, but the Ray cluster has 0"
    for extra, named in (({"dist.num_workers": 4}, cpu), ({"dist.gpus_per_worker": 1}, gpu)):
        cfg = load_config(None, base_overrides(shards32, tmp_path, **{**extra, "tune.storage_path": str(tmp_path / "tune")}))
        with pytest.raises(ConfigError, match=named):
            run_sweep(cfg, space)
    client = make_client(cfg.tracking.tracking_uri)
    assert all(not client.search_runs([e.experiment_id]) for e in client.search_experiments())  # no parent run opened
    assert not (tmp_path / "tune").exists()

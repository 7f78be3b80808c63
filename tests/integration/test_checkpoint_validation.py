"""Checkpoint validation off the training path (``train.validation=off_loop``,
``pipeline.train.checkpoint_validation``): Ray Train validation tasks score each checkpoint while
the ranks train on; their metrics reach MLflow at the checkpoint's step, that step's LoggedModel,
and Ray's own record of the checkpoint. One 2-worker run on the session's Ray."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import base_overrides
from pipeline import logged_models
from pipeline.config import ConfigError, load_config

# in-loop validation would log at 3, 6, 9 and 12 (val_every=3); off the loop only the checkpoints
# (6 and 12) are validated, on the first 16 validation samples, with a 4-sample IWAE bound
OFF_LOOP = {"train.validation": "off_loop", "train.val_every": 3, "train.val_k": 4, "train.val_max_samples": 16,
            "train.precision": "fp32", "model.likelihood": "bernoulli", "tracking.model_per_checkpoint": True,
            "tracking.keep_models": 0}
VAL_KEYS = ("val_neg_elbo", "val_recon", "val_kl", "val_active_units", "val_neg_iwae_nats", "val_num_samples")


@pytest.fixture(scope="module")
def run(ray_session, shards32, tmp_path_factory):
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("off_loop")
    cfg = load_config(None, base_overrides(shards32, tmp, **OFF_LOOP))
    result = run_training(cfg)
    client = make_client(result.tracking_uri)
    experiment_id = client.get_run(result.run_id).info.experiment_id
    history = {k: {m.step: m.value for m in client.get_metric_history(result.run_id, k)} for k in VAL_KEYS}
    return SimpleNamespace(cfg=cfg, result=result, client=client, history=history,
                           models=logged_models.search(client, [experiment_id], [result.run_id]))


@pytest.mark.integration
def test_only_checkpoints_are_validated_each_once_with_every_metric(run):
    assert run.result.metrics["step"] == 12
    for key in VAL_KEYS:
        assert sorted(run.history[key]) == [6, 12], (key, run.history[key])
    assert all(v == 16 for v in run.history["val_num_samples"].values())
    assert all(torch.isfinite(torch.tensor(list(run.history[k].values()))).all() for k in VAL_KEYS)


@pytest.mark.integration
def test_validation_equals_the_elbo_of_the_checkpoint_weights_computed_here(run):
    """The task's val_neg_elbo at step 12 is the mean -ELBO of the final checkpoint's weights over
    the first 16 validation samples, each drawn from its own seed as the evaluation draws it."""
    from models import build_model
    from pipeline.data.stream import ShardStream
    from pipeline.evaluate.runner import SEED_STREAMS, sample_seed
    from pipeline.train import weights_only
    from pipeline.train.checkpoint import CKPT_TAG, STATE_FILE

    ckpt = Path(run.result.checkpoint_path)
    assert json.loads((ckpt / STATE_FILE).read_text())["train_state"]["step"] == 12
    model = build_model(run.cfg.model)
    model.load_state_dict(weights_only.load(str(ckpt / CKPT_TAG / "mp_rank_00_model_states.pt"))["module"])
    model.eval()
    stream = ShardStream(run.cfg.data.path, "valid", 8, 32, 0, 1, num_workers=0)
    elbos = []
    with torch.no_grad():
        for batch in stream.iter_eval("valid"):
            for key, x in zip(batch["key"], batch["image"]):
                if len(elbos) < 16:
                    torch.manual_seed(sample_seed(run.cfg.train.seed, key, SEED_STREAMS["elbo"]))
                    elbos.append(float(model(x[None])["elbo"]))
    assert len(elbos) == 16
    assert run.history["val_neg_elbo"][12] == pytest.approx(-sum(elbos) / 16, rel=1e-6)


@pytest.mark.integration
def test_each_checkpoint_model_and_rays_record_carry_their_steps_validation(run):
    from pipeline.data.shards import read_manifest
    from pipeline.lineage import dataset_digest

    assert sorted(logged_models.step_of(m) for m in run.models) == [6, 12]
    digest = dataset_digest(read_manifest(run.cfg.data.path))
    for model in run.models:
        step = logged_models.step_of(model)
        for key in VAL_KEYS:
            assert logged_models.metric_of(model, key) == run.history[key][step], (step, key)
        # linked to the shard set they were computed on, by its manifest's digest
        assert {(m.dataset_name, m.dataset_digest) for m in model.metrics if m.key in VAL_KEYS} == {("synth32", digest)}
    # Ray attaches the validation task's metrics to the checkpoint it validated: the run's result
    assert run.result.metrics["val_neg_elbo"] == run.history["val_neg_elbo"][12]


@pytest.mark.parametrize("override, needle", [
    ("train.val_k=-1", "train.val_k"),
    ("train.val_max_samples=0", "train.val_max_samples"),
    ("train.val_cpus=0", "train.val_cpus"),
    ("train.validation=sideways", "train.validation"),
])
def test_off_loop_settings_are_checked_naming_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(None, ["train.validation=off_loop", override])


def test_off_loop_refuses_what_it_cannot_validate_naming_why():
    with pytest.raises(ConfigError, match="progressive.enabled"):
        load_config("jobs/progressive_debug.yaml", ["train.validation=off_loop"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config(None, ["train.validation=off_loop", "train.ema_rate=0.999", "dist.zero_stage=3"])


def test_a_sweep_ranked_by_a_metric_its_trials_cannot_report_is_refused():
    from pipeline.tune import check_comparable

    cfg = load_config(None, ["train.validation=off_loop", "tune.metric=val_neg_elbo"])
    with pytest.raises(ConfigError, match="train.validation=off_loop"):
        check_comparable({"optim.lr": {"grid": [1e-3]}}, cfg)
    check_comparable({"optim.lr": {"grid": [1e-3]}}, load_config(None, ["train.validation=off_loop", "tune.metric=loss"]))
    local = load_config(None, ["train.validation=off_loop", "dist.num_workers=0"])  # validated before its report
    check_comparable({"optim.lr": {"grid": [1e-3]}}, local)


def test_zero3_checkpoints_are_read_through_deepspeeds_consolidation_to_the_same_scores(shards32, tmp_path):
    """Local mode (one rank, fp32): the same run under ZeRO-2 (rank 0's module state) and ZeRO-3
    (DeepSpeed's consolidation of the partitions) validates to the same values at each checkpoint."""
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    scores = {}
    for stage in (2, 3):
        result = run_training(load_config(None, base_overrides(shards32, tmp_path / f"zero{stage}", **{
            **OFF_LOOP, "dist.num_workers": 0, "dist.zero_stage": stage, "tracking.log_model": False})))
        history = make_client(result.tracking_uri).get_metric_history(result.run_id, "val_neg_elbo")
        scores[stage] = {m.step: m.value for m in history}
    assert sorted(scores[3]) == [6, 12]
    assert scores[3] == pytest.approx(scores[2], rel=1e-5)

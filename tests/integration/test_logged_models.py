"""One MLflow LoggedModel per checkpoint (``train.export``, ``pipeline.logged_models``): their
steps and linked validation metrics, retention (newest N, best K, registered), ``register --best``
and the model card. One local-mode run (no Ray) trains the models every test here reads.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from conftest import base_overrides
from pipeline import logged_models
from pipeline.cli import app
from pipeline.config import ConfigError, load_config

# checkpoints at 3, 6, 9, 12; validation due at 6 and 12 only, so 3 and 9 are validated for their model.
# best_mode=max keeps the *worst* validated checkpoint as "best": on a loss that falls that is an early
# one, so retention has to keep a model the newest-two rule would drop.
pytestmark = pytest.mark.integration

RUN = {"dist.num_workers": 0, "train.checkpoint_every": 3, "train.val_every": 6, "train.precision": "fp32",
       "tracking.keep_models": 2, "tracking.keep_best_models": 1, "tracking.best_metric": "val_neg_elbo",
       "tracking.best_mode": "max", "train.run_name": "per-checkpoint", "tracking.model_per_checkpoint": True}


@pytest.fixture(scope="module")
def run(shards32, tmp_path_factory):
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    tmp = tmp_path_factory.mktemp("logged_models")
    result = run_training(load_config(None, base_overrides(shards32, tmp, **RUN)))
    client = make_client(result.tracking_uri)
    experiment_id = client.get_run(result.run_id).info.experiment_id
    history = {m.step: m.value for m in client.get_metric_history(result.run_id, "val_neg_elbo")}
    return SimpleNamespace(result=result, client=client, experiment_id=experiment_id, history=history,
                           uri=result.tracking_uri,
                           all_models=client.search_logged_models([experiment_id]),
                           live=logged_models.search(client, [experiment_id], [result.run_id]))


def _register(run, *args):
    return CliRunner().invoke(app, ["register", "--run-id", run.result.run_id, "--tracking-uri", run.uri, *args])


def test_every_checkpoint_step_is_validated_once(run):
    vals = run.client.get_metric_history(run.result.run_id, "val_neg_elbo")
    assert sorted(m.step for m in vals) == [3, 6, 9, 12]  # one value per step: linking logged nothing twice


def test_retention_keeps_the_newest_two_and_the_best_one_and_deletes_the_rest_with_their_files(run):
    expected_best = max(run.history, key=lambda s: (run.history[s], s))  # best_mode=max, computed from the run
    kept = {logged_models.step_of(m) for m in run.live}
    assert kept == {12, 9, expected_best}
    deleted = [m for m in run.client.search_logged_models([run.experiment_id]) if m.model_id not in
               {k.model_id for k in run.live}]
    assert not deleted  # search shows live models only
    for model in run.live:
        assert Path(model.artifact_location.removeprefix("file://"), "MLmodel").is_file()
    artifacts = Path(run.live[0].artifact_location.removeprefix("file://")).parents[1]
    on_disk = {p.parent.parent.name for p in artifacts.glob("m-*/artifacts/MLmodel")}
    assert on_disk == {m.model_id for m in run.live}  # the 4 - len(kept) dropped models left no files


def test_each_model_carries_its_step_data_and_the_validation_metrics_of_that_step(run):
    digest = run.client.get_run(run.result.run_id).data.tags["vaepipe.data_digest"]
    for model in run.live:
        step = logged_models.step_of(model)
        assert logged_models.metric_of(model, "val_neg_elbo") == pytest.approx(run.history[step], rel=1e-12)
        assert model.params["step"] == str(step) and model.params["data_digest"] == digest
        assert model.source_run_id == run.result.run_id


def test_register_takes_the_newest_checkpoint_or_the_best_validated_one_with_its_card(run):
    import mlflow

    from pipeline.tracking import make_client

    newest = _register(run, "--name", "lm-newest")
    best = _register(run, "--name", "lm-best", "--alias", "champion", "--best", "val_neg_elbo", "--mode", "max")
    assert newest.exit_code == 0 and best.exit_code == 0, newest.output + best.output
    client = make_client(run.uri)
    by_step = {logged_models.step_of(m): m for m in run.live}
    expected_best = max(run.history, key=lambda s: (run.history[s], s))
    v_newest, v_best = client.get_model_version("lm-newest", "1"), client.get_model_version("lm-best", "1")
    assert v_newest.source == f"models:/{by_step[12].model_id}" and v_newest.tags["vaepipe.step"] == "12"
    assert v_best.source == f"models:/{by_step[expected_best].model_id}"
    assert f"**Checkpoint:** step {expected_best}," in v_best.description
    assert f"val_neg_elbo {run.history[expected_best]:.4g}" in v_best.description
    model = mlflow.pyfunc.load_model("models:/lm-best@champion")
    import numpy as np
    out = model.predict(np.zeros((2, 3, 32, 32), np.float32))
    assert out.shape == (2, 3, 32, 32) and np.isfinite(out).all()


def test_register_refuses_a_metric_no_model_carries_and_a_bad_mode_naming_them(run):
    res = _register(run, "--name", "lm-x", "--best", "val_nope")
    assert res.exit_code != 0 and "'val_nope'" in res.output and "val_neg_elbo" in res.output
    res = _register(run, "--name", "lm-x", "--best", "val_loss", "--mode", "sideways")
    assert res.exit_code != 0 and "--mode 'sideways'" in res.output


def _model(mid, step, value=None):
    metrics = [] if value is None else [SimpleNamespace(key="val_loss", step=step, timestamp=0, value=value)]
    return SimpleNamespace(model_id=mid, tags={logged_models.STEP_TAG: str(step)}, metrics=metrics)


def test_retention_rule_keeps_newest_best_and_registered():
    models = [_model("a", 10, 5.0), _model("b", 20, 1.0), _model("c", 30, 3.0), _model("d", 40, 4.0),
              _model("e", 50, 9.0), _model("f", 60)]
    assert logged_models.to_keep(models, 2, 1, "val_loss", "min", set()) == {"f", "e", "b"}
    assert logged_models.to_keep(models, 2, 2, "val_loss", "max", {"c"}) == {"f", "e", "a", "c"}  # best two: e, a
    assert logged_models.to_keep(models, 1, 0, "val_loss", "min", set()) == {"f"}
    with pytest.raises(ValueError, match=r"no logged model carries metric 'val_nll' .*their metrics: val_loss"):
        logged_models.best(models, "val_nll", "min", "run x")


@pytest.mark.parametrize("key,value,needle", [
    ("tracking.keep_models", -1, "tracking.keep_models=-1"),
    ("tracking.best_metric", "loss", "tracking.best_metric='loss'"),
    ("tracking.best_mode", "up", "tracking.best_mode"),
])
def test_retention_settings_are_checked(key, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[")):
        load_config(None, [f"{key}={value}"])

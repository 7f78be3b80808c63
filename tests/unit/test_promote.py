"""Promotion against a local SQLite MLflow: every decision is a logged run, ``nll`` is refused
where it is not a likelihood, and errors reading the champion stop the promotion."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from mlflow.exceptions import MlflowException, RestException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from models import build_model
from pipeline.config import load_config, to_dict
from pipeline.evaluate.runner import EvalSpec
from pipeline.promote import ALREADY_CHAMPION, NO_CHAMPION, _is_missing_alias, promote
from pipeline.tracking import ensure_experiment, make_client

NAME = "vae-promo-unit"


@pytest.fixture
def uri(tmp_path, monkeypatch) -> str:
    monkeypatch.chdir(tmp_path)  # promotion runs put their artifacts under ./mlartifacts
    return f"sqlite:///{tmp_path / 'mlruns.db'}"


def _register(uri: str, alias: str, likelihood: str = "bernoulli", weights: bool = True) -> int:
    """Log a vaepipe model blob (model/artifacts/weights.pt) and register it under ``alias``."""
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", f"model.likelihood={likelihood}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    client = make_client(uri)
    exp = ensure_experiment(client, "models", str(Path(uri.removeprefix("sqlite:///")).parent / "art"), uri)
    run = client.create_run(exp)
    folder = Path(tempfile.mkdtemp()) / "model" / "artifacts"
    folder.mkdir(parents=True)
    blob = {"model_config": {"name": cfg.model.name, **model.config}, "state_dict": model.state_dict(), "config": to_dict(cfg)}
    torch.save(blob, folder / ("weights.pt" if weights else "other.pt"))
    client.log_artifacts(run.info.run_id, str(folder.parent), "model")
    if not client.search_registered_models(f"name='{NAME}'"):
        client.create_registered_model(NAME)
    version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id).version
    client.set_registered_model_alias(NAME, alias, version)
    return int(version)


def _decision_runs(uri: str) -> list:
    client = make_client(uri)
    exp = client.get_experiment_by_name("vaepipe-promotions")
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _champion(uri: str):
    try:
        return int(make_client(uri).get_model_version_by_alias(NAME, "champion").version)
    except MlflowException:
        return None


SPEC = dict(split="test", k=4, batch_k=4, batch_size=4, max_samples=4)


def test_first_promotion_scores_the_challenger_and_logs_the_decision(uri, shards32):
    version = _register(uri, "challenger")
    wins, rows, promoted = promote(NAME, shards32, EvalSpec(metrics=["neg_iwae_nats", "au"], **SPEC), [0.0], uri)
    assert wins and rows == [] and promoted == version and _champion(uri) == version
    (run,) = _decision_runs(uri)
    assert run.data.tags["vaepipe.decision"] == NO_CHAMPION
    assert run.data.tags["vaepipe.champion_version"] == "none"
    assert run.data.tags["vaepipe.challenger_version"] == str(version)
    metrics = run.data.metrics
    assert metrics["challenger/neg_iwae_nats"] > 0 and "challenger/active_units_cov" in metrics
    assert "challenger/nll" not in metrics  # bernoulli on continuous pixels: not an NLL
    # promoting the champion again changes nothing, and says so
    assert promote(NAME, shards32, EvalSpec(metrics=["elbo"], **SPEC), [0.0], uri) == (True, [], version)
    assert sorted(r.data.tags["vaepipe.decision"] for r in _decision_runs(uri)) == sorted([NO_CHAMPION, ALREADY_CHAMPION])


def test_nll_is_refused_for_a_model_whose_likelihood_is_not_a_probability(uri, shards32):
    _register(uri, "challenger", likelihood="mse")
    with pytest.raises(ValueError, match=r"metric 'nll' is not defined for models:/vae-promo-unit@challenger.*neg_iwae_nats"):
        promote(NAME, shards32, EvalSpec(metrics=["nll"], **SPEC), [0.0], uri)
    assert _champion(uri) is None and _decision_runs(uri) == []


def test_an_unexpected_error_reading_the_champion_alias_stops_the_promotion(uri, shards32, monkeypatch):
    _register(uri, "challenger")
    real = type(make_client(uri)).get_model_version_by_alias

    def flaky(self, name, alias):
        if alias == "champion":
            raise MlflowException("database is locked", error_code=INTERNAL_ERROR)
        return real(self, name, alias)

    monkeypatch.setattr(type(make_client(uri)), "get_model_version_by_alias", flaky)
    with pytest.raises(MlflowException, match="database is locked"):
        promote(NAME, shards32, EvalSpec(metrics=["elbo"], **SPEC), [0.0], uri)
    monkeypatch.undo()
    assert _champion(uri) is None


def test_a_champion_whose_model_cannot_be_read_stops_the_promotion(uri, shards32):
    champion = _register(uri, "champion", weights=False)  # registered, but no artifacts/weights.pt
    _register(uri, "challenger")
    with pytest.raises(FileNotFoundError, match="not a vaepipe model"):
        promote(NAME, shards32, EvalSpec(metrics=["elbo"], **SPEC), [0.0], uri)
    assert _champion(uri) == champion


def test_only_a_missing_alias_counts_as_no_champion(uri):
    _register(uri, "challenger")
    with pytest.raises(MlflowException) as real:  # what this MLflow really raises for an unset alias
        make_client(uri).get_model_version_by_alias(NAME, "champion")
    assert _is_missing_alias(real.value)
    assert _is_missing_alias(MlflowException("Registered model alias champion not found.", error_code=INVALID_PARAMETER_VALUE))
    assert _is_missing_alias(RestException({"error_code": "RESOURCE_DOES_NOT_EXIST",
                                            "message": "Registered model alias champion not found."}))
    assert not _is_missing_alias(MlflowException("Registered Model with name=x not found", error_code=RESOURCE_DOES_NOT_EXIST))
    assert not _is_missing_alias(MlflowException("alias champion not found", error_code=INTERNAL_ERROR))
    assert not _is_missing_alias(ValueError("alias champion not found"))


# --- what the CLI prints ---------------------------------------------------------------------
def test_cli_evaluate_names_the_bound_and_says_why_nll_is_not_shown(uri, shards32):
    from typer.testing import CliRunner

    from pipeline.cli import app

    _register(uri, "challenger")
    args = ["evaluate", "--model", f"models:/{NAME}@challenger", "--data", shards32, "--metrics", "nll,elbo",
            "--split", "test", "--k", "4", "--max-samples", "4", "--tracking-uri", uri]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    rows = {line.strip("│ ").split()[0] for line in lines if line.startswith("│")}
    assert {"neg_iwae_nats", "neg_elbo", "bce", "kl"} <= rows and not rows & {"nll", "nll_bits_per_dim", "elbo", "recon"}
    why = [line for line in lines if line.startswith("nll not shown")]
    assert why == ["nll not shown: bernoulli on continuous pixels is not a density over the stored data; "
                   "set data.binarize=static|dynamic or use model.likelihood=logistic_mixture"]


def test_cli_promote_refuses_nll_naming_the_alternative(uri, shards32):
    from typer.testing import CliRunner

    from pipeline.cli import app

    _register(uri, "challenger")
    args = ["promote", "--name", NAME, "--data", shards32, "--metrics", "nll", "--split", "test", "--k", "4",
            "--max-samples", "4", "--tracking-uri", uri]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 2
    assert "metric 'nll' is not defined" in result.output and "--metrics neg_iwae_nats" in result.output
    assert _champion(uri) is None

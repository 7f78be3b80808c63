"""What a run prints: Ray Train's per-report dumps and MLflow's per-rank chatter are off unless
``tracking.verbose`` (``vaepipe train --verbose``); warnings always pass."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import load_config
from pipeline.train.console import PRINT_PATCH_VAR, chatty_loggers, quiet_driver, quiet_rank


@pytest.fixture
def fresh_levels(monkeypatch):
    """The chatty loggers at their libraries' levels, restored afterwards; the env vars unset."""
    loggers = [logging.getLogger(n) for n in chatty_loggers()]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.NOTSET)
    for var in (PRINT_PATCH_VAR, "VAEPIPE_SET_PRINT_PATCH", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(var, raising=False)
    yield loggers
    for lg, level in zip(loggers, saved):
        lg.setLevel(level)


def test_the_loggers_are_ray_trains_report_and_checkpoint_ones_and_mlflows_gpu_notice():
    import ray.train.v2._internal.execution.context as context

    names = chatty_loggers()
    assert "ray.train.v2._internal.execution.storage" in names
    assert context.__file__ in names  # Ray names the TrainingReport logger by its file's path
    assert "mlflow.system_metrics.system_metrics_monitor" in names


def test_a_rank_says_warnings_only_unless_verbose(fresh_levels):
    import os

    quiet_rank(verbose=True)
    assert all(lg.level == logging.NOTSET for lg in fresh_levels) and "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    quiet_rank(verbose=False)
    for lg in fresh_levels:
        assert not lg.isEnabledFor(logging.INFO) and lg.isEnabledFor(logging.WARNING), lg.name
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"


def test_the_driver_turns_trains_print_patch_off_unless_verbose_or_set(fresh_levels, monkeypatch):
    import os

    quiet_driver(verbose=True)
    assert PRINT_PATCH_VAR not in os.environ
    quiet_driver(verbose=False)
    assert os.environ[PRINT_PATCH_VAR] == "0"
    quiet_driver(verbose=True)  # a verbose run after a quiet one in the same process: patched again
    assert PRINT_PATCH_VAR not in os.environ
    monkeypatch.setenv(PRINT_PATCH_VAR, "1")  # the user's own choice stands, quiet or verbose
    quiet_driver(verbose=False)
    assert os.environ[PRINT_PATCH_VAR] == "1"
    quiet_driver(verbose=True)
    assert os.environ[PRINT_PATCH_VAR] == "1"


def test_train_verbose_flag_is_the_config_key(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline import cli

    seen = {}

    def run_training(cfg, resume=None):  # what the command hands to training, and no training
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr("pipeline.train.trainer.run_training", run_training)
    CliRunner().invoke(cli.app, ["train", "--verbose", "train.max_steps=3"])
    assert seen["cfg"].tracking.verbose is True and seen["cfg"].train.max_steps == 3
    assert load_config(None, []).tracking.verbose is False


def test_a_store_without_a_server_is_opened_with_mlflow_ui():
    from pipeline.cli import _where_to_look

    assert _where_to_look("sqlite:///mlruns.db", "abc") == "run abc in `mlflow ui --backend-store-uri sqlite:///mlruns.db`"


@pytest.mark.parametrize("verbose, level", [(False, "WARNING"), (True, "INFO")])
def test_trains_controller_and_workers_log_at_warning_unless_verbose(verbose, level, fresh_levels, monkeypatch):
    """The trainer hands Ray Train a LoggingConfig: its console lines (the worker group's pids, each
    validation task) only with --verbose; its system log files keep every level either way."""
    from pipeline.train.trainer import build_trainer

    for var in ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "VAEPIPE_SET_START_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)  # build_trainer sets them: put back as they were

    cfg = load_config(None, [f"tracking.verbose={verbose}"])
    trainer = build_trainer(cfg, {"config": {}}, "console-test", ())
    assert trainer.run_config.logging_config.log_level == level

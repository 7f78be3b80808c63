"""What a training run prints besides vaepipe's own ``[vaepipe]`` lines.

On every rank and every report, Ray Train logs the persisted checkpoint's path and the whole
``TrainingReport``; MLflow says on every rank that it skips GPU metrics and draws a download
bar when the model is logged; and Train's print patch sends each ``print`` of a library (for
example DeepSpeed's "op built successfully") to the console twice. A run of a few hundred
reports buries its step lines under them. Unless ``tracking.verbose`` is set, those loggers
say only warnings and errors, and prints go to the console once. No library warning is hidden.
Train's own controller (the worker group it started, each validation task) speaks at its
``LoggingConfig`` level (``train_logging``).
"""

from __future__ import annotations

import logging
import os

# Train hands it from the driver to its controller and workers (ENV_VARS_TO_PROPAGATE).
PRINT_PATCH_VAR = "RAY_TRAIN_ENABLE_PRINT_PATCH"
_SET_BY_VAEPIPE = "VAEPIPE_SET_PRINT_PATCH"


def chatty_loggers() -> list[str]:
    """The loggers that speak at INFO on every report or checkpoint of every rank."""
    names = ["ray.train.v2._internal.execution.storage",  # "Checkpoint successfully created at: ..."
             "mlflow.system_metrics.system_metrics_monitor"]  # "Skip logging GPU metrics" on every rank
    try:  # "Reporting training result N: TrainingReport(...)": this logger is named by its file's path
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray: nothing of it to quiet
        return names
    return names + [context.__file__]


def quiet_driver(verbose: bool) -> None:
    """In the driver, before ``fit()``: the workers Train starts print each line once. A value
    the user set stands; the one an earlier quiet run in this process set is decided anew."""
    if os.environ.pop(_SET_BY_VAEPIPE, None):
        os.environ.pop(PRINT_PATCH_VAR, None)
    if not verbose and PRINT_PATCH_VAR not in os.environ:
        os.environ[PRINT_PATCH_VAR] = "0"
        os.environ[_SET_BY_VAEPIPE] = "1"


def train_logging(verbose: bool):
    """Ray Train's ``LoggingConfig``: its controller and workers say warnings and errors on the
    console unless ``verbose`` (its INFO lines: the worker group's every pid, each async validation
    task launched and finished, each report). Train's system log files in the Ray session keep every
    level either way; only its console and application log files follow this level."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose else "WARNING")


def quiet_rank(verbose: bool) -> None:
    """On a training rank, before anything is reported."""
    if verbose:
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in chatty_loggers():
        logging.getLogger(name).setLevel(logging.WARNING)

"""The job and sweep files shipped in jobs/ load, validate, and build a model that runs.

Every sweep file is also sampled: a few trials' configs are drawn from its search space the
way Tune would draw them, and each must validate and build a model whose forward pass gives
a finite loss.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import apply_overrides, load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"
JOB_FILES = sorted(JOBS.glob("*.yaml")) + sorted((JOBS / "bench").glob("*.yaml"))
SWEEP_FILES = sorted((JOBS / "sweeps").glob("*.yaml"))


def _forward_loss(model_cfg) -> float:
    from models import build_model

    torch.manual_seed(0)
    model = build_model(model_cfg)
    x = torch.rand(2, model_cfg.in_channels, model_cfg.resolution, model_cfg.resolution)
    return float(model(x, beta=1.0, free_bits=0.0)["loss"].detach())


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.stem)
def test_job_file_loads_and_builds(path):
    cfg = load_config(path)
    if cfg.model.name == "vq_prior":
        # its parent comes from the registry at run time; the config must name it
        assert cfg.model.ar.parent_uri.startswith("models:/")
        return
    assert torch.isfinite(torch.tensor(_forward_loss(cfg.model)))


def test_the_issue_sweeps_exist():
    assert {p.stem for p in SWEEP_FILES} >= {"beta_vae", "hierarchical", "vqvae"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_samples_valid_trials(path):
    from pipeline.tune import draw_trials, load_sweep

    cfg, space = load_sweep(path, ["tune.num_samples=64", "tune.max_concurrent=8"])
    assert cfg.tune.num_samples == 64 and cfg.tune.max_concurrent == 8
    for i, trial in enumerate(draw_trials(space, num_samples=1, seed=0)[:3]):  # as Tune draws them
        assert set(trial) == set(space)
        trial_cfg = apply_overrides(cfg, trial, f"{path.name} trial {i}")
        for key, value in trial.items():  # every drawn value reached the trial's config
            node = trial_cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert (list(node) if isinstance(node, (list, tuple)) else node) == value, key
        assert torch.isfinite(torch.tensor(_forward_loss(trial_cfg.model)))

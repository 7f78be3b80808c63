"""Evaluation fan-out: scoring through 2 Ray workers equals scoring in one process."""

import numpy as np
import pytest
import torch

from models import build_model
from pipeline.config import load_config
from pipeline.evaluate.runner import EvalSpec, evaluate


@pytest.fixture(scope="module")
def blob():
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "model.likelihood=bernoulli"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return {"model_config": {"name": cfg.model.name, **model.config}, "state_dict": model.state_dict()}


def test_unknown_metric_is_named():
    with pytest.raises(ValueError, match="bogus"):
        EvalSpec(metrics=["nll", "bogus"])


@pytest.mark.integration
def test_two_ray_workers_equal_single_process(ray_session, shards32, blob):
    spec = EvalSpec(metrics=["nll", "elbo", "au", "mig", "sap"], split="test", k=20, batch_k=10, batch_size=8)
    single = evaluate(blob, shards32, spec, workers=1)
    double = evaluate(blob, shards32, spec, workers=2)
    assert single["num_samples"] == double["num_samples"] == 30  # the whole 300-image test split
    # Same samples, same seeds: only float32 summation order differs (Ray workers run 1 thread).
    for key in ("nll", "elbo", "recon", "kl", "mig", "sap"):
        assert np.isfinite(single[key])
        assert double[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    np.testing.assert_allclose(double["nll_per_sample"], single["nll_per_sample"], rtol=1e-6)
    assert double["active_units_cov"] == single["active_units_cov"]
    assert single["nll"] <= -single["elbo"] + 1e-6  # the k-sample bound is tighter than the ELBO


def test_vqvae_elbo_has_no_units_and_no_collapse_verdict(shards32):
    cfg = load_config(None, ["model.name=vqvae", "model.flavor=debug", "data.resolution=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    blob = {"model_config": {"name": "vqvae", **model.config}, "state_dict": model.state_dict()}
    res = evaluate(blob, shards32, EvalSpec(metrics=["elbo"], split="test", batch_size=8), workers=1)
    assert np.isfinite(res["elbo"]) and res["num_samples"] == 30
    assert "collapse" not in res and res["active_units_kl"] == 0


def test_second_stage_models_read_their_parents_input_shape():
    from pipeline.evaluate.runner import model_input_shape

    assert model_input_shape({"name": "vq_prior", "ar": {"parent_config": {"in_channels": 1, "resolution": 32}}}) == (1, 32)
    assert model_input_shape({"name": "conv_vae", "in_channels": 3, "resolution": 128}) == (3, 128)

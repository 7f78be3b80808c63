"""Every family trains through the same path: 2 Ray workers, DeepSpeed ZeRO-2, MLflow, and the
run holds the family's own metrics; the VQ-VAE's prior trains on the registered VQ-VAE's codes
and samples through the registry."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import base_overrides
from pipeline.config import load_config

pytestmark = pytest.mark.integration


def _train(shards, tmp_path, **extra):
    from pipeline.train.trainer import run_training

    values = {"dist.zero_stage": 2, "train.max_steps": 4, "train.log_every": 2, "train.val_every": 4,
              "train.image_every": 4, "train.checkpoint_every": 4, "tracking.log_model": False, **extra}
    return run_training(load_config(None, base_overrides(shards, tmp_path, **values)))


def _metrics(result):
    import mlflow

    from pipeline.tracking import make_client

    mlflow.flush_async_logging()
    return make_client(result.tracking_uri).get_run(result.run_id).data.metrics


@pytest.mark.parametrize("family, extra, expected", [
    ("factor_vae", {}, {"tc", "disc_loss", "disc_acc"}),
    ("ladder_vae", {"train.activation_checkpointing": True}, {"kl_level/0", "kl_level/1", "kl_level/2"}),
    ("conv_vae", {"model.prior": "made", "schedule.kl_anneal": "cyclical", "schedule.target_kl": 0.5}, {"kl", "beta"}),
])
def test_family_trains_with_its_metrics(ray_session, shards32, tmp_path, family, extra, expected):
    result = _train(shards32, tmp_path, **{"model.name": family, **extra})
    metrics = _metrics(result)
    assert expected <= set(metrics), sorted(metrics)
    assert all(np.isfinite(metrics[k]) for k in expected)
    assert result.metrics["step"] == 4


def test_vqvae_then_prior_on_its_codes(ray_session, shards32, tmp_path):
    import mlflow.pyfunc

    vq = _train(shards32, tmp_path, **{"model.name": "vqvae", "tracking.log_model": True,
                                       "tracking.register_name": "vq-test", "tracking.register_alias": "champion"})
    metrics = _metrics(vq)
    assert {"codebook_perplexity", "codebook_usage", "commitment"} <= set(metrics)
    assert metrics["codebook_perplexity"] >= 1.0
    prior = _train(shards32, tmp_path, **{"model.name": "vq_prior", "model.ar.parent_uri": "models:/vq-test@champion",
                                          "tracking.log_model": True, "tracking.register_name": "vq-prior-test",
                                          "tracking.register_alias": "champion"})
    assert "bits_per_code" in _metrics(prior)
    model = mlflow.pyfunc.load_model("models:/vq-prior-test@champion")
    samples = model.predict(np.zeros((1, 1, 1, 1), np.float32), params={"method": "sample", "n": 2})
    assert samples.shape == (2, 3, 32, 32) and np.isfinite(samples).all()

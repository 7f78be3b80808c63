"""Every family trains through the same path (the Ray Train loop, DeepSpeed ZeRO-2, MLflow) and
the run holds the family's own metrics; the VQ-VAE's prior trains on the registered VQ-VAE's
codes and samples through the registry.

Every family trains in local mode (``dist.num_workers=0``: one rank in this process), since what
is checked here is each family's own metrics, not distribution, which ``test_train_integration``,
``test_zero3_matrix`` and the ``*_2proc`` tests cover (two ranks' discriminator, RNG and VQ
codebook statistics: ``test_rank_rng_and_aux_2proc``, ``test_collectives_2proc``).
A local fit of the test job costs ~1.2 core-seconds once torch and DeepSpeed are imported in this
process, against ~32 for a 2-worker fit (start-up of the worker, controller and helper processes)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import base_overrides
from pipeline.config import load_config

pytestmark = pytest.mark.integration


def _train(shards, tmp_path, **extra):
    from pipeline.train.trainer import run_training

    values = {"dist.zero_stage": 2, "dist.num_workers": 0, "train.max_steps": 4, "train.log_every": 2, "train.val_every": 4,
              "train.image_every": 4, "train.checkpoint_every": 4, "tracking.log_model": False, **extra}
    return run_training(load_config(None, base_overrides(shards, tmp_path, **values)))


def _metrics(result):
    import mlflow

    from pipeline.tracking import make_client

    mlflow.flush_async_logging()
    return make_client(result.tracking_uri).get_run(result.run_id).data.metrics


def _check_factor(m: dict) -> None:
    # the TC penalty is what separates the loss from the plain ELBO terms (beta=1, gamma=10)
    assert m["loss"] - (m["recon"] + m["kl"]) == pytest.approx(10.0 * m["tc"], rel=1e-3, abs=1e-3)
    assert 0.0 <= m["disc_acc"] <= 1.0 and m["disc_loss"] > 0.0


def _check_ladder(m: dict) -> None:
    # the per-level KLs add up to the total KL (no free bits here)
    assert sum(m[f"kl_level/{i}"] for i in range(3)) == pytest.approx(m["kl"], rel=1e-4)


def _check_made_cyclical(m: dict) -> None:
    from pipeline.config import ScheduleConfig
    from pipeline.train.schedules import kl_weight

    # the last window (steps 2, 3 of 4) logged the mean of the cyclical schedule's weights there
    sc = ScheduleConfig(kl_anneal="cyclical")
    assert m["beta"] == pytest.approx((kl_weight(2, sc, 1.0, 4) + kl_weight(3, sc, 1.0, 4)) / 2, rel=1e-6)
    # target_kl=0.5: every step's loss is recon + beta * max(0.5, KL), so the window keeps that floor
    assert m["loss"] - m["recon"] >= 0.5 * m["beta"] - 1e-4


@pytest.mark.parametrize("family, extra, check", [
    ("factor_vae", {}, _check_factor),
    ("ladder_vae", {"train.activation_checkpointing": True}, _check_ladder),
    ("conv_vae", {"model.prior": "made", "schedule.kl_anneal": "cyclical", "schedule.target_kl": 0.5}, _check_made_cyclical),
])
def test_family_trains_with_its_metrics(shards32, tmp_path, family, extra, check):
    result = _train(shards32, tmp_path, **{"model.name": family, **extra})
    check(_metrics(result))
    assert result.metrics["step"] == 4


def test_vqvae_then_prior_on_its_codes(shards32, tmp_path):
    import mlflow.pyfunc

    vq = _train(shards32, tmp_path, **{"model.name": "vqvae", "tracking.log_model": True,
                                       "tracking.register_name": "vq-test", "tracking.register_alias": "champion"})
    metrics = _metrics(vq)
    # perplexity = exp(entropy of code use) lies between 1 and the number of codes used (debug K = 16)
    assert 1.0 <= metrics["codebook_perplexity"] <= metrics["codebook_usage"] * 16 + 1e-4
    assert metrics["commitment"] > 0.0
    prior = _train(shards32, tmp_path, **{"model.name": "vq_prior", "model.ar.parent_uri": "models:/vq-test@champion",
                                          "tracking.log_model": True, "tracking.register_name": "vq-prior-test",
                                          "tracking.register_alias": "champion"})
    pm = _metrics(prior)
    assert pm["bits_per_code"] == pytest.approx(pm["loss"] / np.log(2.0), rel=1e-5)  # the loss is nats per code
    assert "val_code_nll" in pm and "val_neg_elbo" not in pm
    model = mlflow.pyfunc.load_model("models:/vq-prior-test@champion")
    samples = model.predict(np.zeros((1, 1, 1, 1), np.float32), params={"method": "sample", "n": 2})
    assert samples.shape == (2, 3, 32, 32) and np.isfinite(samples).all()

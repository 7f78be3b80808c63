"""Evaluation fan-out: scoring through 2 workers (partitions) equals scoring in one process;
metric names follow the likelihood; FID through the runner equals a direct computation."""

import warnings

import numpy as np
import pytest
import torch

from models import build_model
from pipeline.config import load_config, to_dict
from pipeline.evaluate.fid import frechet_distance
from pipeline.evaluate.job import result_notes, scalar_metrics
from pipeline.evaluate.runner import (
    SEED_STREAMS,
    EvalSpec,
    eval_stream,
    evaluate,
    merge_partitions,
    name_likelihood_metrics,
    sample_seed,
    score_partition,
)


def _blob(likelihood: str = "bernoulli", binarize: str | None = None) -> dict:
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", f"model.likelihood={likelihood}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    config = to_dict(cfg)
    if binarize is not None:
        config["data"]["binarize"] = binarize
    else:
        config["data"].pop("binarize", None)  # a run from before data.binarize existed
    return {"model_config": {"name": cfg.model.name, **model.config}, "state_dict": model.state_dict(), "config": config}


@pytest.fixture(scope="module")
def blob():
    return _blob()


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
    # bernoulli on continuous pixels: the IWAE bound is not an NLL and is not called one
    assert "nll" not in single and "nll" not in double
    for key in ("neg_iwae_nats", "elbo", "recon", "kl", "mig", "sap"):
        assert np.isfinite(single[key])
        assert double[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
    np.testing.assert_allclose(double["neg_iwae_nats_per_sample"], single["neg_iwae_nats_per_sample"], rtol=1e-6)
    assert double["active_units_cov"] == single["active_units_cov"]
    assert single["neg_iwae_nats"] <= -single["elbo"] + 1e-6  # the k-sample bound is tighter than the ELBO


def test_vqvae_elbo_has_no_units_and_no_collapse_verdict(shards32):
    cfg = load_config(None, ["model.name=vqvae", "model.flavor=debug", "data.resolution=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    blob = {"model_config": {"name": "vqvae", **model.config}, "state_dict": model.state_dict()}
    res = evaluate(blob, shards32, EvalSpec(metrics=["elbo"], split="test", batch_size=8), workers=1)
    assert np.isfinite(res["elbo"]) and res["num_samples"] == 30
    assert "collapse" not in res and res["active_units_kl"] == 0


def test_vqvae_default_metrics_bound_with_its_one_hot_posterior_and_name_the_unit_metrics_left_out(shards32):
    """``vaepipe evaluate``'s default metrics (nll, elbo, au) on a VQ-VAE: q(z|x) is one-hot at x's
    own codes, so every importance sample is that code grid and the bound is log p(x|z*) + log p(z*)
    exactly, the ELBO of the same image; au has no units to count and says so."""
    cfg = load_config(None, ["model.name=vqvae", "model.flavor=debug", "data.resolution=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    blob = {"model_config": {"name": "vqvae", **model.config}, "state_dict": model.state_dict()}
    res = evaluate(blob, shards32, EvalSpec(metrics=["nll", "elbo", "au"], split="test", k=3, batch_k=3,
                                            batch_size=8, max_samples=8), workers=1)
    assert res["num_samples"] == 8 and "active_units_cov" not in res
    assert "au" in res["unit_metrics_not_shown"] and "discrete codes" in res["unit_metrics_not_shown"]
    assert res["unit_metrics_not_shown"] in result_notes(res)  # printed under the table
    bound = res["neg_iwae_nats_per_sample"]
    assert np.isfinite(bound).all()
    assert res["neg_iwae_nats"] == pytest.approx(-res["elbo"], rel=1e-5)  # one-hot q: the k draws are one


def test_vdvae_groups_are_scored_without_per_element_units_and_the_result_says_why(shards32):
    cfg = load_config(None, ["model.name=vdvae", "model.flavor=debug", "data.resolution=32"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    blob = {"model_config": {"name": "vdvae", **model.config}, "state_dict": model.state_dict()}
    res = evaluate(blob, shards32, EvalSpec(metrics=["elbo", "au"], split="test", batch_size=4, max_samples=4), workers=1)
    assert np.isfinite(res["elbo"]) and "active_units_cov" not in res and "num_units" not in res
    assert "spatial Gaussian groups" in res["unit_metrics_not_shown"]


def test_second_stage_models_read_their_parents_input_shape():
    from pipeline.evaluate.runner import model_input_shape

    assert model_input_shape({"name": "vq_prior", "ar": {"parent_config": {"in_channels": 1, "resolution": 32}}}) == (1, 32)
    assert model_input_shape({"name": "conv_vae", "in_channels": 3, "resolution": 128}) == (3, 128)


# --- metric names follow the likelihood ---------------------------------------------------
@pytest.mark.parametrize("likelihood, binarize, density", [
    ("bernoulli", None, False), ("bernoulli", "static", True), ("logistic_mixture", None, True), ("mse", None, False)])
def test_iwae_is_called_nll_only_for_a_probability_of_the_stored_data(shards32, likelihood, binarize, density):
    spec = EvalSpec(metrics=["nll", "elbo"], split="test", k=4, batch_k=4, batch_size=4, max_samples=4)
    res = evaluate(_blob(likelihood, binarize), shards32, spec)
    shown = scalar_metrics(res)
    assert res["likelihood_is_density"] is density
    assert np.isfinite(res["neg_iwae_nats"])
    if density:
        assert shown["nll"] == res["neg_iwae_nats"] and "neg_iwae_nats" not in shown
        assert shown["nll_bits_per_dim"] == pytest.approx(res["nll"] / (3 * 32 * 32 * np.log(2)), rel=1e-12)
        assert shown["elbo"] == res["elbo"] and "neg_elbo" not in shown and "bce" not in shown
        assert result_notes(res) == []
    else:
        assert "nll" not in shown and "nll_bits_per_dim" not in shown
        assert shown["neg_iwae_nats"] == res["neg_iwae_nats"] and shown["neg_elbo"] == -res["elbo"]
        assert "elbo" not in shown  # one number, one name
        if likelihood == "bernoulli":
            assert shown["bce"] == res["recon"] and "recon" not in shown
        else:
            assert "bce" not in shown and shown["recon"] == res["recon"]
        assert result_notes(res) == [res["nll_not_shown"]] and res["nll_not_shown"].startswith("nll not shown")


def test_density_results_from_the_naming_step():
    res = name_likelihood_metrics({"neg_iwae_nats": 100.0, "neg_iwae_nats_per_sample": np.array([100.0]),
                                   "elbo": -120.0, "recon": 110.0}, _blob("bernoulli", "dynamic"))
    assert res["nll"] == 100.0 and res["nll_bits_per_dim"] == pytest.approx(100.0 / (3072 * np.log(2)))
    assert "neg_elbo" not in res and "bce" not in res and "nll_not_shown" not in res


# --- FID through the runner ----------------------------------------------------------------
class _TinyFeatures(torch.nn.Module):
    """A small random conv net standing in for the Inception (no weights, any feature width); float64
    so that batching cannot change a feature in the digits the comparisons look at."""

    def __init__(self, width: int):
        super().__init__()
        torch.manual_seed(123)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, stride=2), torch.nn.ReLU(),
                                       torch.nn.Conv2d(width, width, 3, stride=2), torch.nn.ReLU(),
                                       torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).double()

    def forward(self, x):
        return self.net(2 * x - 1)


def _direct_fid(blob, shards, spec, net) -> float:
    """Features of every image of the split and of one model sample per key, seeded by that key."""
    from pipeline.evaluate.runner import build_eval_model

    model = build_eval_model(blob)
    real, fake = [], []
    with torch.no_grad():
        for batch in eval_stream(blob, shards, spec.split, 8, 0, 1).iter_eval(spec.split):
            real.append(net(batch["image"].double()))
            for key in batch["key"]:
                torch.manual_seed(sample_seed(spec.seed, key, SEED_STREAMS["fid"]))
                fake.append(net(model.sample(1).float().clamp(0, 1).double()))
    r, f = torch.cat(real).numpy(), torch.cat(fake).numpy()
    assert len(r) == 30
    return frechet_distance(r.mean(0), np.cov(r, rowvar=False), f.mean(0), np.cov(f, rowvar=False))


def test_runner_fid_equals_a_direct_computation_for_any_partition(shards32, blob):
    net = _TinyFeatures(width=8).eval()
    spec = EvalSpec(metrics=["fid"], split="test", batch_size=8, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 30 samples > 8 feature dims: no singular-covariance warning
        one = evaluate(blob, shards32, spec, feature_net=net)
    direct = _direct_fid(blob, shards32, spec, net)
    assert one["fid"] == pytest.approx(direct, rel=1e-9) and "fid_warning" not in one
    two = merge_partitions([score_partition(blob, shards32, spec, r, 2, net) for r in (0, 1)], spec)
    assert two["num_samples"] == 30
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-9)


def test_fid_from_fewer_samples_than_feature_dims_warns(shards32, blob):
    spec = EvalSpec(metrics=["fid"], split="test", batch_size=8, max_samples=12)
    with pytest.warns(UserWarning, match="12 samples < 16 feature dimensions"):
        res = evaluate(blob, shards32, spec, feature_net=_TinyFeatures(width=16).eval())
    assert np.isfinite(res["fid"]) and "singular" in res["fid_warning"]
    assert any(note.startswith("fid warning") for note in result_notes(res))


def test_the_evaluation_prints_its_progress_with_rate_and_time_left():
    """A line at most every ``every_s`` seconds with the share's count, rate and ETA, and a closing
    line with the count and the time it took (a fake clock: 1 s per batch of 10 samples)."""
    from pipeline.evaluate.progress import EvalProgress

    now, lines = [0.0], []
    shown = EvalProgress(100, rank=0, world=2, every_s=3.0, clock=lambda: now[0], out=lines.append)
    for _ in range(10):
        now[0] += 1.0
        shown.add(10)
    shown.finish()
    assert lines == ["evaluate, worker 1 of 2: 30/100 samples (30%), 10.0 samples/s, eta 7s",
                     "evaluate, worker 1 of 2: 60/100 samples (60%), 10.0 samples/s, eta 4s",
                     "evaluate, worker 1 of 2: 90/100 samples (90%), 10.0 samples/s, eta 1s",
                     "evaluate, worker 1 of 2: 100 samples scored in 10s (10.0 samples/s)"]

"""``vaepipe evaluate``: score a registered model on a shard split, log it as its own MLflow run.

The evaluation run is linked both ways: it carries the model URI and registered version as
tags, and the model version gets a ``vaepipe.eval_run`` tag pointing at the run.
"""

from __future__ import annotations

import re
from dataclasses import asdict

import torch

from pipeline.evaluate.runner import EvalSpec, build_eval_model, evaluate


def _model_version(client, model_uri: str):
    """The registry version behind ``models:/name@alias`` or ``models:/name/3``, else None."""
    m = re.fullmatch(r"models:/([^/@]+)@(.+)", model_uri)
    if m:
        return client.get_model_version_by_alias(m.group(1), m.group(2))
    m = re.fullmatch(r"models:/([^/@]+)/(\d+)", model_uri)
    if m:
        return client.get_model_version(m.group(1), m.group(2))
    return None


def log_visuals(logger, model: torch.nn.Module, blob: dict, data_url: str, split: str, results: dict, seed: int) -> None:
    """Sample and reconstruction grids, traversals, interpolations and the per-dimension KL plot,
    as MLflow images at step 0 under the keys training uses (so runs compare in the UI)."""
    from pipeline.evaluate.runner import eval_stream, has_gaussian_latent
    from pipeline.evaluate.visualize import interpolate, kl_bar_plot, latent_traversals, make_grid

    stream = eval_stream(blob, data_url, split, 8, 0, 1)
    x = next(iter(stream.iter_eval(split, max_batches=1)))["image"]
    torch.manual_seed(seed)
    with torch.no_grad():
        logger.image(make_grid(model.sample(64), nrow=8), "samples", 0)
        pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
        logger.image(make_grid(pairs, nrow=8), "reconstructions", 0)
    if has_gaussian_latent(model) and "kl_per_dim" in results:  # traversals walk a Gaussian vector's units
        kl = results["kl_per_dim"]
        top = torch.argsort(torch.as_tensor(kl), descending=True)[:10].tolist()  # the most informative units
        logger.image(make_grid(latent_traversals(model, x[0], dims=top, steps=9)), "traversals", 0)
        logger.image(make_grid(interpolate(model, x[0], x[1], steps=10, mode="linear"), nrow=10), "interpolation_linear", 0)
        logger.image(make_grid(interpolate(model, x[0], x[1], steps=10, mode="slerp"), nrow=10), "interpolation_slerp", 0)
        logger.figure(kl_bar_plot(kl), "kl_per_dim", 0)


def run_evaluation(model_uri: str, data_url: str, spec: EvalSpec, workers: int, tracking_uri: str,
                   experiment: str = "vaepipe-eval", artifact_location: str = "mlartifacts") -> tuple[str, dict]:
    """Evaluate, log into a new MLflow run, return (run id, results)."""
    from pipeline.data.shards import read_manifest
    from pipeline.lineage import dataset_input, lineage_tags
    from pipeline.serving import load_logged_weights
    from pipeline.logger import RankZeroLogger
    from pipeline.tracking import ensure_experiment, make_client

    client = make_client(tracking_uri)
    blob = load_logged_weights(model_uri)
    manifest = read_manifest(data_url)
    res = blob["model_config"].get("resolution")
    if res and res > manifest["resolution"]:
        raise ValueError(f"--data {data_url} stores {manifest['resolution']} px but the model needs {res} px")
    if workers > 1:
        import ray

        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=False)
    results = evaluate(blob, data_url, spec, workers)
    version = _model_version(client, model_uri)
    exp_id = ensure_experiment(client, experiment, artifact_location, tracking_uri)
    tags = {"vaepipe.model_uri": model_uri, "vaepipe.eval_data": data_url, "vaepipe.eval_split": spec.split}
    if version is not None:
        tags.update({"vaepipe.model_name": version.name, "vaepipe.model_version": str(version.version)})
    run = client.create_run(exp_id, run_name=f"eval-{model_uri.split('/')[-1]}", tags=tags)
    run_id = run.info.run_id
    for k, v in asdict(spec).items():
        client.log_param(run_id, k, str(v))
    client.log_param(run_id, "workers", workers)
    logger = RankZeroLogger(tracking_uri, run_id, enabled=True)
    logger.dataset(dataset_input(manifest, data_url, spec.split))
    logger.tags(lineage_tags(manifest))
    logger.metrics(scalar_metrics(results), step=0)
    if "collapse" in results:
        logger.tags({"vaepipe.posterior_collapse": results["collapse"]["collapsed"]})
    for tag, key in (("vaepipe.nll_not_shown", "nll_not_shown"), ("vaepipe.fid_warning", "fid_warning")):
        if results.get(key):
            logger.tags({tag: results[key]})
    log_visuals(logger, build_eval_model(blob), blob, data_url, spec.split, results, spec.seed)
    logger.flush()
    client.set_terminated(run_id)
    if version is not None:
        client.set_model_version_tag(version.name, version.version, "vaepipe.eval_run", run_id)
    return run_id, results


SCALAR_KEYS = ("nll", "nll_bits_per_dim", "neg_iwae_nats", "elbo", "neg_elbo", "bce", "recon", "kl",
               "active_units_kl", "active_units_cov", "mig", "sap", "fid", "num_samples", "num_units")


def scalar_metrics(results: dict) -> dict[str, float]:
    """The numbers of a result dict that go into MLflow and the printed table.

    Where the IWAE bound is a data NLL it is shown once, as ``nll`` (with bits/dim) beside
    ``elbo``; elsewhere the same numbers go by what they are, ``neg_iwae_nats``, ``neg_elbo``
    and (Bernoulli) ``bce`` for ``recon``; see ``likelihood_is_density``.
    """
    renamed = {"neg_iwae_nats": "nll", "elbo": "neg_elbo", "recon": "bce"}  # shown once, under one name
    keys = [k for k in SCALAR_KEYS if renamed.get(k) not in results]
    return {k: float(results[k]) for k in keys if results.get(k) is not None}


def result_notes(results: dict) -> list[str]:
    """One line per caveat of a result: why nll is not shown, why unit metrics are not, why FID
    is not comparable."""
    notes = []
    if "nll_not_shown" in results and "neg_iwae_nats" in results:
        notes.append(results["nll_not_shown"])
    if results.get("unit_metrics_not_shown"):
        notes.append(results["unit_metrics_not_shown"])
    if results.get("fid_warning"):
        notes.append(f"fid warning: {results['fid_warning']}")
    return notes

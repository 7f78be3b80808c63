"""Scoring a model on a shard split, one partition per worker, merged in the driver.

Every stochastic quantity of a sample (its importance samples, its ELBO draw) is seeded
from the sample's key, so the merged result does not depend on how many workers scored
the split, nor on which worker saw which sample: two Ray workers give the single-process
numbers. Workers return sums (ELBO accumulator, FID feature moments) and per-sample rows
(NLL, codes, factors); the driver adds the sums and concatenates the rows.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

METRICS = ("nll", "elbo", "au", "mig", "sap", "fid")


@dataclass
class EvalSpec:
    metrics: list[str] = field(default_factory=lambda: ["nll", "elbo", "au"])
    split: str = "test"
    k: int = 1000
    batch_k: int = 250
    batch_size: int = 32
    max_samples: Optional[int] = None
    seed: int = 0
    fid_weights: Optional[str] = None

    def __post_init__(self) -> None:
        bad = [m for m in self.metrics if m not in METRICS]
        if bad:
            raise ValueError(f"--metrics {','.join(bad)} unknown; choose from {','.join(METRICS)}")


def build_eval_model(blob: dict) -> torch.nn.Module:
    from models import build_model

    model = build_model(dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def _sample_seed(seed: int, key: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _has_gaussian_latent(model: torch.nn.Module) -> bool:
    return hasattr(model, "log_likelihood_terms") and hasattr(model, "encode")


def eval_stream(blob: dict, data_url: str, split: str, batch_size: int, rank: int, world: int):
    """An unshuffled stream of ``split`` at the model's input shape; batches shrink for small splits.

    The data is binarised as the model was trained (``binarize`` of the run's data config), with
    the deterministic per-key draw even for a ``dynamic`` model, so scores are reproducible.
    """
    from pipeline.data.shards import read_manifest
    from pipeline.data.stream import ShardStream

    channels, resolution = model_input_shape(blob["model_config"])
    n = read_manifest(data_url)["splits"].get(split, {}).get("num_samples", 0)
    if n < world:
        raise ValueError(f"split {split!r} of {data_url} has {n} samples, fewer than the {world} workers")
    return ShardStream(data_url, split, max(1, min(batch_size, n // world)), resolution, rank, world,
                       shuffle_buffer=1, num_workers=0, channels=channels, binarize=trained_binarize(blob))


def trained_binarize(blob: dict) -> str:
    """The run's ``data.binarize``; ``none`` for blobs saved before the setting existed."""
    return ((blob.get("config") or {}).get("data") or {}).get("binarize", "none")


def model_input_shape(model_config: dict) -> tuple[int, int]:
    """(channels, resolution) a model reads; second-stage models (vq_prior) read their parent's."""
    parent = (model_config.get("ar") or {}).get("parent_config") or {}
    channels = model_config.get("in_channels") or parent.get("in_channels", 3)
    return channels, model_config.get("resolution") or parent.get("resolution", 64)


@torch.no_grad()
def score_partition(blob: dict, data_url: str, spec: EvalSpec, rank: int, world: int) -> dict:
    """Score this worker's share of ``spec.split``; returns sums and per-sample rows."""
    from pipeline.evaluate.diagnostics import ELBOAccumulator
    from pipeline.evaluate.likelihood import iwae_log_likelihood

    model = build_eval_model(blob)
    stream = eval_stream(blob, data_url, spec.split, spec.batch_size, rank, world)
    acc = ELBOAccumulator(latent_dim=None)
    rows: dict[str, list] = {"key": [], "nll": [], "codes": [], "factors": []}
    wanted = set(spec.metrics)
    quota = None if spec.max_samples is None else math.ceil(spec.max_samples / world)
    seen = 0
    for batch in stream.iter_eval(spec.split):
        x, keys = batch["image"], list(batch["key"])
        if quota is not None and seen >= quota:
            break
        if quota is not None:
            x, keys = x[: quota - seen], keys[: quota - seen]
        seen += len(keys)
        rows["key"] += keys
        if wanted & {"mig", "sap", "au"} and _has_gaussian_latent(model):
            mu = model.encode(x)[0]
            rows["codes"].append(mu.double().numpy())
            if "factors" in batch:
                rows["factors"].append(batch["factors"][: len(keys)].numpy())
        for i, key in enumerate(keys):
            xi = x[i : i + 1]
            if wanted & {"elbo", "au"}:
                torch.manual_seed(_sample_seed(spec.seed, key))
                acc.update(model(xi))
            if "nll" in wanted:
                torch.manual_seed(_sample_seed(spec.seed + 1, key))
                rows["nll"].append(-float(iwae_log_likelihood(model, xi, k=spec.k, batch_k=spec.batch_k)[0]))
    part: dict[str, Any] = {"elbo_sums": acc.state_dict() if acc.count else None, "rows": rows}
    if "fid" in wanted:
        part["fid"] = _fid_moments(model, stream, spec, rank, world, quota)
    return part


def _fid_moments(model, stream, spec: EvalSpec, rank: int, world: int, quota: Optional[int]) -> Optional[dict]:
    """Inception feature sums of this worker's data images and of as many model samples."""
    from pipeline.evaluate.fid import FeatureMoments, fid_available, load_fid_inception

    ok, _ = fid_available(spec.fid_weights)
    if not ok:
        return None
    inception = load_fid_inception(spec.fid_weights)
    real, fake, n = FeatureMoments(), FeatureMoments(), 0
    torch.manual_seed(spec.seed * 7919 + rank)
    for batch in stream.iter_eval(spec.split):
        x = batch["image"]
        if quota is not None:
            x = x[: max(quota - n, 0)]
        if len(x) == 0:
            break
        n += len(x)
        real.update(inception(x).double())
        fake.update(inception(model.sample(len(x)).float()).double())
    return {"real": real, "fake": fake}


def merge_partitions(parts: list[dict], spec: EvalSpec) -> dict:
    """Add the workers' sums, join their rows and compute the requested metrics."""
    from pipeline.evaluate.diagnostics import ELBOAccumulator, active_units_cov
    from pipeline.evaluate.disentanglement import mig, sap

    results: dict[str, Any] = {}
    keys = [k for p in parts for k in p["rows"]["key"]]
    order = np.argsort(keys, kind="stable")  # rows in key order: independent of the partitioning
    results["num_samples"] = len(keys)
    sums = [p["elbo_sums"] for p in parts if p["elbo_sums"] is not None]
    if sums:
        total = ELBOAccumulator.from_sums(sums[0])
        for other in sums[1:]:
            total.merge(ELBOAccumulator.from_sums(other))
        r = total.compute()
        results.update({"elbo": r["elbo"], "recon": r["recon"], "kl": r["kl"], "kl_per_dim": r["kl_per_dim"],
                        "active_units_kl": r["active_units_kl"]})
        if "collapse" in r:
            results["collapse"] = r["collapse"]
    nll = np.array([v for p in parts for v in p["rows"]["nll"]], dtype=np.float64)
    if len(nll):
        results["nll"] = float(nll.mean())
        results["nll_per_sample"] = nll[order]
    codes_parts = [c for p in parts for c in p["rows"]["codes"]]
    if codes_parts:
        codes = np.concatenate(codes_parts)[order]
        results["num_units"] = int(codes.shape[1])
        if "au" in spec.metrics:
            results["active_units_cov"] = active_units_cov(codes)
        factor_parts = [f for p in parts for f in p["rows"]["factors"]]
        if factor_parts:
            factors = np.concatenate(factor_parts)[order]
            if "mig" in spec.metrics:
                results["mig"] = float(mig(codes, factors))
            if "sap" in spec.metrics:
                # SAP trains its 1-D classifiers on one half and scores on the other, split by key
                half = np.array([zlib.crc32(keys[i].encode()) % 2 == 0 for i in order])
                results["sap"] = float(sap(codes[half], factors[half], codes[~half], factors[~half]))
    if "fid" in spec.metrics:
        results["fid"] = _merge_fid(parts)
    return results


def _merge_fid(parts: list[dict]) -> Optional[float]:
    from pipeline.evaluate.fid import frechet_distance

    moments = [p.get("fid") for p in parts]
    if not moments or any(m is None for m in moments):
        return None
    real, fake = moments[0]["real"], moments[0]["fake"]
    for m in moments[1:]:
        real.merge(m["real"])
        fake.merge(m["fake"])
    return frechet_distance(*real.compute(), *fake.compute())


def evaluate(blob: dict, data_url: str, spec: EvalSpec, workers: int = 1) -> dict:
    """Score ``data_url``'s split with ``workers`` Ray workers (1 = in this process)."""
    if workers <= 1:
        return merge_partitions([score_partition(blob, data_url, spec, 0, 1)], spec)
    import ray

    blob_ref = ray.put(blob)
    task = ray.remote(num_cpus=1)(score_partition)
    parts = ray.get([task.remote(blob_ref, data_url, spec, r, workers) for r in range(workers)])
    return merge_partitions(parts, spec)

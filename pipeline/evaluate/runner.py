"""Scoring a model on a shard split, one partition per worker, merged in the driver.

Every stochastic quantity of a sample (its importance samples, its ELBO draw, the model
sample FID pairs with it) is seeded from the sample's key, so the merged result does not
depend on how many workers scored the split, nor on which worker saw which sample: two Ray
workers give the single-process numbers. Workers return mergeable state (ELBO accumulator,
FID feature moments) and per-sample rows (IWAE bound, codes, factors); the driver merges
the state and concatenates the rows.

The IWAE bound is reported as ``nll`` only where the likelihood is a probability of the
stored data (:func:`pipeline.evaluate.likelihood.likelihood_is_density`); elsewhere it is
``neg_iwae_nats`` and ``nll_not_shown`` says why.
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from pipeline.evaluate.likelihood import IWAE_METRIC, binarize_mode

METRICS = ("nll", IWAE_METRIC, "elbo", "au", "mig", "sap", "fid")
# seed streams of a sample key: its ELBO draw, its importance samples, its FID sample
SEED_STREAMS = {"elbo": 0, "iwae": 1, "fid": 2}


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

    @property
    def wants_iwae(self) -> bool:
        """``nll`` and ``neg_iwae_nats`` are two names of one computation, the IWAE bound."""
        return bool({"nll", IWAE_METRIC} & set(self.metrics))


def build_eval_model(blob: dict) -> torch.nn.Module:
    from models import build_model

    model = build_model(dict(blob["model_config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


def data_config(blob: dict) -> dict:
    """The ``data`` section of the run config saved with the model ({} for blobs without one)."""
    return dict((blob.get("config") or {}).get("data") or {})


def sample_seed(seed: int, key: str, stream: int = 0) -> int:
    """The seed of one sample's draws in one ``stream`` (ELBO, IWAE, FID, binarisation)."""
    return ((seed * len(SEED_STREAMS) + stream) * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


# What a family may declare its latent to be (``latent_kind``), and why the per-unit metrics
# (active units, MIG, SAP) and traversals are not computed for the kinds other than ``gaussian``.
LATENT_KINDS = {
    "gaussian": "",  # one diagonal-Gaussian vector: encode gives (mu, logvar), one unit per element
    "codes": "a grid of discrete codes",
    "groups": "a hierarchy of spatial Gaussian groups, each conditioned on the ones above",
}


def latent_kind(model: torch.nn.Module) -> str:
    """What a family declares its latent to be (``LATENT_KINDS``; ``gaussian`` unless it says)."""
    kind = getattr(type(model), "latent_kind", "gaussian")
    if kind not in LATENT_KINDS:
        raise ValueError(f"{type(model).__name__}.latent_kind={kind!r} is not one of {sorted(LATENT_KINDS)}")
    return kind


def has_gaussian_latent(model: torch.nn.Module) -> bool:
    return latent_kind(model) == "gaussian" and hasattr(model, "log_likelihood_terms") and hasattr(model, "encode")


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
                       shuffle_buffer=1, num_workers=0, channels=channels, binarize=binarize_mode(data_config(blob)))


def model_input_shape(model_config: dict) -> tuple[int, int]:
    """(channels, resolution) a model reads; second-stage models (vq_prior) read their parent's."""
    parent = (model_config.get("ar") or {}).get("parent_config") or {}
    channels = model_config.get("in_channels") or parent.get("in_channels", 3)
    return channels, model_config.get("resolution") or parent.get("resolution", 64)


def _partition_batches(stream, spec: EvalSpec, quota: Optional[int]):
    """(x, keys, factors) of this worker's share, cut at ``quota`` samples (binarised by the stream)."""
    seen = 0
    for batch in stream.iter_eval(spec.split):
        if quota is not None and seen >= quota:
            return
        keys = list(batch["key"])[: None if quota is None else quota - seen]
        x = batch["image"][: len(keys)]
        factors = batch["factors"][: len(keys)].numpy() if "factors" in batch else None
        seen += len(keys)
        yield x, keys, factors


@torch.no_grad()
def score_partition(blob: dict, data_url: str, spec: EvalSpec, rank: int, world: int,
                    feature_net: Optional[torch.nn.Module] = None, progress: bool = False) -> dict:
    """Score this worker's share of ``spec.split``; returns mergeable state and per-sample rows.

    ``feature_net`` replaces the FID Inception (tests, custom feature extractors); ``progress``:
    print how far this share is every few seconds (``evaluate.progress``).
    """
    from pipeline.evaluate.diagnostics import ELBOAccumulator
    from pipeline.evaluate.likelihood import iwae_log_likelihood

    model = build_eval_model(blob)
    stream = eval_stream(blob, data_url, spec.split, spec.batch_size, rank, world)
    fid = _FIDState.start(spec, feature_net) if "fid" in spec.metrics else None
    acc = ELBOAccumulator(latent_dim=None)
    rows: dict[str, list] = {"key": [], "neg_iwae": [], "codes": [], "factors": []}
    wanted = set(spec.metrics)
    quota = None if spec.max_samples is None else math.ceil(spec.max_samples / world)
    shown = _share_progress(data_url, spec, quota, rank, world) if progress else None
    for x, keys, factors in _partition_batches(stream, spec, quota):
        rows["key"] += keys
        if wanted & {"mig", "sap", "au"} and has_gaussian_latent(model):
            rows["codes"].append(model.encode(x)[0].double().numpy())
            if factors is not None:
                rows["factors"].append(factors)
        for i, key in enumerate(keys):
            xi = x[i : i + 1]
            if wanted & {"elbo", "au"}:
                torch.manual_seed(sample_seed(spec.seed, key, SEED_STREAMS["elbo"]))
                acc.update(model(xi))
            if spec.wants_iwae:  # the network in its own precision, every sum in float64
                torch.manual_seed(sample_seed(spec.seed, key, SEED_STREAMS["iwae"]))
                rows["neg_iwae"].append(-float(iwae_log_likelihood(model, xi, k=spec.k, batch_k=spec.batch_k)[0]))
        if fid is not None:
            fid.update(model, x, keys, spec.seed)
        if shown is not None:
            shown.add(len(keys))
    if shown is not None:
        shown.finish()
    part: dict[str, Any] = {"elbo_state": acc.state_dict() if acc.count else None, "rows": rows,
                            "latent_kind": latent_kind(model)}
    if fid is not None:
        part["fid"] = fid.moments()
    return part


def _share_progress(data_url: str, spec: EvalSpec, quota: Optional[int], rank: int, world: int):
    from pipeline.data.shards import read_manifest
    from pipeline.evaluate.progress import EvalProgress

    n = read_manifest(data_url)["splits"][spec.split]["num_samples"]
    share = -(-n // world)  # the expected share: ranks may differ by a batch (iter_eval)
    return EvalProgress(share if quota is None else min(share, quota), rank, world)


def fid_model_samples(model: torch.nn.Module, keys: list[str], seed: int) -> torch.Tensor:
    """One model sample per data key, each drawn from its own seed: the same set of samples
    whatever the partition of the keys across workers."""
    out = []
    for key in keys:
        torch.manual_seed(sample_seed(seed, key, SEED_STREAMS["fid"]))
        out.append(model.sample(1))
    return torch.cat(out).float().clamp(0.0, 1.0)


@dataclass
class _FIDState:
    """Feature moments of this worker's data images and of as many model samples."""

    net: Any
    real: Any
    fake: Any

    @classmethod
    def start(cls, spec: EvalSpec, feature_net: Optional[torch.nn.Module]) -> Optional["_FIDState"]:
        from pipeline.evaluate.fid import FeatureMoments, fid_available, load_fid_inception

        if feature_net is None:
            if not fid_available(spec.fid_weights)[0]:
                return None
            feature_net = load_fid_inception(spec.fid_weights)
        return cls(feature_net.eval(), FeatureMoments(), FeatureMoments())

    def update(self, model: torch.nn.Module, x: torch.Tensor, keys: list[str], seed: int) -> None:
        dtype = next(self.net.parameters()).dtype  # the Inception is float32; a test net may be float64
        self.real.update(self.net(x.to(dtype)).double())
        self.fake.update(self.net(fid_model_samples(model, keys, seed).to(dtype)).double())

    def moments(self) -> dict:
        return {"real": self.real, "fake": self.fake}


def merge_partitions(parts: list[dict], spec: EvalSpec) -> dict:
    """Merge the workers' state, join their rows and compute the requested metrics."""
    results: dict[str, Any] = {}
    keys = [k for p in parts for k in p["rows"]["key"]]
    order = np.argsort(keys, kind="stable")  # rows in key order: independent of the partitioning
    results["num_samples"] = len(keys)
    results.update(_merge_elbo(parts))
    neg_iwae = np.array([v for p in parts for v in p["rows"]["neg_iwae"]], dtype=np.float64)
    if len(neg_iwae):
        results[IWAE_METRIC] = float(neg_iwae.mean())
        results[f"{IWAE_METRIC}_per_sample"] = neg_iwae[order]
    results.update(_merge_codes(parts, spec, keys, order))
    unit_metrics = sorted({"au", "mig", "sap"} & set(spec.metrics))
    kind = parts[0]["latent_kind"] if parts else "gaussian"  # one model: every part says the same
    if unit_metrics and kind != "gaussian":
        results["unit_metrics_not_shown"] = (f"{', '.join(unit_metrics)}: the model's latent is {LATENT_KINDS[kind]}, "
                                             "not one Gaussian vector, so it has no units to count or score")
    if "fid" in spec.metrics:
        results.update(_merge_fid(parts))
    return results


def _merge_elbo(parts: list[dict]) -> dict:
    from pipeline.evaluate.diagnostics import ELBOAccumulator

    states = [p["elbo_state"] for p in parts if p["elbo_state"] is not None]
    if not states:
        return {}
    total = ELBOAccumulator.from_state(states[0])
    for other in states[1:]:
        total.merge(other)
    r = total.compute()
    out = {k: r[k] for k in ("elbo", "recon", "kl", "kl_per_dim", "active_units_kl")}
    if "collapse" in r:
        out["collapse"] = r["collapse"]
    return out


def _merge_codes(parts: list[dict], spec: EvalSpec, keys: list[str], order: np.ndarray) -> dict:
    from pipeline.evaluate.diagnostics import active_units_cov
    from pipeline.evaluate.disentanglement import mig, sap

    codes_parts = [c for p in parts for c in p["rows"]["codes"]]
    if not codes_parts:
        return {}
    codes = np.concatenate(codes_parts)[order]
    out: dict[str, Any] = {"num_units": int(codes.shape[1])}
    if "au" in spec.metrics:
        out["active_units_cov"] = active_units_cov(codes)
    factor_parts = [f for p in parts for f in p["rows"]["factors"]]
    if factor_parts:
        factors = np.concatenate(factor_parts)[order]
        if "mig" in spec.metrics:
            out["mig"] = float(mig(codes, factors))
        if "sap" in spec.metrics:
            # SAP trains its 1-D classifiers on one half and scores on the other, split by key
            half = np.array([zlib.crc32(keys[i].encode()) % 2 == 0 for i in order])
            out["sap"] = float(sap(codes[half], factors[half], codes[~half], factors[~half]))
    return out


def _merge_fid(parts: list[dict]) -> dict:
    """``fid`` (None without a feature network) and ``fid_warning`` when the covariance is singular."""
    from pipeline.evaluate.fid import frechet_distance

    moments = [p.get("fid") for p in parts]
    if not moments or any(m is None for m in moments):
        return {"fid": None}
    real, fake = moments[0]["real"], moments[0]["fake"]
    for m in moments[1:]:
        real.merge(m["real"])
        fake.merge(m["fake"])
    out: dict[str, Any] = {"fid": frechet_distance(*real.compute(), *fake.compute())}
    dim = int(real.mean.shape[0])
    if real.n < dim:
        out["fid_warning"] = (f"FID from {real.n} samples < {dim} feature dimensions: the covariance is singular "
                              "and the number is not comparable with FIDs from other sample counts")
        warnings.warn(out["fid_warning"], stacklevel=2)
    return out


def name_likelihood_metrics(results: dict, blob: dict) -> dict:
    """Name the IWAE bound by what it is: ``nll`` (+ bits/dim) only for a probability of the stored
    data; otherwise ``neg_iwae_nats``, ``neg_elbo`` (and ``bce`` for Bernoulli) with ``nll_not_shown``."""
    from pipeline.evaluate.likelihood import bits_per_dim, likelihood_is_density, likelihood_name

    is_density, reason = likelihood_is_density(blob["model_config"], data_config(blob))
    results["likelihood_is_density"] = is_density
    if is_density and IWAE_METRIC in results:
        channels, resolution = model_input_shape(blob["model_config"])
        results["nll"] = results[IWAE_METRIC]
        results["nll_per_sample"] = results[f"{IWAE_METRIC}_per_sample"]
        results["nll_bits_per_dim"] = float(bits_per_dim(-results["nll"], channels * resolution ** 2))
    if not is_density:
        results["nll_not_shown"] = reason
        if "elbo" in results:
            results["neg_elbo"] = -results["elbo"]
            if likelihood_name(blob["model_config"]) == "bernoulli":
                results["bce"] = results["recon"]
    return results


def evaluate(blob: dict, data_url: str, spec: EvalSpec, workers: int = 1,
             feature_net: Optional[torch.nn.Module] = None) -> dict:
    """Score ``data_url``'s split with ``workers`` Ray workers (1 = in this process)."""
    if workers <= 1:
        parts = [score_partition(blob, data_url, spec, 0, 1, feature_net, progress=True)]
    else:
        import ray

        blob_ref = ray.put(blob)
        task = ray.remote(num_cpus=1)(score_partition)
        parts = ray.get([task.remote(blob_ref, data_url, spec, r, workers, feature_net, progress=r == 0)
                         for r in range(workers)])
    return name_likelihood_metrics(merge_partitions(parts, spec), blob)

"""``vaepipe bench quality``: does the pipeline train as well as the bare loop?

Every performance change (summed gradients, the lean ZeRO step, layouts, caches, data order)
can change the training math. This guard trains the reference job two ways on the same data,
for the same steps, from the same seeds:

- through ``vaepipe train`` (Ray Train workers, DeepSpeed, the shard stream);
- in the bare single-process loop of ``bench.baseline`` (the train split in memory, a random
  permutation per epoch, ``torch.optim.Adam``, the same global batch, clipping and precision;
  dynamic binarisation draws a fresh Bernoulli sample per batch, as the stream does per epoch).

Both final models are scored with the evaluation's own code on the held-out split: the mean
-ELBO in nats per image, with fixed per-sample seeds. The bench fails when the pipeline's mean
is worse than the loop's by more than ``2 x`` the standard error of the difference of the two
means over seeds (``tolerance``): a gap the seeds' own spread does not explain.

Only what the bare loop reproduces is compared: a constant KL weight, Adam, no accumulation,
no weight EMA, fixed resolution, and a family trained by one optimizer. Anything else is refused
by name.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from pipeline.bench.report import BenchReport
from pipeline.config import VaepipeConfig, to_dict


def comparable(cfg: VaepipeConfig) -> None:
    """Refuse, naming the setting, a job whose math the bare loop does not do."""
    checks = [
        (cfg.schedule.kl_anneal == "none", "schedule.kl_anneal", "the bare loop keeps the KL weight at model.beta"),
        (not cfg.schedule.target_kl, "schedule.target_kl", "the bare loop keeps the KL weight at model.beta"),
        (cfg.optim.name == "adam", "optim.name", "the bare loop runs torch.optim.Adam"),
        (cfg.train.grad_accum_steps == 1, "train.grad_accum_steps", "the bare loop steps every batch"),
        (not cfg.train.ema_rate, "train.ema_rate", "the bare loop keeps no weight EMA"),
        (not cfg.progressive.enabled, "progressive.enabled", "the bare loop trains at one resolution"),
        (cfg.model.name not in ("factor_vae", "vq_prior", "progressive_vae", "progressive_ladder_vae"), "model.name",
         "the family has a second optimizer, a parent model or growth"),
        (not cfg.dist.local, "dist.num_workers", "the pipeline side needs Ray Train workers (>= 1)"),
    ]
    for ok, key, why in checks:
        if not ok:
            raise ValueError(f"bench quality compares the reference math only: {key} is not comparable ({why})")


def held_out_split(url: str) -> str:
    from pipeline.data.shards import read_manifest

    splits = read_manifest(url)["splits"]
    for split in ("test", "valid"):
        if split in splits:
            return split
    raise ValueError(f"{url} has no test or valid split to score on (it has {sorted(splits)})")


def score(blob: dict, cfg: VaepipeConfig, split: str, max_samples: Optional[int]) -> float:
    """Mean -ELBO (nats per image) of ``blob`` on ``split``, with the evaluation's per-sample seeds."""
    from pipeline.evaluate.runner import EvalSpec, merge_partitions, score_partition

    spec = EvalSpec(metrics=["elbo"], split=split, batch_size=cfg.data.batch_size, max_samples=max_samples,
                    seed=0)
    return -float(merge_partitions([score_partition(blob, cfg.data.path, spec, 0, 1)], spec)["elbo"])


def pipeline_blob(cfg: VaepipeConfig) -> dict:
    """Train ``cfg`` with ``vaepipe train``; the final checkpoint's weights as the evaluation reads them."""
    from pipeline.train.checkpoint_validation import checkpoint_blob
    from pipeline.train.trainer import run_training

    result = run_training(cfg)
    return checkpoint_blob(Path(result.checkpoint_path), cfg, to_dict(cfg))


def bare_blob(cfg: VaepipeConfig, data: torch.Tensor, steps: int) -> dict:
    """Train ``cfg`` in the bare loop from ``cfg.train.seed``; its weights as the evaluation reads them."""
    from pipeline.bench.baseline import bare_threads, build_bare, global_batch, train_steps
    from pipeline.train.export import weights_blob
    from pipeline.train.timers import PhaseClock

    with bare_threads(cfg):
        model, opt = build_bare(cfg)
        train_steps(cfg, model, opt, data, global_batch(cfg), steps, PhaseClock(),
                    fresh_bits=cfg.data.binarize == "dynamic")
    state = {k: v.detach().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return weights_blob({"name": cfg.model.name, **dict(getattr(model, "config", {}) or to_dict(cfg)["model"])},
                        state, to_dict(cfg))


def in_memory(cfg: VaepipeConfig) -> torch.Tensor:
    """The train split for the bare loop: grey levels where the stream binarises dynamically
    (the loop draws per batch), the stream's own static draw otherwise."""
    from pipeline.bench.baseline import load_in_memory
    from pipeline.data.shards import read_manifest

    n = read_manifest(cfg.data.path)["splits"]["train"]["num_samples"]
    grey = replace(cfg, data=replace(cfg.data, binarize="none")) if cfg.data.binarize == "dynamic" else cfg
    return load_in_memory(grey, n)


def verdict(pipeline: list[float], bare: list[float]) -> dict:
    """The gap of the means (pipeline - loop; positive: the pipeline trains worse) and the tolerance,
    two standard errors of that difference from the seeds' spread."""
    if len(pipeline) < 2 or len(bare) < 2:
        raise ValueError("bench quality needs at least 2 seeds on each side for a spread")
    se = math.sqrt(statistics.variance(pipeline) / len(pipeline) + statistics.variance(bare) / len(bare))
    gap = statistics.mean(pipeline) - statistics.mean(bare)
    return {"gap_nats": gap, "tolerance_nats": 2 * se, "worse": gap > 2 * se}


def quality_bench(cfg: VaepipeConfig, seeds: list[int], steps: int, max_samples: Optional[int],
                  work: Path) -> BenchReport:
    """Both ways for each seed; the table, the means with their spread and the verdict."""
    from pipeline.bench.overhead import resolved_precision

    comparable(cfg)
    cfg = resolved_precision(cfg)  # both sides run what the workers run
    split = held_out_split(cfg.data.path)
    data = in_memory(cfg)
    rows, pipe, bare = [], [], []
    for seed in seeds:
        run = _run_config(cfg, seed, steps, work)
        pipe.append(score(pipeline_blob(run), run, split, max_samples))
        bare.append(score(bare_blob(run, data, steps), run, split, max_samples))
        rows.append({"seed": seed, "pipeline -ELBO": pipe[-1], "bare loop -ELBO": bare[-1], "gap": pipe[-1] - bare[-1]})
    v = verdict(pipe, bare)
    rows.append({"seed": "mean ± sd", "pipeline -ELBO": f"{statistics.mean(pipe):.2f} ± {statistics.stdev(pipe):.2f}",
                 "bare loop -ELBO": f"{statistics.mean(bare):.2f} ± {statistics.stdev(bare):.2f}", "gap": v["gap_nats"]})
    return BenchReport(
        name="quality", title=f"Test -ELBO (nats/image) after {steps} steps: vaepipe train vs the bare loop",
        rows=rows, summary={**v, "worse": float(v["worse"]), "pipeline_mean": statistics.mean(pipe),
                            "bare_mean": statistics.mean(bare)},
        params={"model": cfg.model.name, "flavor": cfg.model.flavor, "data": cfg.data.path, "split": split,
                "steps": steps, "seeds": ",".join(map(str, seeds)), "global_batch": cfg.data.batch_size * cfg.dist.num_workers,
                "precision": cfg.train.precision, "zero_stage": cfg.dist.zero_stage},
        notes=[f"scored on the {split} split ({max_samples or 'all'} samples) with the evaluation's seeds",
               f"fails when the gap exceeds the tolerance, 2 standard errors of the difference of the means "
               f"({v['tolerance_nats']:.2f} nats): {'FAILED' if v['worse'] else 'passed'}"])


def _run_config(cfg: VaepipeConfig, seed: int, steps: int, work: Path) -> VaepipeConfig:
    from pipeline.bench.overhead import bench_config

    base = bench_config(cfg, steps, system_metrics=False)
    return replace(base, train=replace(base.train, seed=seed, storage_path=str(work / "runs"), run_name=None),
                   tracking=replace(base.tracking, experiment="vaepipe-bench-quality"))

"""Checkpoint validation off the training path: a Ray Train validation task per checkpoint.

With ``train.validation=off_loop`` the ranks do not validate. Every checkpoint they report goes to
Ray Train's ``ValidationConfig`` function, which Ray runs as a task of its own (``train.val_cpus``
CPUs: the evaluation's code runs on CPU) while the ranks train on;
Ray's controller waits for the last one before ``fit`` returns. The task scores the checkpoint's
weights on the validation split with the evaluation's own code (``pipeline.evaluate.runner``): the
ELBO terms and active units, the IWAE bound with ``train.val_k`` importance samples, FID where
``train.val_fid_weights`` names the Inception weights. It logs them to MLflow at the checkpoint's
step, linked to that step's LoggedModel and to the shard set (name and manifest digest), re-runs
the model retention with them, and returns them:
Ray attaches them to the checkpoint (``Result.best_checkpoints``).

In local mode (``dist.num_workers=0``) the same function runs in the process, on each checkpoint
before it is reported (``LocalRank.report``), so a local-mode Tune trial reports the validated metrics.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.credentials import WorkerEnv
from pipeline.train.checkpoint import CKPT_TAG, STATE_FILE
from pipeline.train import weights_only
from pipeline.train.ema import EMA_DIR

MODEL_WAIT_S = 120.0  # the step's LoggedModel is logged through rank 0's queue, maybe after the report


@dataclass
class CheckpointValidator:
    """The ``ValidationFn``. The run's config and id, and the credentials the way the workers get
    them (``WorkerEnv``), are held here rather than passed as task arguments, which Ray keeps in the
    run's state for a validation it has to re-run."""

    config: dict  # the run's config, as the workers receive it (redacted)
    run_id: str
    env: WorkerEnv

    def __call__(self, checkpoint: Any, **_: Any) -> dict:
        from pipeline.config import from_dict

        self.env.apply()
        cfg = from_dict(self.config)
        with checkpoint.as_directory() as local:
            folder = Path(local)
            step = int(json.loads((folder / STATE_FILE).read_text())["train_state"]["step"])
            blob = checkpoint_blob(folder, cfg, self.config)
        metrics, objective = score(blob, cfg)
        record(self.env.tracking_uri, self.run_id, step, metrics, self.config, objective)
        return {**metrics, "step": step}


def validation_config(cfg: Any, loop_config: dict):
    """Ray Train's ``ValidationConfig`` for ``train.validation=off_loop``, else None."""
    if not cfg.train.off_loop:
        return None
    from ray.train import ValidationConfig

    return ValidationConfig(fn=validator(loop_config), ray_remote_kwargs={"num_cpus": cfg.train.val_cpus})


def validator(loop_config: dict) -> CheckpointValidator:
    return CheckpointValidator(loop_config["config"], loop_config["run_id"], loop_config["env"])


def checkpoint_blob(folder: Path, cfg: Any, config: dict) -> dict:
    """The weights the run releases at this checkpoint (its EMA where it keeps one), as the
    evaluation reads a logged model: ``{"model_config", "state_dict", "config"}``. ``cfg`` is the
    run's typed config, ``config`` the dict it came from (what the blob carries)."""
    from models import build_model
    from pipeline.train.export import weights_blob

    model = build_model(cfg.model)
    state = checkpoint_state_dict(folder, cfg.dist.zero_stage)
    if cfg.train.ema_rate:
        state = _with_ema(folder, model, state)
    model_config = {"name": cfg.model.name, **dict(getattr(model, "config", {}) or config["model"])}
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}  # as export_model logs them
    return weights_blob(model_config, state, config)


def checkpoint_state_dict(folder: Path, zero_stage: int) -> dict:
    """The model's full state dict from a checkpoint's DeepSpeed files: rank 0's module state
    (ZeRO 0-2 keep the whole model there), or DeepSpeed's consolidation of the ZeRO-3 partitions."""
    if zero_stage == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=CKPT_TAG))
    states = weights_only.load(str(folder / CKPT_TAG / "mp_rank_00_model_states.pt"))
    return dict(states["module"])


def _with_ema(folder: Path, model: torch.nn.Module, state: dict) -> dict:
    """``state`` with the weight EMA of rank 0 (ZeRO 0-2: every rank's average is the whole model)."""
    source = folder / EMA_DIR / "rank0.pt"
    if not source.is_file():
        return state
    shadow = torch.load(source, map_location="cpu", weights_only=True)["shadow"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return {**state, **dict(zip(names, shadow))}


def score(blob: dict, cfg: Any) -> tuple[dict, str]:
    """The validation metrics of ``blob`` on the validation split of the run's typed config ``cfg``,
    named as the in-loop ones are, and the name of the family's objective among them
    (``val_neg_elbo`` for the ELBO families)."""
    from models import objective_name
    from pipeline.evaluate.runner import EvalSpec, merge_partitions, score_partition

    t = cfg.train
    wanted = ["elbo", "au"] + (["neg_iwae_nats"] if t.val_k else []) + (["fid"] if t.val_fid_weights else [])
    spec = EvalSpec(metrics=wanted, split="valid", k=max(t.val_k, 1), batch_k=min(max(t.val_k, 1), 250),
                    batch_size=cfg.data.batch_size, max_samples=t.val_max_samples, seed=t.seed,
                    fid_weights=t.val_fid_weights)
    r = merge_partitions([score_partition(blob, cfg.data.path, spec, 0, 1)], spec)
    objective = f"val_{objective_name(cfg.model)}"
    out = {objective: -r["elbo"], "val_recon": r["recon"], "val_kl": r["kl"],
           "val_num_samples": r["num_samples"]}
    if r["kl_per_dim"].numel():
        out["val_active_units"] = float(r["active_units_kl"])
    for key in ("neg_iwae_nats", "fid"):
        if key in r:
            out[f"val_{key}"] = float(r[key])
    return {k: float(v) for k, v in out.items()}, objective


def record(uri: str, run_id: str, step: int, metrics: dict, config: dict, objective: str) -> Optional[str]:
    """Log ``metrics`` at ``step`` of the run, linked to that step's LoggedModel (waited for, where
    the run logs one there); then retention, now that the model carries its validation metrics.
    Returns the model id, or None."""
    from mlflow.entities import Metric

    from pipeline import logged_models
    from pipeline.tracking import make_client

    client = make_client(uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    t = config["tracking"]
    expected = t["log_model"] and (t["model_per_checkpoint"] or step >= config["train"]["max_steps"])
    model_id = _model_at(client, experiment_id, run_id, step, MODEL_WAIT_S if expected else 0.0)
    now, data = int(time.time() * 1000), _dataset(config["data"]["path"])
    client.log_batch(run_id, metrics=[Metric(k, v, now, step, model_id=model_id, **data) for k, v in metrics.items()],
                     synchronous=True)
    if model_id is not None:
        logged_models.prune(client, experiment_id, run_id, t["keep_models"], t["keep_best_models"],
                            t["best_metric"] or objective, t["best_mode"])
    return model_id


def _dataset(url: str) -> dict:
    """The shard set the metrics were computed on, as MLflow links a metric to its dataset."""
    from pipeline.data.shards import read_manifest
    from pipeline.lineage import dataset_digest, dataset_name

    return {"dataset_name": dataset_name(url), "dataset_digest": dataset_digest(read_manifest(url))}


def _model_at(client: Any, experiment_id: str, run_id: str, step: int, wait_s: float) -> Optional[str]:
    from pipeline import logged_models

    deadline = time.monotonic() + wait_s
    while True:
        found = logged_models.at_step(client, experiment_id, run_id, step)
        if found is not None or time.monotonic() >= deadline:
            return found.model_id if found is not None else None
        time.sleep(1.0)

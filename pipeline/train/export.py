"""A run's models: at each checkpoint (or only the end) gather the full weights and log them as
an MLflow pyfunc, one LoggedModel per step."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import to_dict, to_yaml
from pipeline.lineage import dataset_digest, dataset_name
from pipeline.redact import redact_config_dict


def gathered_state_dict(module: torch.nn.Module) -> dict:
    """Full fp32 weights on every rank (ZeRO-3 gathers its partitions collectively)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                for k, v in module.state_dict().items()}


def weights_blob(model_config: dict, state: dict, config: dict) -> dict:
    """What ``weights.pt`` holds: tensors, and redacted configs of JSON types only, so the blob
    loads with ``torch.load(weights_only=True)``."""
    plain = lambda d: json.loads(json.dumps(redact_config_dict(d)))  # noqa: E731
    return {"model_config": plain(model_config), "state_dict": state, "config": plain(config)}


def export_model(w: Any) -> None:
    """Gather full fp32 weights (all ranks, for ZeRO-3); rank 0 logs them as this step's LoggedModel.

    The logging goes through rank 0's queue (``pipeline.logger``), so an MLflow outage defers it and
    training goes on; the weights wait in a temporary folder until it is delivered."""
    module = w.engine.module
    state = gathered_state_dict(module)
    if w.rank != 0:
        return
    folder = Path(tempfile.mkdtemp(prefix="vaepipe-model-"))
    # the family's constructor args (what build_model needs), keyed by the registered name
    model_config = redact_config_dict({"name": w.cfg.model.name,
                                       **dict(getattr(module, "config", {}) or to_dict(w.cfg)["model"])})
    torch.save(weights_blob(model_config, state, to_dict(w.cfg)), folder / "weights.pt")
    t = w.cfg.tracking
    data = {"data": dataset_name(w.stream.url), "data_digest": dataset_digest(w.stream.manifest)}
    upload = CheckpointModel(w.log.client, w.log.run_id, folder, model_config, to_yaml(w.cfg), w.state.step,
                             weights_kind(w), data, (t.keep_models, t.keep_best_models,
                                                     t.best_metric or f"val_{w.objective}", t.best_mode))
    w.log.call(f"model@{w.state.step}", upload)


@dataclass
class CheckpointModel:
    """One queued logging call: the pyfunc of step ``step`` with the shard set as params (MLflow links
    the run's metrics of that step to it), the run's tags pointing at it, then retention
    (``pipeline.logged_models``). A retry after a failure does not log the model a second time."""

    client: Any
    run_id: str
    folder: Path
    model_config: dict
    config_yaml: str
    step: int
    weights: str
    data: dict  # the shard set's name and digest, the model's params
    retention: tuple  # keep_models, keep_best_models, best metric, mode
    model_uri: Optional[str] = None

    def __call__(self) -> None:
        from pipeline import logged_models
        from pipeline.serving import log_pyfunc

        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        if self.model_uri is None:  # a restarted run redoing this checkpoint finds its model in the run
            held = logged_models.at_step(self.client, experiment_id, self.run_id, self.step)
            self.model_uri = f"models:/{held.model_id}" if held is not None else None
        if self.model_uri is None:
            self.model_uri = log_pyfunc(self.run_id, self.folder / "weights.pt", self.model_config, self.config_yaml,
                                        step=self.step, tags={logged_models.STEP_TAG: str(self.step)},
                                        params={"step": self.step, **self.data})
        self.client.set_tag(self.run_id, "vaepipe.model_uri", self.model_uri)
        self.client.set_tag(self.run_id, "vaepipe.weights", self.weights)
        logged_models.prune(self.client, experiment_id, self.run_id, *self.retention)
        shutil.rmtree(self.folder, ignore_errors=True)


def weights_kind(w: Any) -> str:
    """Which weights the logged model holds, in words for the model card."""
    ema = getattr(w, "ema", None)
    if ema is None:
        return f"the trained weights at step {w.state.step}"
    return f"the EMA of the weights (rate {ema.rate}, {ema.updates} updates) at step {w.state.step}"

"""The end of a run: gather the full weights and log the model as an MLflow pyfunc."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.config import to_dict, to_yaml
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
    """Gather full fp32 weights (all ranks, for ZeRO-3) and let rank 0 log the pyfunc."""
    module = w.engine.module
    state = gathered_state_dict(module)
    if w.rank != 0:
        return
    from pipeline.serving import log_pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        # the family's constructor args (what build_model needs), keyed by the registered name
        model_config = redact_config_dict({"name": w.cfg.model.name,
                                           **dict(getattr(module, "config", {}) or to_dict(w.cfg)["model"])})
        torch.save(weights_blob(model_config, state, to_dict(w.cfg)), path)
        uri = log_pyfunc(w.log.run_id, path, model_config, to_yaml(w.cfg))
    w.log.tags({"vaepipe.model_uri": uri, "vaepipe.weights": weights_kind(w)})


def weights_kind(w: Any) -> str:
    """Which weights the logged model holds, in words for the model card."""
    ema = getattr(w, "ema", None)
    if ema is None:
        return f"the trained weights at step {w.state.step}"
    return f"the EMA of the weights (rate {ema.rate}, {ema.updates} updates) at step {w.state.step}"

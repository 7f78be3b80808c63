"""DeepSpeed checkpoint files loaded with ``torch.load(weights_only=True)``.

DeepSpeed loads every checkpoint file with ``weights_only=False``: unpickling such a file runs
whatever code it names, so a checkpoint folder on shared storage or S3 is code to whoever
resumes from it. The engine reads its model and ZeRO optimizer files through
``engine.checkpoint_engine.load`` (its checkpoint-engine interface); ``install`` makes that load
tensors, plain containers and the three DeepSpeed classes those files hold (``allowed``, found
by scanning the files of ZeRO 0-3 in fp32 and bf16 with
``torch.serialization.get_unsafe_globals_in_checkpoint``: the model-state files need none, the
ZeRO 1-3 optimizer files all three). Anything else is refused, naming the file and the class.

What stays ``weights_only=False`` is what DeepSpeed reads with ``torch.load`` itself, out of any
API's reach: universal conversion (``ds_to_universal``), the universal load, and the ZeRO-3
consolidation (``zero_to_fp32``) that off-loop validation uses.
"""

from __future__ import annotations

import functools
import pickle
from typing import Any

import torch


def allowed() -> list:
    """The non-tensor classes DeepSpeed writes into a checkpoint's model and optimizer files."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a DeepSpeed checkpoint file, tensors and the ``allowed`` classes only."""
    try:
        with torch.serialization.safe_globals(allowed()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise pickle.UnpicklingError(f"{path}: refused to load with weights_only=True, as vaepipe loads every "
                                     f"checkpoint file ({str(exc).splitlines()[0]})") from None


def install(engine: Any) -> None:
    """The engine's own loads (model states, ZeRO optimizer partitions) go through ``load``.
    Another checkpoint engine than DeepSpeed's torch one (Nebula, decoupled) keeps its loads."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(engine.checkpoint_engine) is TorchCheckpointEngine:
        engine.checkpoint_engine.__class__ = _weights_only_engine()  # its state (serialization) kept


@functools.cache
def _weights_only_engine() -> type:
    """DeepSpeed's torch checkpoint engine, loading through ``load`` (built on first use, so that
    importing this module does not import DeepSpeed)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    return type("WeightsOnlyCheckpointEngine", (TorchCheckpointEngine,),
                {"load": lambda self, path, map_location=None: load(path, map_location)})

"""Building a model whose parameters ZeRO-3 partitions from the first byte (``deepspeed.zero.Init``).

Under ZeRO-3 every parameter is partitioned the moment the module that owns it finishes its
``__init__``, so no rank ever holds the whole model, not even while it is built. What changes
for the code around the model:

- Initial weights: each rank draws them from the shared seed, then ``zero.Init`` broadcasts
  rank 0's values before partitioning, so every rank starts from the same model anyway.
- A model must not touch a submodule's parameters after that submodule's ``__init__`` returned
  (they are empty by then): the families do their custom initialisation inside the owning
  module (e.g. ``models.priors.MaskedLinear(init_scale=...)``).
- Inside the context DeepSpeed creates every floating tensor in the engine's dtype (bf16 with
  ``precision=auto`` here), buffers included; :func:`restore_fp32_buffers` gives the buffers
  back the fp32 they have without ``zero.Init`` (the norm layers' running statistics then
  follow the engine again through ``engine.match_norm_buffers``).
- Loading weights into a partitioned module needs its parameters gathered:
  :func:`load_state_into` does it with ``modifier_rank=0`` (rank 0's copy is re-partitioned).

DeepSpeed is imported inside the functions: only workers import it, after ``DS_ACCELERATOR``.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch


def is_partitioned(module: torch.nn.Module) -> bool:
    """True when ZeRO-3 already owns the module's parameters (built under ``zero.Init``)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def partitioned_build(ds_config: Optional[dict]) -> Iterator[None]:
    """``zero.Init`` for the engine described by ``ds_config`` when it is ZeRO-3, else nothing.

    ``mem_efficient_linear`` stays off: it would replace ``torch.nn.functional.linear`` for the
    whole process, and the families call ``F.linear`` with derived weights (masked MADE layers).
    """
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    import deepspeed

    # zero.Init reads the world size from deepspeed.comm, which deepspeed.initialize would only
    # set up later: join the process group Ray Train (or the caller) already made, as it will.
    deepspeed.init_distributed()
    with deepspeed.zero.Init(config_dict_or_path=ds_config, mem_efficient_linear=False):
        yield


def build_partitioned(build: Callable[[], torch.nn.Module], ds_config: Optional[dict]) -> torch.nn.Module:
    """``build()`` under :func:`partitioned_build`, with fp32 buffers as without it."""
    with partitioned_build(ds_config):
        model = build()
    if is_partitioned(model):
        restore_fp32_buffers(model)
    return model


def restore_fp32_buffers(model: torch.nn.Module) -> int:
    """Floating buffers back to fp32 (``zero.Init`` made them bf16/fp16); returns how many."""
    count = 0
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                buf.data = buf.data.float()
                count += 1
    return count


def load_state_into(module: torch.nn.Module, state: dict) -> None:
    """``module.load_state_dict(state)``, gathering ZeRO-3 partitions around it when there are any."""
    if not is_partitioned(module):
        module.load_state_dict(state)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
        module.load_state_dict(state)


def rank_parameter_elements(module: torch.nn.Module) -> int:
    """Parameter elements this rank stores: its ZeRO-3 partition, or every element."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())

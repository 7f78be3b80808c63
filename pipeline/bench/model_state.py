"""The model-state bytes one rank holds, read from its DeepSpeed engine, and DeepSpeed's estimates.

Parameters, gradients and optimizer state are found where DeepSpeed keeps them (the module's
parameters or their ZeRO-3 partitions; ``.grad`` and the ZeRO optimizers' gradient buffers;
fp32 master copies and the torch optimizer's moments) and counted once per storage, so a view
into a flat buffer never counts twice and a buffer counts with its padding. Whatever is found
first keeps its class: parameters, then gradients, then optimizer state (without ZeRO in fp32,
Adam's "master" weights *are* the parameters).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

GRAD_ATTRS = ("averaged_gradients", "ipg_buffer", "grad_partitions_flat_buffer", "fp32_groups_gradients_flat")
MASTER_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


class _Tally:
    """Bytes of storages not seen before."""

    def __init__(self):
        self.seen: set = set()

    def add(self, tensors) -> int:
        total = 0
        for t in tensors:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), t.device.type)
            if storage.nbytes() == 0 or key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes()
        return total


def _torch_optimizer(engine) -> Optional[torch.optim.Optimizer]:
    opt = engine.optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def held_bytes(engine) -> dict[str, int]:
    """``{"param_bytes", "grad_bytes", "optimizer_bytes"}`` this rank holds now (read after a backward)."""
    params = list(engine.module.parameters())
    wrapper, inner = engine.optimizer, _torch_optimizer(engine)
    tally = _Tally()
    param_bytes = tally.add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in params)
    masters = [t for a in MASTER_ATTRS for t in _tensors(getattr(wrapper, a, None))]
    grads = [p.grad for p in params if p.grad is not None]
    grads += [t for a in GRAD_ATTRS for t in _tensors(getattr(wrapper, a, None))]
    grads += [m.grad for m in masters if m.grad is not None]
    grad_bytes = tally.add(grads)
    state = list(_tensors(list(inner.state.values()))) if inner is not None else []
    inner_params = [p for g in inner.param_groups for p in g["params"]] if inner is not None else []
    optimizer_bytes = tally.add(masters + inner_params + state)
    return {"param_bytes": param_bytes, "grad_bytes": grad_bytes, "optimizer_bytes": optimizer_bytes}


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameters, the largest module's own parameters), as DeepSpeed's estimators count them."""
    own = [sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()]
    return sum(p.numel() for p in model.parameters()), max(own)


def deepspeed_estimate(total: int, largest: int, world: int, stage: int, offload_optimizer: bool,
                       offload_params: bool) -> dict[str, Optional[int]]:
    """DeepSpeed's model-state estimate per accelerator and per node (host), or None where it has none.

    These are the formulas ``estimate_zero2_model_states_mem_needs_all_live`` and
    ``estimate_zero3_model_states_mem_needs_all_live`` print for a live model (16-bit weights
    and gradients, fp32 master weights and Adam moments; host memory with a 1.5x buffer factor);
    called here for the one configuration measured instead of printed for all of them.
    There is no estimator for ZeRO 0 or 1.
    """
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        host, device = estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world,
                                                             cpu_offload=offload_optimizer)
    elif stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        host, device, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=world, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_params, zero_init=True)
    else:
        return {"ds_estimate_device_bytes": None, "ds_estimate_host_bytes": None}
    return {"ds_estimate_device_bytes": int(device), "ds_estimate_host_bytes": int(host)}

"""DeepSpeed's ZeRO-1/2 step with one finite check instead of two: the clipping norm's all-reduce.

Before its optimizer step, DeepSpeed 0.19's ZeRO-1/2 optimizer

1. scans every gradient tensor of its partition for inf/NaN (two reductions each) and
   MAX-all-reduces the flag (``check_overflow``; on under bf16 too, ``bf16.check_grad_overflow``),
2. then computes the clipping norm: an fp64 copy and a norm per gradient tensor, a SUM
   all-reduce, and the step counts as overflowed when that norm is not finite.

A non-finite gradient on any rank makes the summed norm non-finite on every rank, so step 2
alone already makes every rank skip the same step: step 1 is a second scan and a second
collective (MAX, so on gloo even where the shared-memory kernel carries SUMs) that decides
nothing new. ``install`` drops step 1 and computes step 2's local part over the flat gradient
partition in one fp32 norm (per tensor only where DeepSpeed keeps no flat partition); the SUM
all-reduce stays, and with it the agreement. fp32 accumulation is what
``torch.nn.utils.clip_grad_norm_`` uses; the clip factor moves in the 7th digit.

Under fp32 and fp16 DeepSpeed already skips step 1 (its scan runs only with
``check_grad_overflow``, on by default for bf16 alone); there only the norm is made leaner.

It applies only where that reasoning holds: a ``DeepSpeedZeroOptimizer`` that computes the norm
(``compute_grad_norm``, DeepSpeed's default) and treats a non-finite norm as an overflow (it
does, except under bf16 with ``check_grad_overflow=false``), without CPU offload (its norm and
overflow come from per-parameter hooks), MoE layers, model parallelism or ZenFlow. Anything
else keeps DeepSpeed's step as it is; ``optim.lean_zero_step=false`` keeps it everywhere.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def install(engine: Any) -> bool:
    """Patch ``engine``'s ZeRO-1/2 optimizer (this instance only); False where it does not apply."""
    opt = getattr(engine, "optimizer", None)
    if not applies(opt):
        return False
    opt.check_overflow = _decided_by_the_norm  # the instance attribute shadows the method
    opt.scaled_global_norm = types.MethodType(flat_global_norm, opt)
    return True


def applies(opt: Any) -> bool:
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:
        return False
    if not isinstance(opt, DeepSpeedZeroOptimizer):
        return False
    marks_overflow = opt.check_grad_overflow or opt.dtype != torch.bfloat16  # step() reads a bad norm as overflow
    return (opt.compute_grad_norm and marks_overflow and not opt.cpu_offload and not opt.has_moe_layers
            and not opt.zenflow and opt.mpu is None and not opt.groups_lacking_loss_scale)


def _decided_by_the_norm(partition_gradients: bool = True) -> None:
    """DeepSpeed's separate scan, dropped: ``step`` leaves ``overflow`` False and then sets it
    from the norm, which is not finite on any rank when a gradient is not finite on one."""


def flat_global_norm(opt: Any, norm_type: int = 2) -> torch.Tensor:
    """The L2 norm of all ranks' gradient partitions (each rank holds its own): one fp32 norm per
    group's flat partition, squared, summed over the data-parallel group, rooted."""
    if norm_type != 2:
        raise ValueError(f"norm_type={norm_type}: only the L2 norm is supported")
    local = torch.zeros((), dtype=torch.float32, device=opt.device)
    for i in range(len(opt.bit16_groups)):
        for g in local_gradients(opt, i):
            local += torch.linalg.vector_norm(g, 2.0, dtype=torch.float32).square()
    from deepspeed import comm as dist

    total = local.reshape(1)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=opt.dp_process_group)
    return total[0].sqrt()


def local_gradients(opt: Any, group: int) -> list[torch.Tensor]:
    """This rank's reduced gradients of ``group``: the flat partition where DeepSpeed keeps one,
    else its tensors (zero padding left out, as DeepSpeed's own norm does)."""
    flat = opt._get_preflattened_grad_partition(group)
    if flat is not None:
        return [flat]
    grads = opt.averaged_gradients[group] or []
    return [g for g in grads if g is not None and not getattr(g, "_zero_padding", False)]

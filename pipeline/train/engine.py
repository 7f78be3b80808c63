"""Everything DeepSpeed decides, decided once.

``build_deepspeed_config`` is the only place that turns the typed config into a DeepSpeed
config dict: ZeRO stage and offload, precision, gradient accumulation, clipping and the
optimizer. ``build_engine`` is the only place the loop's engines are made from it (the first
stage's and each progressive growth's alike). The training loop never re-decides any of these.
DeepSpeed itself is imported
inside functions because it must only be imported in the process that trains (a Ray worker, or
the caller in local mode), after ``DS_ACCELERATOR`` is set.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import torch

from pipeline.config import VaepipeConfig

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class DeviceFacts:
    """What precision choice depends on, gathered once so the choice is testable."""

    cuda: bool
    cuda_capability: tuple[int, int] = (0, 0)
    cpu_fast_bf16: bool = False

    @classmethod
    def detect(cls, use_cuda: bool) -> "DeviceFacts":
        if use_cuda and torch.cuda.is_available():
            return cls(cuda=True, cuda_capability=torch.cuda.get_device_capability())
        return cls(cuda=False, cpu_fast_bf16=cpu_has_fast_bf16())


def cpu_has_fast_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True only with AMX tiles: AVX512-BF16 alone converts but multiplies slower than fp32
    (measured ~2x slower on the EPYC CI machines), so it does not count as fast."""
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return "amx_bf16" in flags.split()


def resolve_precision(requested: str, facts: DeviceFacts) -> Precision:
    """``auto`` -> bf16 on Ampere+ GPUs or AMX CPUs, fp16 (+loss scaling) on older GPUs, else fp32."""
    if requested == "fp16" and not facts.cuda:
        raise ValueError("train.precision=fp16 needs a CUDA device; DeepSpeed has no fp16 on CPU (use fp32 or bf16)")
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if facts.cuda:
        return "bf16" if facts.cuda_capability >= (8, 0) else "fp16"
    return "bf16" if facts.cpu_fast_bf16 else "fp32"


def input_dtype(precision: str) -> torch.dtype:
    """The dtype a batch is cast to before it enters an engine of ``precision``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def match_norm_buffers(model: torch.nn.Module, precision: str) -> int:
    """Give normalisation layers' running statistics the engine's dtype; returns how many layers.

    A bf16/fp16 DeepSpeed engine casts parameters, not buffers, and BatchNorm's kernels refuse
    an fp32 running mean beside bf16 weights ("expected scalar type BFloat16"). Other buffers
    (VQ-VAE's EMA statistics, masks) keep fp32 and the models cast them where they are used.
    Only the buffers are cast: the engine casts the parameters itself, and under ZeRO-3 they
    are partitioned already (``Module.to`` would rewrite their empty placeholders).
    """
    dtype = input_dtype(precision)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        for buf in m.buffers(recurse=False):
            if buf.is_floating_point():
                buf.data = buf.data.to(dtype)
    return len(norms) if dtype != torch.float32 else 0


def build_deepspeed_config(cfg: VaepipeConfig, world_size: int, precision: Precision,
                           sum_gradients: bool = False) -> dict:
    """The DeepSpeed config dict for this run (``precision`` already resolved for the device).

    ``sum_gradients`` (the training loop's engines): under ZeRO 0-2 on several ranks DeepSpeed
    all-reduces gradient sums, and the loop multiplies each rank's loss by ``backward_scale``
    (1/world) before backward, one scalar, instead of DeepSpeed dividing every gradient bucket
    after it (a pass over all gradients each step). The gradients are the ranks' mean either way.
    """
    o, s = cfg.optim, cfg.dist
    zero: dict = {"stage": s.zero_stage}
    if s.zero_stage >= 1 and s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(s.gpus_per_worker)}
    if s.zero_stage == 3:
        # DeepSpeed keeps parameters under 1e5 elements replicated by default, which for a VAE
        # is most of them: partition every parameter so stage 3 really shards the model.
        zero["stage3_param_persistence_threshold"] = 0
        if s.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": bool(s.gpus_per_worker)}
    optimizer_type = "AdamW" if o.name == "adamw" else "Adam"
    ds: dict = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * world_size,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": optimizer_type,
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "weight_decay": o.weight_decay,
                # DeepSpeed's fused CPU Adam needs a C++ build; torch's Adam is plenty here
                # and behaves identically across ZeRO stages.
                "torch_adam": True,
                "adam_w_mode": o.name == "adamw",
                "fused": o.fused,
            },
        },
        # With optimizer offload DeepSpeed insists on its compiled CPU Adam unless told otherwise.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # we log ourselves, rank 0 only
        "wall_clock_breakdown": False,
    }
    if sum_gradients and world_size > 1 and s.zero_stage < 3:  # DeepSpeed has no sum mode for ZeRO-3
        ds["gradient_allreduce_op"] = "sum"
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return ds


def build_engine(cfg: VaepipeConfig, model: torch.nn.Module, world_size: int, precision: Precision,
                 ds_config: Optional[dict] = None) -> Any:
    """The training loop's DeepSpeed engine for ``model``: only trainable parameters in Adam,
    gradients summed over ranks (``backward_scale``), and the lean ZeRO-1/2 step where it applies
    (``optim.lean_zero_step``), and VDVAE's gradient skipping (``optim.skip_threshold``, the gate
    left on ``engine.vaepipe_grad_gate``). ``ds_config``: the one the model was built under, if it was (ZeRO-3's
    ``zero.Init``); it must come from ``build_deepspeed_config(..., sum_gradients=True)``."""
    import deepspeed

    from pipeline.train import grad_skip, weights_only, zero_step

    match_norm_buffers(model, precision)
    if ds_config is None:
        ds_config = build_deepspeed_config(cfg, world_size, precision, sum_gradients=True)
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen parents stay out of Adam
    ds_config = size_reduce_bucket(ds_config, trainable)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    weights_only.install(engine)  # its checkpoint loads: tensors and DeepSpeed's own few classes, no code
    if cfg.optim.lean_zero_step and not on_cuda(cfg):  # measured on CPUs only: CUDA keeps DeepSpeed's step
        zero_step.install(engine)
    # after the lean step, so the gate wraps the norm the step really uses
    engine.vaepipe_grad_gate = grad_skip.install(engine, cfg.optim.skip_threshold)
    return engine


def destroy_process_group() -> None:
    """End this process's process group with DeepSpeed's own ``destroy_process_group``, which also
    drops the groups DeepSpeed cloned from it: a later engine in the same process (local mode's
    next run) must not reach a destroyed group through them."""
    import torch.distributed as dist

    if "deepspeed" in sys.modules:
        import deepspeed.comm

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
            return
    if dist.is_initialized():
        dist.destroy_process_group()


def on_cuda(cfg: VaepipeConfig) -> bool:
    """Whether this run's ranks train on CUDA (GPUs asked for and present)."""
    return cfg.dist.gpus_per_worker > 0 and torch.cuda.is_available()


DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)


def size_reduce_bucket(ds_config: dict, trainable: list[torch.nn.Parameter]) -> dict:
    """``ds_config`` with ZeRO-1/2's gradient bucket no larger than the trainable parameters.

    DeepSpeed's ZeRO-1/2 optimizer allocates a fresh bucket of ``reduce_bucket_size`` elements
    every micro-step (its default, 5e8, is 1 GB in bf16): on CPU glibc maps and unmaps it each
    time and faults in every page the gradients touch again. A bucket of all trainable elements
    holds the same gradients and is reduced in the same single call at the end of backward, as
    the default is for any model under 5e8 parameters; only the allocation shrinks. ZeRO-3
    keeps its buffers and any size set explicitly is left alone.
    """
    zero = ds_config["zero_optimization"]
    if zero["stage"] not in (1, 2) or "reduce_bucket_size" in zero:
        return ds_config
    numel = sum(p.numel() for p in trainable)
    return {**ds_config, "zero_optimization": {**zero, "reduce_bucket_size": min(DEEPSPEED_REDUCE_BUCKET, max(numel, 1))}}


def backward_scale(engine: Any) -> float:
    """What a rank's loss is multiplied by before ``engine.backward``: 1/(data-parallel world) where
    the engine sums gradients over ranks (``sum_gradients``), so they come out as the mean."""
    return 1.0 if getattr(engine, "gradient_average", True) else 1.0 / engine.dp_world_size


def set_accelerator_env(use_cuda: bool) -> None:
    """DeepSpeed picks its accelerator at import; make the CPU choice explicit where there is no GPU."""
    if not use_cuda or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")

"""Growing a progressive model between phases: rebuild the DeepSpeed engine, carry the state over.

A phase (``stages.Phase``: stage, frozen or not) fixes the parameter set and the micro-batch,
which a DeepSpeed engine cannot change once built. On a phase change every rank, together:

1. reads each parameter's full fp32 master value (and, with ``progressive.carry_moments``,
   Adam's two moments) out of the old engine; DeepSpeed's ``safe_get_full_*`` gather them
   from whatever ZeRO stage 0-3 partitioned them into (collective under ZeRO-3);
2. builds the next stage's model (new blocks from a seed shared by every rank), writes the
   saved values into the parameters that already existed, freezes the old ones for a frozen
   phase, builds a new engine from the stage's config (micro-batch, accumulation, lr) and
   writes the fp32 values into its masters too (under bf16 they were built from bf16 copies);
3. writes the carried moments into the new optimizer's partitions;
4. points the stream at the stage's resolution and micro-batch.

Adam's step counter is not carried: a new optimizer starts its bias correction again, which
for carried moments scales the first updates down, never up.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from pipeline.train.model_options import apply_model_options
from pipeline.train.engine import build_engine
from pipeline.stages import Phase, build_stages, phase_at, stage_config

MOMENTS = ("exp_avg", "exp_avg_sq")


def build_stage_model(base_cfg: Any, phase: Phase) -> torch.nn.Module:
    """The progressive model at ``phase``'s stage, fresh weights from a seed shared by all ranks.

    The rank's own RNG stream (reparameterisation noise) is left where it was.
    """
    from models import build_model
    from pipeline.config import to_dict

    model_cfg = {**to_dict(base_cfg)["model"], "stage_resolution": phase.stage.resolution,
                 "start_resolution": base_cfg.progressive.start_resolution}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base_cfg.train.seed + phase.stage.index)
        model = build_model(model_cfg)
    model.set_alpha(phase.alpha)
    apply_model_options(model, base_cfg.train)
    return model


def full_parameter_state(engine: Any, carry_moments: bool) -> dict[str, dict[str, torch.Tensor]]:
    """name -> {"param": fp32 value[, moments]}, full (unpartitioned) on every rank, on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if carry_moments:
        init_adam_state(engine)  # an engine that has not stepped yet has zero moments, not none
    out = {}
    for name, p in engine.module.named_parameters():
        value = safe_get_full_fp32_param(p) if p.requires_grad else None
        entry = {"param": (value if value is not None else _plain_value(engine, p)).detach().float().cpu().clone()}
        if carry_moments and p.requires_grad:
            for key in MOMENTS:
                m = safe_get_full_optimizer_state(p, key)
                m = m if m is not None else engine.optimizer.state.get(p, {}).get(key)
                if m is not None:
                    entry[key] = m.detach().float().cpu().clone()
        out[name] = entry
    return out


def _plain_value(engine: Any, p: torch.nn.Parameter) -> torch.Tensor:
    """A parameter DeepSpeed keeps no fp32 master of (ZeRO-0 fp32, or frozen): its own data."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            return p.data.float().clone()
    return p.data


def write_parameters(model: torch.nn.Module, saved: dict, fp32_frozen: dict) -> int:
    """Copy saved values into the parameters of ``model`` that existed before; returns how many."""
    count = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = fp32_frozen.get(name, saved.get(name, {}).get("param"))
            if src is not None and src.shape == p.shape:
                p.copy_(src)
                count += 1
    return count


def write_masters(engine: Any, saved: dict) -> int:
    """The saved fp32 values into the new engine's fp32 masters; how many parameters.

    Under bf16 DeepSpeed builds its masters from the bf16-cast module, which would round every
    carried parameter at each stage switch; fp32 engines without ZeRO have no separate master.
    """
    from deepspeed.utils import safe_set_full_fp32_param

    count = 0
    for name, p in engine.module.named_parameters():
        if not p.requires_grad or name not in saved:
            continue
        if hasattr(p, "ds_id"):
            _set_zero3_state(p, saved[name]["param"], None)
        elif hasattr(p, "_hp_mapping"):
            safe_set_full_fp32_param(p, saved[name]["param"].to(p.device))
        else:
            continue
        count += 1
    return count


def write_moments(engine: Any, saved: dict) -> int:
    """Carried Adam moments into the new engine's optimizer (its partitions under ZeRO); how many."""
    from deepspeed.utils import safe_set_full_optimizer_state

    init_adam_state(engine)
    count = 0
    for name, p in engine.module.named_parameters():
        entry = saved.get(name, {})
        if not p.requires_grad or not all(k in entry for k in MOMENTS):
            continue
        for key in MOMENTS:
            if hasattr(p, "ds_id"):
                _set_zero3_state(p, entry[key], key)
            elif hasattr(p, "_hp_mapping"):
                safe_set_full_optimizer_state(p, entry[key].to(p.device), key)
            else:  # plain torch Adam (ZeRO-0 fp32): the state it would have after its own steps
                state = engine.optimizer.state[p]
                state.setdefault("step", torch.tensor(1.0))
                state[key] = entry[key].to(p.device).clone()
        count += 1
    return count


def _set_zero3_state(p: torch.nn.Parameter, value: torch.Tensor, key: Optional[str]) -> None:
    """This rank's slice of a full optimizer state tensor (``key``) or fp32 master (None) into its
    ZeRO-3 partition.

    DeepSpeed 0.19.8's ``set_full_hp_param`` slices past the end of a parameter whose size is not
    a multiple of the world size (the last partition is padded), so the slice is taken here.
    """
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(p)
    chunk = value.flatten()[start:start + part.numel()].to(part.device)
    part.data.zero_()
    part.data[:chunk.numel()].copy_(chunk)


def init_adam_state(engine: Any) -> None:
    """Create Adam's (zero) state now rather than at the first step, so moments can be written in.

    ZeRO 1-2 and DeepSpeed's bf16 optimizer keep one flat fp32 partition per group and link each
    parameter's fragment of its state only after the first step; ZeRO-3 creates its state when
    built. Step counters start at 0, as a fresh optimizer's.
    """
    opt = engine.optimizer
    flats = next((getattr(opt, a) for a in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                                            "fp32_partitioned_groups_flat") if getattr(opt, a, None)), None)
    if not flats or not hasattr(opt, "optimizer"):
        return  # plain torch Adam (ZeRO-0 fp32): write_moments fills its per-parameter state
    for flat in flats:
        state = opt.optimizer.state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(flat))
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # (re)link every fragment: a checkpoint load re-creates the mappings without their state
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


class Growth:
    """A progressive run's stages and the phase its engine is built for (one per rank)."""

    def __init__(self, base_cfg: Any, world_size: int, precision: str) -> None:
        self.base_cfg, self.world_size, self.precision = base_cfg, world_size, precision
        self.stages = build_stages(base_cfg)
        self.phase: Optional[Phase] = None
        self.fp32_frozen: dict[str, torch.Tensor] = {}  # masters of frozen params (bf16 copies would round)

    def phase_at(self, images_seen: int) -> Phase:
        return phase_at(self.stages, images_seen, self.base_cfg.progressive.freeze_images)

    def build(self, phase: Phase, saved: Optional[dict] = None) -> tuple[Any, Any]:
        """(stage config, engine) for ``phase``, with ``saved`` parameters and moments written in."""
        model = build_stage_model(self.base_cfg, phase)
        saved = saved or {}
        write_parameters(model, saved, self.fp32_frozen)
        new = set(model.new_parameter_names())
        self.fp32_frozen = {}
        if phase.frozen:
            for name, p in model.named_parameters():
                if name not in new:
                    p.requires_grad_(False)
                    self.fp32_frozen[name] = p.detach().clone()
        cfg = stage_config(self.base_cfg, phase.stage)
        engine = build_engine(cfg, model, self.world_size, self.precision)
        write_masters(engine, saved)
        if self.base_cfg.progressive.carry_moments:
            write_moments(engine, saved)
        self.phase = phase
        return cfg, engine

    def switch(self, w: Any, phase: Phase, transfer: bool = True) -> None:
        """Rebuild ``w``'s engine for ``phase`` (collective) and reshape its stream."""
        saved = full_parameter_state(w.engine, self.base_cfg.progressive.carry_moments) if transfer else None
        w.engine.destroy()
        w.cfg, w.engine = self.build(phase, saved)
        w.stream.set_shape(phase.stage.resolution, phase.stage.batch_size)

    def set_alpha(self, w: Any, images_seen: int) -> Phase:
        """The phase at ``images_seen``; alpha is written into the model (no rebuild here)."""
        phase = self.phase_at(images_seen)
        w.engine.module.set_alpha(phase.alpha)
        return phase

    def prepare_restore(self, w: Any, train_state: dict) -> None:
        """Before a checkpoint loads: rebuild (no transfer) for the phase it was saved in."""
        phase = self.phase_at(int(train_state.get("samples_seen", 0)))
        if self.phase is None or phase.key != self.phase.key:
            self.switch(w, phase, transfer=False)
        w.engine.module.set_alpha(phase.alpha)

    def after_restore(self, w: Any) -> None:
        """Frozen parameters' masters from the loaded weights (they are not in the optimizer)."""
        params = dict(w.engine.module.named_parameters())
        self.fp32_frozen = {n: _plain_value(w.engine, params[n]).float().cpu().clone() for n in self.fp32_frozen}

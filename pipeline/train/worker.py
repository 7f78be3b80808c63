"""Setting one Ray Train rank up: typed config, model, DeepSpeed engine, data stream, resume.

The Ray boundary is thin: a worker receives a plain dict (see ``trainer.run_training``) and
rebuilds the typed config first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from pipeline.config import VaepipeConfig, from_dict
from pipeline.logger import RankZeroLogger
from pipeline.seeds import mixed_seeds
from pipeline.train.auxiliary import AuxiliaryTrainer
from pipeline.train.checkpoint import restore
from pipeline.train.ema import WeightEMA
from pipeline.train.model_options import apply_model_options
from pipeline.train import host_memory, local_allreduce
from pipeline.train.collectives import sum_over_ranks
from pipeline.train.timers import PhaseClock, activate, clock_for, patch_collectives
from pipeline.train.engine import (
    DeviceFacts, build_deepspeed_config, build_engine, resolve_precision, set_accelerator_env,
)
from pipeline.train.zero_init import build_partitioned, load_state_into


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    grad_norm_skips: int = 0  # updates over optim.skip_threshold (VDVAE's gradient skipping)
    lr_scale: float = 1.0  # times optim.lr: halved (train.rollback_lr_factor) at each divergence rollback
    rollbacks: int = 0  # train.on_divergence=rollback restores so far
    corrupt_samples: int = 0
    samples_seen: int = 0  # images trained on, summed over ranks (a progressive run's clock)
    stage: int = 0  # progressive growing: stage index, its resolution and alpha after the last step
    resolution: int = 0
    alpha: float = 1.0
    history: list = field(default_factory=list)  # (step, loss) at each log, for the resumed curve

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@dataclass
class Worker:
    cfg: VaepipeConfig
    engine: Any
    stream: Any
    state: TrainState
    log: RankZeroLogger
    device: torch.device
    rank: int
    world_size: int
    precision: str
    resumed_from: Optional[int] = None
    fault: dict = field(default_factory=dict)
    last_val: dict = field(default_factory=dict)  # latest validation metrics, reported with checkpoints
    last_kl_dims: Optional[torch.Tensor] = None  # per-dimension KL of the latest log window
    aux: Optional[AuxiliaryTrainer] = None  # a family's second optimizer (Factor-VAE discriminator)
    objective: str = "neg_elbo"  # what -elbo is for this family (models.objective_name)
    clock: Optional[PhaseClock] = None  # per-phase step time (train.phase_timers)
    growth: Optional[Any] = None  # a progressive run's stages and engine rebuilds (growth.Growth)
    ema: Optional[WeightEMA] = None  # the weight EMA that validation, images and export use (train.ema_rate)
    run_dir: Optional[str] = None  # the run folder (local or s3://): where a divergence rollback looks
    ctx: Any = None  # what launched this rank: reports, launch checkpoint, preemption (rank_context)


def build_model_for_rank(cfg: VaepipeConfig, loop_config: dict, ds_config: Optional[dict] = None) -> torch.nn.Module:
    """The family's model with its parent weights and rank-summed statistics wired in.

    With ZeRO-3 in ``ds_config`` the model is built under ``deepspeed.zero.Init`` (see
    ``zero_init``): every rank holds only its partition from the start.
    """
    from models import build_model

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_partitioned(lambda: build_model(cfg.model), ds_config)
    if loop_config.get("parent_state") is not None:
        # vq_prior: the frozen VQ-VAE's weights (gathered, loaded on rank 0, re-partitioned under ZeRO-3)
        load_state_into(model.parent, loop_config["parent_state"])
    if hasattr(model, "set_stat_reducer"):
        # VQ-VAE's EMA codebook statistics are summed over ranks so every rank keeps the same codebook
        model.set_stat_reducer(sum_over_ranks)
    apply_model_options(model, cfg.train)
    return model


def seed_rank(seed: int, rank: int) -> int:
    """Re-seed torch (every device) with a seed of its own for this rank; returns that seed.

    Called once the model is built from the shared ``seed`` (identical initial weights on every
    rank): from here reparameterisation noise, dropout masks and Factor-VAE's permutations are
    independent across ranks instead of N copies of one draw. Data order is not affected:
    ShardStream seeds its own ``random.Random`` instances from ``cfg.train.seed``. SeedSequence
    mixes (seed, rank) (``pipeline.seeds``), so no rank of one run replays another run's seed
    (``seed + rank`` would).
    """
    (rank_seed,) = mixed_seeds(seed, rank)
    torch.manual_seed(rank_seed)
    return rank_seed


def build_rank_modules(cfg: VaepipeConfig, loop_config: dict, rank: int, device: torch.device,
                       ds_config: Optional[dict] = None) -> tuple[torch.nn.Module, Optional[AuxiliaryTrainer]]:
    """Model and auxiliary trainer from the shared seed, then this rank's own RNG stream.

    ``ds_config`` defaults to the one ``build_worker`` makes (this process group's world size,
    the precision resolved for ``device``), so callers outside Ray build the model the same way.
    """
    if ds_config is None:
        ds_config = default_deepspeed_config(cfg, device)
    model = build_model_for_rank(cfg, loop_config, ds_config)
    aux = AuxiliaryTrainer.for_model(model, device)  # broadcast from rank 0 anyway
    seed_rank(cfg.train.seed, rank)
    return model, aux


def build_rank_engine(cfg: VaepipeConfig, loop_config: dict, rank: int, world: int, device: torch.device,
                      precision: str) -> tuple[Any, Optional[AuxiliaryTrainer]]:
    """(the loop's engine, the auxiliary trainer) of one rank of a single-resolution run: the model
    built under the engine's own DeepSpeed config (ZeRO-3's ``zero.Init`` needs it), then
    ``engine.build_engine``. The bench's engine ranks build theirs here too."""
    ds_config = build_deepspeed_config(cfg, world, precision, sum_gradients=True)
    model, aux = build_rank_modules(cfg, loop_config, rank, device, ds_config)
    return build_engine(cfg, model, world, precision, ds_config), aux


def build_progressive_engine(cfg: VaepipeConfig, rank: int, world: int, precision: str):
    """(first stage's config, its engine, no auxiliary, the run's Growth); a resume rebuilds for
    the phase its checkpoint was saved in (``checkpoint._try_load``)."""
    from pipeline.train.growth import Growth

    growth = Growth(cfg, world, precision)
    stage_cfg, engine = growth.build(growth.phase_at(0))
    seed_rank(cfg.train.seed, rank)
    return stage_cfg, engine, None, growth


def default_deepspeed_config(cfg: VaepipeConfig, device: torch.device) -> dict:
    """``build_deepspeed_config`` for this process group and the precision ``device`` resolves to."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    precision = resolve_precision(cfg.train.precision, DeviceFacts.detect(device.type == "cuda"))
    return build_deepspeed_config(cfg, world, precision)


@dataclass
class RankProcess:
    """What ``prepare_rank_process`` set up in this process, before any engine exists."""

    retained_freed_memory: bool  # glibc keeps the memory a step frees (dist.retain_freed_memory)
    shm: bool  # the shared-memory all-reduce is prepared: install it once the engine is built


def prepare_rank_process(cfg: VaepipeConfig, use_cuda: bool, world: int, local_world: int) -> RankProcess:
    """The process-wide set-up every rank needs, in the order it needs it: glibc's thresholds
    before the model allocates; DS_ACCELERATOR before DeepSpeed is imported (inside the worker,
    by ``engine.build_engine``); the collectives wrapped and the shared-memory segment prepared
    before DeepSpeed's comm backend keeps its own references. The Ray worker and the bench's
    engine ranks both start here."""
    retained = host_memory.retain_freed_memory(cfg.dist.retain_freed_memory)
    set_accelerator_env(use_cuda)
    patch_collectives()
    shm = local_allreduce.wanted(cfg.dist.shm_allreduce, use_cuda, world, local_world) and local_allreduce.prepare(world)
    return RankProcess(retained, shm)


def build_worker(loop_config: dict, ctx: Any) -> Worker:
    """Set up one rank: typed config, model, DeepSpeed engine, data stream, resume state.
    ``ctx`` is what launched the rank (``rank_context``: a Ray Train worker or local mode)."""
    loop_config["env"].apply()  # MLflow's URI and credentials, kept out of the (redacted) config
    cfg = from_dict(loop_config["config"])
    rank, world = ctx.rank, ctx.world_size
    use_cuda = cfg.dist.gpus_per_worker > 0
    proc = prepare_rank_process(cfg, use_cuda, world, ctx.local_world_size)

    from pipeline.data.stream import ShardStream

    if not use_cuda:  # one torch thread per reserved CPU, whatever OMP_NUM_THREADS the driver's env passed on
        torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    device = ctx.cuda_device() if use_cuda else torch.device("cpu")
    precision = resolve_precision(cfg.train.precision, DeviceFacts.detect(use_cuda))
    if cfg.progressive.enabled:
        cfg, engine, aux, growth = build_progressive_engine(cfg, rank, world, precision)
    else:
        engine, aux = build_rank_engine(cfg, loop_config, rank, world, device, precision)
        growth = None
    if proc.shm:
        local_allreduce.install()
    stream = ShardStream(
        cfg.data.path, "train", cfg.data.batch_size, cfg.data.resolution, rank, world,
        seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        num_workers=cfg.data.loader_workers, channels=cfg.data.channels, binarize=cfg.data.binarize,
        cache_mb=cfg.data.cache_mb,
    )
    log = RankZeroLogger(loop_config["env"].tracking_uri, loop_config["run_id"], enabled=rank == 0)
    from models import objective_name

    worker = Worker(cfg, engine, stream, TrainState(), log, device, rank, world, precision,
                    fault=loop_config.get("fault", {}), aux=aux, objective=objective_name(cfg.model),
                    clock=clock_for(cfg.train.phase_timers, use_cuda), growth=growth,
                    ema=WeightEMA(engine.module, cfg.train.ema_rate, cfg.train.ema_warmup) if cfg.train.ema_rate else None,
                    run_dir=loop_config.get("run_dir"), ctx=ctx)
    activate(worker.clock)
    # what Ray's OMP_NUM_THREADS gave each rank, and whether glibc keeps freed memory
    log.tags({"vaepipe.torch_threads": torch.get_num_threads(), "vaepipe.retain_freed_memory": proc.retained_freed_memory})
    restore(worker, loop_config.get("run_dir"), loop_config.get("resume_from"))
    return worker

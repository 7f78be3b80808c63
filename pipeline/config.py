"""The one typed configuration tree of vaepipe.

Defaults (these dataclasses) <- a YAML job file <- dotted CLI overrides
(``model.latent_dim=128``), merged with OmegaConf's structured mode so an unknown key
or a value of the wrong type fails at once, naming the key. ``validate`` then checks
what types cannot say (ranges, combinations) before any Ray worker starts.

The tree crosses the Ray boundary as a plain dict (``to_dict``) and is rebuilt with
``from_dict`` inside each worker, so workers always see the same validated config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.redact import redact_config_dict


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key and the value."""


@dataclass
class DataConfig:
    path: str = "data/shards/synth64"
    """Shard set: a local folder, ``file://`` or ``s3://bucket/prefix`` holding manifest.json."""
    resolution: int = 64
    """Resolution fed to the model; shards are resized on the fly (must be <= stored resolution)."""
    channels: int = 3
    """3 for RGB, 1 to convert images to grayscale."""
    batch_size: int = 32
    """Micro-batch per worker; the global batch is batch_size * num_workers * grad_accum_steps."""
    shuffle_buffer: int = 1000
    """Samples held in the streaming shuffle buffer."""
    loader_workers: int = 1
    """DataLoader processes decoding images inside each Ray worker (0 = decode in the train loop)."""
    cache_mb: int = 0
    """Keep each rank's decoded, resized images in memory (up to this many MB) so epochs after
    the first skip JPEG decoding, as a trainer holding the data set in memory does; the shard
    order, shuffle and resume position are unchanged. 0 = off. Needs loader_workers=0 (a
    DataLoader's worker processes end with each epoch and would take the cache with them)."""
    val_batches: int = 4
    """Validation batches per rank at each evaluation (0 disables validation)."""
    bits: int = 8
    """Bit depth the discretised likelihood models (1-8): 8 for ordinary images, 5 for the 5-bit
    CelebA-HQ 256 numbers of NVAE/VDVAE. Images are rounded to 2**bits levels by the likelihood
    itself, so one shard set serves both. Only families whose likelihood takes it accept != 8."""
    binarize: Literal["none", "static", "dynamic"] = "none"
    """Bernoulli binarisation after resize/grayscale, pixel intensity as probability: ``static`` =
    one draw per image fixed by its key (Larochelle), ``dynamic`` = a fresh draw every epoch
    (Salakhutdinov & Murray; the standard of published MNIST NLLs). Validation and evaluation
    read the static draw in both cases, so their numbers are reproducible."""


@dataclass
class FactorVAEConfig:
    gamma: float = 10.0
    """Weight of the total-correlation penalty gamma * TC(z)."""
    disc_hidden: Optional[int] = None
    """Width of the TC discriminator MLP (unset: the flavor's, 1000 for base)."""
    disc_layers: Optional[int] = None
    """Hidden layers of the TC discriminator (unset: the flavor's, 6 for base)."""
    disc_lr: float = 1e-4
    """Learning rate of the discriminator's own Adam."""
    disc_betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    """Adam betas of the discriminator."""


@dataclass
class LadderConfig:
    latent_dims: Optional[list[int]] = None
    """Latent dims per level, bottom (z_1, next to x) to top (z_L); the length is the number of levels
    (unset: the flavor's, [32, 16, 8] for base)."""
    merge: Literal["precision", "residual"] = "precision"
    """Posterior of a level: Ladder-VAE precision-weighted merge, or the NVAE/VDVAE residual form."""
    hidden: Optional[int] = None
    """Width of the deterministic MLPs between levels (unset: the flavor's, 256 for base)."""
    min_std: float = 1e-3
    """Floor of every scale (softplus + floor): keeps deep hierarchies finite."""


@dataclass
class VQConfig:
    codebook_size: Optional[int] = None
    """Number of codebook vectors K (unset: the flavor's, 512 for base)."""
    code_dim: Optional[int] = None
    """Dimension of each codebook vector (unset: the flavor's, 64 for base)."""
    downsample: int = 4
    """Spatial reduction of the encoder: the code grid is resolution/downsample on a side."""
    commitment: float = 0.25
    """Commitment loss weight beta_c."""
    update: Literal["ema", "grad"] = "ema"
    """Codebook learned by exponential moving averages or by gradients."""
    ema_decay: float = 0.99
    """EMA decay of codebook statistics."""
    ema_epsilon: float = 1e-5
    """Laplace smoothing of EMA cluster sizes."""
    dead_code_threshold: float = 1.0
    """Codes whose EMA usage falls below this are restarted from encoder outputs (0 disables)."""


@dataclass
class ARPriorConfig:
    arch: Literal["pixelcnn", "transformer"] = "pixelcnn"
    """Autoregressive prior over the VQ code grid: gated PixelCNN or a causal transformer."""
    parent_uri: Optional[str] = None
    """The trained VQ-VAE whose codes the prior models (models:/name@alias or runs:/<id>/model)."""
    parent_config: Optional[dict] = None
    """Filled in by the pipeline from ``parent_uri``: the parent's model config (not set by hand)."""
    hidden: Optional[int] = None
    """Channels (PixelCNN) or model width (transformer) (unset: the flavor's, 128 for base)."""
    layers: Optional[int] = None
    """Gated PixelCNN layers or transformer blocks (unset: the flavor's, 6 for base)."""
    heads: Optional[int] = None
    """Attention heads (transformer) (unset: the flavor's, 4 for base)."""


@dataclass
class VDVAEConfig:
    width: Optional[int] = None
    """Channels of the residual stream (unset: the flavor's)."""
    widths: Optional[str] = None
    """Per-resolution width overrides, VDVAE's ``"256:64,128:128"`` ("" = none; unset: the flavor's)."""
    bottleneck: Optional[float] = None
    """Middle width of each residual bottleneck block as a fraction of its width (unset: 0.25)."""
    latent_channels: Optional[int] = None
    """Channels of every spatial latent group, VDVAE's zdim (unset: the flavor's)."""
    enc_blocks: Optional[str] = None
    """Bottom-up layout, VDVAE's string: ``RxN`` N residual blocks at resolution R, ``RdK`` one block
    then average pooling by K (e.g. ``"32x2,32d2,16x2,16d2,8x2,8d2,4x2,4d4,1x2"``); "" derives one
    from the resolution and ``blocks_per_resolution``."""
    dec_blocks: Optional[str] = None
    """Top-down layout: ``RxN`` N top-down blocks at R, each with its own latent group; ``RmS`` the
    state upsampled from S to R (e.g. ``"1x1,4m1,4x2,8m4,8x2,16m8,16x2,32m16,32x2"``); "" derives one."""
    blocks_per_resolution: Optional[int] = None
    """Blocks per resolution of a derived layout (enc_blocks/dec_blocks "")."""
    min_std: Optional[float] = None
    """Floor of every scale, softplus(raw) + min_std: bounded variances (unset: 1e-3)."""
    group_free_bits: Optional[float] = None
    """Per-group free bits: each latent group's batch-mean KL counts at least this many nats in the
    loss (0 = off)."""


@dataclass
class ModelConfig:
    name: str = "conv_vae"
    """Registered model family (``vaepipe models`` lists them)."""
    flavor: str = "base"
    """A preset of the family (``base``, ``debug`` and the family's own, e.g. vdvae's ``mnist``,
    ``celeba64``, ``celebahq256``); ``debug`` shrinks widths so a CPU test runs in seconds. It fills
    only the size fields left unset (None); a value you set always wins, even one equal to the
    base default. An unknown flavor fails naming the family's flavors."""
    latent_dim: Optional[int] = None
    """Latent dimensions of the Gaussian posterior (unset: the flavor's, 128 for base)."""
    in_channels: int = 3
    """Image channels; set from ``data.channels`` by ``validate``."""
    resolution: int = 64
    """Input resolution; set from ``data.resolution`` by ``validate``."""
    bits: int = 8
    """Bit depth of the discretised likelihood; set from ``data.bits`` by ``validate``."""
    base_channels: Optional[int] = None
    """Width of the first conv block (unset: the flavor's; 32 is the reference architecture)."""
    hidden_dim: Optional[int] = None
    """Width of the dense layer between the conv stack and the latent (unset: the flavor's, 512 for base)."""
    likelihood: Optional[Literal["bernoulli", "gaussian", "gaussian_learned", "mse", "logistic_mixture"]] = None
    """Decoder likelihood p(x|z); logistic_mixture is the discretised logistic mixture for 8-bit (or
    ``data.bits``) images (unset: the flavor's, bernoulli for every family's base but vdvae's)."""
    obs_std: float = 0.1
    """Fixed standard deviation of the Gaussian likelihood."""
    logistic_components: Optional[int] = None
    """Mixture components of the discretised logistic likelihood (unset: the flavor's, 5; vdvae 10)."""
    beta: float = 1.0
    """Target weight of the KL term (beta-VAE when > 1); annealing multiplies it."""
    prior: Literal["normal", "made", "mog"] = "normal"
    """p(z): standard normal, autoregressive MADE (Gaussian conditionals), or a mixture of Gaussians."""
    prior_components: int = 10
    """Components of the mixture-of-Gaussians prior."""
    prior_hidden: int = 256
    """Hidden width of the MADE prior."""
    decoder_dropout: float = 0.0
    """Dropout in the decoder (e.g. 0.5) forces it to rely on z: a posterior-collapse mitigation."""
    skip_connections: bool = False
    """Encoder-to-decoder skip connections (conv families)."""
    factor: FactorVAEConfig = field(default_factory=FactorVAEConfig)
    """Factor-VAE settings (model.name=factor_vae)."""
    ladder: LadderConfig = field(default_factory=LadderConfig)
    """Hierarchical / Ladder VAE settings (model.name=ladder_vae)."""
    vq: VQConfig = field(default_factory=VQConfig)
    """VQ-VAE settings (model.name=vqvae)."""
    ar: ARPriorConfig = field(default_factory=ARPriorConfig)
    """Autoregressive code prior settings (model.name=vq_prior)."""
    vdvae: VDVAEConfig = field(default_factory=VDVAEConfig)
    """VDVAE-class hierarchical VAE settings (model.name=vdvae): spatial latent groups at every resolution."""


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    """Optimizer, built by DeepSpeed from its config."""
    lr: float = 1e-3
    """Learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam betas."""
    weight_decay: float = 0.0
    """Weight decay (decoupled for adamw)."""
    grad_clip: float = 5.0
    """Gradient clipping by global norm (0 disables)."""
    fused: bool = True
    """torch's fused Adam kernel (one pass over all parameters, CPU and CUDA): measured 1.6x faster
    optimizer steps than the per-parameter loop on the reference VAE here."""
    skip_threshold: float = 0.0
    """Skip an update whose global gradient norm (before clipping) exceeds this, on every rank
    together, and count it (``grad_norm_skips``): VDVAE's gradient skipping. 0 = off."""
    lean_zero_step: bool = True
    """CPU workers, ZeRO-1/2 (measured there; CUDA keeps DeepSpeed's own step until a GPU
    measurement says otherwise): the clipping norm's all-reduce is the step's only finite check (DeepSpeed also
    scans every gradient and all-reduces a flag first), over the flat gradient partition
    (``pipeline.train.zero_step``). A non-finite gradient still skips the step on every rank."""


@dataclass
class ScheduleConfig:
    kl_anneal: Literal["none", "linear", "cyclical"] = "none"
    """KL weight schedule, multiplied by model.beta: none, linear warm-up, or cyclical (Fu et al. 2019)."""
    unit: Literal["step", "epoch"] = "step"
    """Whether warmup and cycles count optimizer steps or (fractional) epochs."""
    warmup: float = 0.0
    """Linear: beta_t = beta * min(1, t / warmup), t in ``unit``."""
    cycles: int = 4
    """Cyclical: number of cycles over the whole run (train.max_steps)."""
    cycle_ratio: float = 0.5
    """Cyclical: fraction of each cycle in which the weight rises linearly from 0 to beta."""
    free_bits: float = 0.0
    """Free bits lambda per latent dimension: KL_i = max(lambda, KL_i); 0 disables."""
    target_kl: float = 0.0
    """Minimum desired KL per batch: the KL term becomes max(target_kl, KL); 0 disables."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this number)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 where the hardware does it fast, fp16 on older GPUs, fp32 otherwise."""
    activation_checkpointing: bool = False
    """Recompute encoder/decoder blocks in backward instead of storing activations."""
    channels_last: bool = True
    """Run 2-D convolutions on channels-last (NHWC) activations: each convolution's input is
    converted from outside the model; weights, checkpoints and state dicts keep the default
    layout. Faster on CPUs (oneDNN) and GPUs (cuDNN); see train/memory_format.py."""
    phase_timers: Literal["auto", "on", "off"] = "auto"
    """Log where each step's time goes (time_ms/data_wait, forward, backward, optimizer,
    communication, observe). auto = on for CPU workers (free there), off on CUDA, where
    exact figures need a device sync per phase; on = also on CUDA, with the syncs."""
    seed: int = 0
    """Seed of model init, shuffling and sampling."""
    ema_rate: Optional[float] = None
    """Keep an exponential moving average of the weights at this rate; validation, image grids,
    export and registration use it (``pipeline/train/ema.py``). Unset: the family's default
    (vdvae 0.9999, as VDVAE; 0 = off for the others)."""
    ema_warmup: bool = True
    """The average's rate rises to ``ema_rate`` as min(ema_rate, (1 + n) / (10 + n)) after n
    updates (TensorFlow's ``num_updates``), so the initial weights do not stay in it; false: the
    fixed rate from the first update."""
    max_consecutive_skips: int = 50
    """Non-finite losses in a row (all ranks skip each) before the run counts as diverged."""
    on_divergence: Literal["fail", "rollback"] = "fail"
    """A diverged run fails, or restores its newest committed checkpoint with the learning rate
    scaled by ``rollback_lr_factor`` and trains on (at most ``max_rollbacks`` times)."""
    rollback_lr_factor: float = 0.5
    """What each divergence rollback multiplies the learning rate by."""
    max_rollbacks: int = 3
    """Divergence rollbacks before the run fails after all."""
    log_every: int = 10
    """Steps between metric logs (and Ray reports)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (all ranks save their DeepSpeed shard, then one Ray report)."""
    image_every: int = 200
    """Steps between image grids (reconstructions, samples) logged to MLflow."""
    val_every: int = 100
    """Steps between validation passes (``train.validation=in_loop``)."""
    validation: Literal["in_loop", "off_loop"] = "in_loop"
    """``in_loop``: the ranks validate ``data.val_batches`` batches each every ``val_every`` steps and
    at each checkpoint, stalling training meanwhile. ``off_loop``: the ranks never validate; each
    checkpoint is validated by a Ray Train validation task beside the training (``ValidationConfig``,
    ``train.val_cpus``) on the validation split (``val_max_samples``), with the IWAE
    bound (``val_k``) and FID (``val_fid_weights``) besides the ELBO terms. Its ``val_*`` metrics are
    logged at the checkpoint's step and linked to that step's LoggedModel; they reach MLflow, model
    retention, ``register --best`` and a sweep's challenger, not Tune's schedulers."""
    val_k: int = 0
    """Off-loop validation: importance samples of the IWAE bound ``val_neg_iwae_nats`` (0: none)."""
    val_max_samples: Optional[int] = None
    """Off-loop validation: the first this many samples of the validation split (None: all of it)."""
    val_fid_weights: Optional[str] = None
    """Off-loop validation: the FID Inception's weights file; ``val_fid`` where given."""
    val_cpus: float = 1.0
    """Off-loop validation: CPUs of each validation task (it scores on CPU, as ``vaepipe evaluate`` does)."""
    keep_checkpoints: int = 2
    """Ray checkpoints kept on storage."""
    storage_path: str = "runs"
    """Where Ray stores run folders and checkpoints (local folder or s3://...)."""
    checkpoint_upload: Literal["auto", "sync", "async"] = "auto"
    """How a rank's checkpoint files reach ``storage_path``: ``sync`` (the report waits for the copy),
    ``async`` (Ray Train copies them in a background thread while the rank trains on, then deletes
    the local copy: ``CheckpointUploadMode.ASYNC``), ``auto``: async where ``storage_path`` is
    remote (s3://), sync on a local folder. Either way a checkpoint is restored only once its commit
    marker and every file it lists are there. Local mode copies synchronously."""
    run_name: Optional[str] = None
    """Ray run folder name; default vaepipe-<timestamp>."""

    @property
    def off_loop(self) -> bool:
        """Checkpoints are validated by a Ray Train validation task, not by the ranks (``validation``)."""
        return self.validation == "off_loop"


@dataclass
class DistConfig:
    num_workers: int = 2
    """Ray Train workers (one DeepSpeed rank each); the most an elastic run uses. 0 = local mode:
    one rank in this process (a sweep's trial: in the trial's process), no Ray Train workers, no
    restarts (``train/local_mode.py``)."""
    min_workers: Optional[int] = None
    """Elastic training: keep training on as few as this many workers when workers or nodes are
    lost, and grow back to ``num_workers`` when resources return (Ray Train's elastic
    ScalingConfig; checkpoints are converted to the new world size). None = fixed size. The
    micro-batch stays ``data.batch_size`` per worker, so the global batch follows the world size."""
    resize_interval_s: float = 60.0
    """Elastic training: how often a healthy run checks whether it can grow back."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; > 0 trains on CUDA with NCCL."""
    zero_stage: int = 2
    """DeepSpeed ZeRO stage 0-3."""
    shm_allreduce: bool = True
    """When all CPU workers share one node, DeepSpeed's gradient all-reduces go through its
    shared-memory kernel instead of gloo's loopback TCP (several times faster); false: gloo."""
    retain_freed_memory: bool = True
    """Workers keep the host memory a step frees for the next step (glibc malloc with fixed mmap
    and trim thresholds, ``train/host_memory.py``) instead of returning it to the kernel and
    faulting it back in page by page; false: glibc's defaults."""
    offload_optimizer: bool = False
    """ZeRO offload of optimizer state to CPU (stages 1-3)."""
    offload_params: bool = False
    """ZeRO-3 offload of parameters to CPU."""
    address: Optional[str] = None
    """Ray cluster address; None = RAY_ADDRESS or a local Ray started for this run."""
    max_failures: int = 1
    """Worker-group restarts from the latest checkpoint before the run fails."""
    max_preemption_failures: int = -1
    """Restarts after a node's announced preemption (Ray Train's FailureConfig), counted apart
    from ``max_failures``; -1 = no limit (a spot fleet may be reclaimed any number of times)."""
    preemption_check_every: int = 10
    """Optimizer steps between asks for a preemption notice (``ray.train.get_preemption_info``,
    a barrier across ranks); on the first notice every rank checkpoints at that step and
    training goes on until Ray Train restarts it. 0 = never ask."""
    start_retries: int = 2
    """Times a worker group whose workers cannot be placed is retried (each waits
    ``start_timeout_s``) before the run fails naming the resources; -1 waits forever (an
    autoscaling cluster that will add nodes)."""
    start_timeout_s: float = 60.0
    """Seconds Ray Train waits for a worker group's workers to be placed before that try fails
    (sets RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for the run unless it is set already)."""

    @property
    def local(self) -> bool:
        """Local mode: one rank in the calling process, no Ray Train workers (``train/local_mode.py``)."""
        return self.num_workers == 0

    @property
    def world_size(self) -> int:
        """DeepSpeed ranks of a full-size run: ``num_workers``, or the one rank of local mode."""
        return max(self.num_workers, 1)


@dataclass
class TrackingConfig:
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; None = MLFLOW_TRACKING_URI or sqlite:///mlruns.db in the working dir."""
    artifact_location: str = "mlartifacts"
    """Artifact folder for experiments created on the embedded SQLite store."""
    experiment: str = "vaepipe"
    """MLflow experiment name."""
    run_name: Optional[str] = None
    """MLflow run name."""
    log_model: bool = True
    """Log the trained model as an MLflow pyfunc (an MLflow 3 LoggedModel) at the end."""
    model_per_checkpoint: bool = True
    """Also log one at every checkpoint, with its step, and link to it the validation metrics of
    that step (checkpoint steps are then validated too); ``search_logged_models`` and
    ``vaepipe register --best`` pick among them. False: one model, at the end."""
    keep_models: int = 3
    """Checkpoint models a run keeps: the newest ``keep_models``, plus the best ``keep_best_models``
    and any that is registered; the others are deleted with their files. 0 keeps every one."""
    keep_best_models: int = 1
    """Checkpoint models kept for being the best under ``best_metric``, besides the newest."""
    best_metric: Optional[str] = None
    """Validation metric that ranks checkpoint models for ``keep_best_models``; None: the family's
    validation quantity (``val_neg_elbo`` for the ELBO families), the one sweeps rank by."""
    best_mode: Literal["min", "max"] = "min"
    """Whether ``best_metric`` is minimised or maximised."""
    register_name: Optional[str] = None
    """Register the logged model under this name when set."""
    register_alias: Optional[str] = None
    """Alias set on the registered version (e.g. champion)."""
    image_grid_size: int = 8
    """Images per side of the reconstruction and sample grids (n*n images)."""
    kl_per_dim_metrics: bool = False
    """Also log one metric per latent unit (``kl_dim/NNN``); off by default: the per-step KL bar
    plot image (key ``kl_per_dim``) shows the same, and hundreds of charts bury the rest in the UI."""
    system_metrics: bool = True
    """Log MLflow system metrics (CPU, memory, disk, network, GPU) of every rank into the run,
    named ``system/rank<r>-<node ip>/...``."""
    system_metrics_interval_s: float = 10.0
    """Seconds between two system-metrics samples of a rank."""
    verbose: bool = False
    """Also print what Ray Train and MLflow say on every report and checkpoint of every rank (the
    ``TrainingReport`` dumps, checkpoint paths, download bars; ``vaepipe train --verbose``). Off:
    vaepipe's own lines, and every warning and error."""


@dataclass
class TuneConfig:
    num_samples: int = 8
    """Trials to draw from the search space (each grid point counts once per sample)."""
    max_concurrent: int = 2
    """Trials running at once; capped further by what the cluster's CPUs/GPUs can hold."""
    metric: str = "val_neg_elbo"
    """Reported metric the search optimises."""
    mode: Literal["min", "max"] = "min"
    """Whether ``metric`` is minimised or maximised."""
    scheduler: Literal["asha", "pbt", "fifo"] = "asha"
    """ASHA early stopping (default), Population Based Training, or none (fifo)."""
    search: Literal["random", "optuna"] = "random"
    """Random/grid search, or Optuna's TPE."""
    grace_period: int = 10
    """ASHA: steps every trial runs before it can be stopped (images seen in a progressive sweep)."""
    reduction_factor: int = 2
    """ASHA: keep 1/reduction_factor of the trials at each rung."""
    perturbation_interval: int = 20
    """PBT: steps between exploit/explore decisions."""
    register_best: bool = False
    """Register the best trial's model under ``register_name`` with alias ``challenger``."""
    register_name: Optional[str] = None
    """Registered model name for the best trial."""
    storage_path: str = "runs/tune"
    """Where Tune keeps experiment state (for ``vaepipe tune --resume``)."""
    name: Optional[str] = None
    """Tune experiment name; default vaepipe-sweep-<timestamp>."""


# ProGAN's CelebA-HQ table (Karras et al. 2018, progressive_growing_of_gans config.py): micro-batch per
# resolution 4, 8, 16, ..., 256; its learning rates for 128 and 256, 1e-3 below.
PROGRESSIVE_FAMILIES = ("progressive_vae", "progressive_ladder_vae")
PROGAN_BATCH = [128, 128, 128, 64, 32, 16, 8]
PROGAN_LR = [1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1.5e-3, 2e-3]


@dataclass
class ProgressiveConfig:
    enabled: bool = False
    """Grow the model from ``start_resolution`` to ``data.resolution`` in stages (model.name=progressive_vae
    or progressive_ladder_vae)."""
    start_resolution: int = 4
    """Resolution of the first stage (a power of two, >= 4)."""
    stage_images: int = 1_200_000
    """Images (summed over workers) each stage trains on, its fade-in included (ProGAN: 600k + 600k).
    The run ends after the last stage, so ``train.max_steps`` is derived from this."""
    final_stage_images: int = 0
    """Images of the last stage (0 = ``stage_images``): a long last stage gives a sweep's trials with
    different ``stage_images`` a span where all are at the final resolution, for ASHA's rungs."""
    fade_fraction: float = 0.5
    """Fraction of each stage after the first spent fading the new block in (alpha 0 -> 1)."""
    batch_size: list[int] = field(default_factory=lambda: list(PROGAN_BATCH))
    """Micro-batch per worker for resolutions 4, 8, 16, ... (entry i is for 4 * 2**i); ProGAN's table."""
    lr: list[float] = field(default_factory=lambda: list(PROGAN_LR))
    """Learning rate for resolutions 4, 8, 16, ... (entry i is for 4 * 2**i); ProGAN's values."""
    effective_batch: int = 0
    """Images per worker per optimizer step; stages whose micro-batch is smaller accumulate gradients
    (effective_batch / micro-batch steps) to keep it. 0 = no accumulation (each stage's micro-batch)."""
    freeze_images: int = 0
    """Images at the start of each grown stage during which the earlier blocks are frozen (0 = never)."""
    carry_moments: bool = False
    """Carry Adam's moments of the parameters that already existed into the next stage. Off by default,
    as ProGAN and ALAE do: after growing, the loss is over 4x the pixels with another batch and lr, so
    old second moments are scaled for a gradient that no longer exists and would mis-size the first steps."""


@dataclass
class VaepipeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


def _merge(base: Any, other: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        detail = str(exc).splitlines()[0]  # OmegaConf appends object/reference types below
        raise ConfigError(f"{origin}: bad config key or value at '{key}': {detail}") from None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> VaepipeConfig:
    """Defaults <- YAML file <- dotted overrides, validated; raises ConfigError naming the key."""
    cfg = OmegaConf.structured(VaepipeConfig)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        cfg = _merge(cfg, OmegaConf.load(path), f"config file '{path}'")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value (e.g. model.latent_dim=64)")
    if overrides:
        cfg = _merge(cfg, OmegaConf.from_dotlist(list(overrides)), "command-line override")
    typed: VaepipeConfig = OmegaConf.to_object(cfg)
    validate(typed)
    return typed


def apply_overrides(cfg: VaepipeConfig, overrides: dict[str, Any] | Sequence[str], origin: str = "override") -> VaepipeConfig:
    """``cfg`` with dotted overrides (``{"model.latent_dim": 64}`` or ``["model.latent_dim=64"]``), validated."""
    if isinstance(overrides, dict):
        layer = OmegaConf.create({})
        for key, value in overrides.items():
            OmegaConf.update(layer, key, value, force_add=True)
    else:
        layer = OmegaConf.from_dotlist(list(overrides))
    merged = _merge(OmegaConf.structured(cfg), layer, origin)
    return validate(OmegaConf.to_object(merged))


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {why}")


def validate(cfg: VaepipeConfig) -> VaepipeConfig:
    """Check ranges and combinations, and derive the model's input shape from the data."""
    d, m, o, t, s = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.dist
    res = d.resolution
    _check(res >= 4 and 2 ** int(round(math.log2(res))) == res, "data.resolution", res, "must be a power of two")
    _check(d.channels in (1, 3), "data.channels", d.channels, "must be 1 or 3")
    _check(d.batch_size >= 1, "data.batch_size", d.batch_size, "must be >= 1")
    _check(d.loader_workers >= 0, "data.loader_workers", d.loader_workers, "must be >= 0")
    _check(d.cache_mb >= 0, "data.cache_mb", d.cache_mb, "must be >= 0 (0 = no cache)")
    _check(d.cache_mb == 0 or d.loader_workers == 0, "data.cache_mb", d.cache_mb,
           f"needs data.loader_workers=0 (is {d.loader_workers}): loader processes end with each epoch, and their cache with them")
    _check(m.latent_dim is None or m.latent_dim >= 1, "model.latent_dim", m.latent_dim, "must be >= 1")
    _check(m.beta >= 0, "model.beta", m.beta, "must be >= 0")
    _check(m.obs_std > 0, "model.obs_std", m.obs_std, "must be > 0")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas", o.betas, "must be two values in [0, 1)")
    _check(o.skip_threshold >= 0, "optim.skip_threshold", o.skip_threshold, "must be >= 0 (0 disables skipping)")
    _check(1 <= d.bits <= 8, "data.bits", d.bits, "must be between 1 and 8")
    _check(o.grad_clip >= 0, "optim.grad_clip", o.grad_clip, "must be >= 0 (0 disables clipping)")
    sc = cfg.schedule
    _check(sc.warmup >= 0, "schedule.warmup", sc.warmup, "must be >= 0")
    _check(not (sc.kl_anneal == "linear" and sc.warmup == 0), "schedule.warmup", sc.warmup,
           "must be > 0 with schedule.kl_anneal=linear")
    _check(sc.cycles >= 1, "schedule.cycles", sc.cycles, "must be >= 1")
    _check(0 < sc.cycle_ratio <= 1, "schedule.cycle_ratio", sc.cycle_ratio, "must be in (0, 1]")
    _check(sc.free_bits >= 0, "schedule.free_bits", sc.free_bits, "must be >= 0")
    _check(sc.target_kl >= 0, "schedule.target_kl", sc.target_kl, "must be >= 0")
    _check(t.max_steps >= 1, "train.max_steps", t.max_steps, "must be >= 1")
    _check(0 < t.rollback_lr_factor <= 1, "train.rollback_lr_factor", t.rollback_lr_factor, "must be in (0, 1]")
    _check(t.max_rollbacks >= 0, "train.max_rollbacks", t.max_rollbacks, "must be >= 0")
    _check(t.on_divergence == "fail" or not cfg.progressive.enabled, "train.on_divergence", t.on_divergence,
           "rollback is not carried across progressive growth yet: use fail with progressive.enabled")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "must be >= 1")
    for key in ("log_every", "checkpoint_every", "image_every", "val_every", "keep_checkpoints", "max_consecutive_skips"):
        _check(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "must be >= 1")
    _check(s.num_workers >= 0, "dist.num_workers", s.num_workers, "must be >= 1 (or 0: local mode, one rank in this process)")
    _check(s.min_workers is None or 1 <= s.min_workers <= s.num_workers, "dist.min_workers", s.min_workers,
           f"must be between 1 and dist.num_workers={s.num_workers} (or unset for a fixed size)")
    _check(s.resize_interval_s >= 0, "dist.resize_interval_s", s.resize_interval_s, "must be >= 0")
    _check(s.zero_stage in (0, 1, 2, 3), "dist.zero_stage", s.zero_stage, "must be 0, 1, 2 or 3")
    _check(s.start_retries >= -1, "dist.start_retries", s.start_retries, "must be >= -1 (-1 retries forever)")
    _check(s.max_preemption_failures >= -1, "dist.max_preemption_failures", s.max_preemption_failures,
           "must be >= -1 (-1 restarts after every preemption)")
    _check(s.preemption_check_every >= 0, "dist.preemption_check_every", s.preemption_check_every,
           "must be >= 0 (0 never asks)")
    _check(s.start_timeout_s > 0, "dist.start_timeout_s", s.start_timeout_s, "must be > 0")
    _check(not s.offload_params or s.zero_stage == 3, "dist.offload_params", s.offload_params, "needs dist.zero_stage=3")
    _check(not s.offload_optimizer or s.zero_stage >= 1, "dist.offload_optimizer", s.offload_optimizer, "needs dist.zero_stage >= 1")
    _check(not (t.precision == "fp16" and s.gpus_per_worker == 0), "train.precision", t.precision,
           "fp16 needs CUDA (dist.gpus_per_worker > 0); DeepSpeed has no fp16 on CPU, use fp32 or bf16")
    for key in ("keep_models", "keep_best_models"):
        _check(getattr(cfg.tracking, key) >= 0, f"tracking.{key}", getattr(cfg.tracking, key), "must be >= 0 (0 keeps every model)")
    _check(cfg.tracking.best_metric is None or cfg.tracking.best_metric.startswith("val_"), "tracking.best_metric",
           cfg.tracking.best_metric, "checkpoint models carry validation metrics only: name one starting with 'val_'")
    _check(cfg.tracking.system_metrics_interval_s > 0, "tracking.system_metrics_interval_s",
           cfg.tracking.system_metrics_interval_s, "must be > 0 seconds (turn them off with tracking.system_metrics=false)")
    tn = cfg.tune
    _check(tn.num_samples >= 1, "tune.num_samples", tn.num_samples, "must be >= 1")
    _check(tn.max_concurrent >= 1, "tune.max_concurrent", tn.max_concurrent, "must be >= 1")
    _check(not tn.register_best or bool(tn.register_name), "tune.register_best", tn.register_best,
           "needs tune.register_name")
    # The model sees what the data layer produces: derive rather than ask users to repeat it.
    m.resolution, m.in_channels, m.bits = res, d.channels, d.bits
    resolved = materialize_flavor(m)
    _check(d.bits == 8 or "bits" in resolved, "data.bits", d.bits,
           f"model.name={m.name} models 8-bit images only; 5-bit likelihoods: model.name=vdvae")
    if t.ema_rate is None:
        from models import family_default

        t.ema_rate = float(family_default(m.name, "default_ema_rate", 0.0))
    _check(t.ema_rate == 0 or 0 < t.ema_rate < 1, "train.ema_rate", t.ema_rate, "must be in (0, 1), or 0 for no average")
    _check(t.ema_rate == 0 or not cfg.progressive.enabled, "train.ema_rate", t.ema_rate,
           "a weight EMA is not carried across progressive growth yet: set it to 0 with progressive.enabled")
    validate_off_loop(cfg)
    if cfg.progressive.enabled:
        validate_progressive(cfg)
    return cfg


def validate_off_loop(cfg: VaepipeConfig) -> None:
    t = cfg.train
    _check(t.val_k >= 0, "train.val_k", t.val_k, "must be >= 0 (0: no IWAE bound)")
    _check(t.val_max_samples is None or t.val_max_samples >= 1, "train.val_max_samples", t.val_max_samples,
           "must be >= 1 (or unset: the whole validation split)")
    _check(t.val_cpus > 0, "train.val_cpus", t.val_cpus, "must be > 0")
    if not t.off_loop:
        return
    _check(not cfg.progressive.enabled, "train.validation", t.validation,
           "off_loop validation scores one resolution: use in_loop with progressive.enabled")
    _check(not (t.ema_rate and cfg.dist.zero_stage == 3), "train.validation", t.validation,
           "off_loop validation reads the weight EMA of ZeRO 0-2 checkpoints only: use in_loop, or train.ema_rate=0, with ZeRO-3")


def validate_progressive(cfg: VaepipeConfig) -> None:
    """Check the ``progressive`` section and derive ``train.max_steps`` from its stages."""
    p, end = cfg.progressive, cfg.data.resolution
    _check(cfg.model.name in PROGRESSIVE_FAMILIES, "model.name", cfg.model.name,
           f"progressive.enabled=true needs a growing family: {' or '.join(PROGRESSIVE_FAMILIES)}")
    start = p.start_resolution
    _check(4 <= start <= end and start & (start - 1) == 0, "progressive.start_resolution", start,
           f"must be a power of two in [4, data.resolution={end}]")
    _check(p.stage_images >= 1, "progressive.stage_images", p.stage_images, "must be >= 1")
    _check(p.final_stage_images >= 0, "progressive.final_stage_images", p.final_stage_images, "must be >= 0")
    _check(0 <= p.fade_fraction < 1, "progressive.fade_fraction", p.fade_fraction, "must be in [0, 1)")
    _check(p.effective_batch >= 0, "progressive.effective_batch", p.effective_batch, "must be >= 0")
    _check(p.freeze_images >= 0, "progressive.freeze_images", p.freeze_images, "must be >= 0")
    needed = int(math.log2(end // 4)) + 1
    for key in ("batch_size", "lr"):
        values = getattr(p, key)
        _check(len(values) >= needed, f"progressive.{key}", values,
               f"needs one entry per resolution 4..{end} ({needed} entries, entry i for 4*2**i)")
        _check(all(v > 0 for v in values), f"progressive.{key}", values, "every entry must be > 0")
    from pipeline.stages import build_stages, count_steps

    t = cfg.train
    t.max_steps = count_steps(build_stages(cfg), cfg.dist.world_size)


_FLAVORED = {"": ("latent_dim", "base_channels", "hidden_dim", "likelihood", "logistic_components"), "factor": ("disc_hidden", "disc_layers"),
             "ladder": ("latent_dims", "hidden"), "vq": ("codebook_size", "code_dim"), "ar": ("hidden", "layers", "heads"),
             "vdvae": tuple(f.name for f in fields(VDVAEConfig))}


def materialize_flavor(m: ModelConfig) -> dict[str, Any]:
    """Write the flavor's sizes into the fields left unset, so the saved config says what was built.

    Values the user set are kept (the family's own rule); fields the family does not use stay None.
    """
    from models import resolve_model_config

    try:
        resolved = resolve_model_config(m)
    except ValueError as exc:
        raise ConfigError(f"model.name={m.name!r} / model.flavor={m.flavor!r} is invalid: {exc}") from None
    for group, keys in _FLAVORED.items():
        target = getattr(m, group) if group else m
        source = resolved.get(group, {}) if group else resolved
        for key in keys:
            if getattr(target, key) is None and isinstance(source, dict) and source.get(key) is not None:
                setattr(target, key, source[key])
    return resolved


def to_dict(cfg: VaepipeConfig) -> dict:
    """Plain, JSON-able dict of the resolved config, secrets included: anything written from it goes
    through ``pipeline.redact.redact_config_dict`` (``to_yaml`` and ``flatten`` do so themselves)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# Keys older versions wrote into saved configs (checkpoints, sweep state); read and dropped so
# those runs still resume. Never accepted from a YAML file or an override.
_REMOVED_KEYS = {"optim": ("skip_grad_norm",)}


def from_dict(data: dict) -> VaepipeConfig:
    """Rebuild the typed config from ``to_dict`` output, re-validating it."""
    data = {k: ({kk: vv for kk, vv in v.items() if kk not in _REMOVED_KEYS.get(k, ())} if isinstance(v, dict) else v)
            for k, v in data.items()}
    cfg = _merge(OmegaConf.structured(VaepipeConfig), OmegaConf.create(data), "config dict")
    return validate(OmegaConf.to_object(cfg))


def to_yaml(cfg: VaepipeConfig) -> str:
    """The config as written into runs, checkpoints and models: redacted (``pipeline.redact``)."""
    return OmegaConf.to_yaml(OmegaConf.create(redact_config_dict(to_dict(cfg))))


def flatten(cfg: VaepipeConfig) -> dict[str, Any]:
    """Dotted key -> value, for MLflow params; redacted like ``to_yaml``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", redact_config_dict(to_dict(cfg)))
    return out


def known_keys() -> list[str]:
    """Every dotted key of the tree (used to validate sweep spaces and to list the reference)."""
    return sorted(flatten(VaepipeConfig()))

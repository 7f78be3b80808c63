"""The per-worker training loop that Ray Train runs on every rank.

Layered as in torchtitan: ``build_worker`` sets a rank up (config, model, DeepSpeed engine,
data stream, resume), ``train_step`` does one micro-batch forward/backward/step,
``train_loop_per_worker`` drives steps, logging, validation and checkpoints. Rank-0-only
side effects go through ``RankZeroLogger``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.config import VaepipeConfig, from_dict, to_dict, to_yaml
from pipeline.evaluate.visualize import kl_bar_plot, make_grid
from pipeline.tracking import RankZeroLogger
from pipeline.train.activation import apply_activation_checkpointing
from pipeline.train.auxiliary import AuxiliaryTrainer
from pipeline.train.engine import DeviceFacts, build_deepspeed_config, resolve_precision, set_accelerator_env
from pipeline.train.schedules import kl_weight

STATE_FILE = "vaepipe_state.json"
AUX_FILE = "auxiliary.pt"  # the auxiliary network and its optimizer (identical on every rank)
CKPT_TAG = "ds"  # one tag per Ray checkpoint folder: Ray keeps the history, not DeepSpeed


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    skipped_steps: int = 0
    corrupt_samples: int = 0
    samples_seen: int = 0
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


def _all_reduce(values: list[float], device, op: str = "sum") -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.tolist()


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def build_worker(loop_config: dict) -> Worker:
    """Set up one rank: typed config, model, DeepSpeed engine, data stream, resume state."""
    import ray.train
    import ray.train.torch

    cfg = from_dict(loop_config["config"])
    use_cuda = cfg.dist.gpus_per_worker > 0
    set_accelerator_env(use_cuda)
    import deepspeed  # after DS_ACCELERATOR is set, inside the worker

    from models import build_model
    from pipeline.data.stream import ShardStream

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if use_cuda else torch.device("cpu")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    if loop_config.get("parent_state") is not None:
        # vq_prior: the frozen VQ-VAE's weights, loaded before ZeRO-3 can partition them
        model.parent.load_state_dict(loop_config["parent_state"])
    if hasattr(model, "set_stat_reducer"):
        # VQ-VAE's EMA codebook statistics are summed over ranks so every rank keeps the same codebook
        model.set_stat_reducer(_sum_over_ranks)
    aux = AuxiliaryTrainer.for_model(model, device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    precision = resolve_precision(cfg.train.precision, DeviceFacts.detect(use_cuda))
    ds_config = build_deepspeed_config(cfg, world, precision)
    trainable = [p for p in model.parameters() if p.requires_grad]  # frozen parents stay out of Adam
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    stream = ShardStream(
        cfg.data.path, "train", cfg.data.batch_size, cfg.data.resolution, rank, world,
        seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
        num_workers=cfg.data.loader_workers, channels=cfg.data.channels, binarize=cfg.data.binarize,
    )
    log = RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"], enabled=rank == 0)
    worker = Worker(cfg, engine, stream, TrainState(), log, device, rank, world, precision,
                    fault=loop_config.get("fault", {}), aux=aux)
    _restore(worker, loop_config.get("run_dir"), loop_config.get("resume_from"))
    return worker


def _restore(w: Worker, run_dir: Optional[str], resume_from: Optional[str]) -> None:
    """Load the newest checkpoint into engine, train state and data position.

    Candidates: the folder ``--resume`` named, and the latest checkpoint Ray registered for
    this run (after an automatic restart). A
    report that reached storage but not the controller (a rank died within the controller's
    poll interval of reporting) is found by scanning the run folder for complete checkpoints;
    the one with the highest step wins.
    """
    import ray.train

    candidates: list[Path] = [Path(resume_from)] if resume_from else []
    ckpt = ray.train.get_checkpoint()
    with (ckpt.as_directory() if ckpt is not None else contextlib.nullcontext()) as ray_dir:
        if ray_dir is not None:
            candidates.append(Path(ray_dir))
        if run_dir and "://" not in run_dir:
            candidates += complete_checkpoints(Path(run_dir), w.world_size, w.cfg.dist.zero_stage)
        if not candidates:
            return
        best = max(candidates, key=lambda d: json.loads((d / STATE_FILE).read_text())["train_state"]["step"])
        w.engine.load_checkpoint(str(best), tag=CKPT_TAG)
        # the config's learning rate wins over the one saved with the optimizer state: a PBT
        # exploit or a resumed run with a new optim.lr continues with the new value
        for group in w.engine.optimizer.param_groups:
            group["lr"] = w.cfg.optim.lr
        saved = json.loads((best / STATE_FILE).read_text())
        if w.aux is not None and (best / AUX_FILE).exists():
            w.aux.load_state_dict(torch.load(best / AUX_FILE, map_location=w.device))
    w.state.load_state_dict(saved["train_state"])
    w.stream.load_state_dict(saved["data_state"])
    w.resumed_from = w.state.step


def complete_checkpoints(run_dir: Path, world_size: int, zero_stage: int) -> list[Path]:
    """Checkpoint folders under ``run_dir`` holding the state file and every rank's ZeRO shard."""
    out = []
    for d in run_dir.glob("checkpoint_*"):
        tag = d / CKPT_TAG
        if not (d / STATE_FILE).exists() or not list(tag.glob("*model_states.pt")):
            continue
        if zero_stage >= 1 and len(list(tag.glob("*optim_states.pt"))) < world_size:
            continue
        out.append(d)
    return out


def train_step(w: Worker, batch: dict) -> dict[str, float]:
    """One micro-batch: forward, finite check agreed by all ranks, backward, (boundary) step."""
    x = batch["image"].to(w.device)
    if w.precision == "bf16":
        x = x.to(torch.bfloat16)
    elif w.precision == "fp16":
        x = x.half()
    beta = _kl_weight(w)
    kwargs = {"beta": beta, "free_bits": w.cfg.schedule.free_bits}
    if w.cfg.schedule.target_kl:
        kwargs["target_kl"] = w.cfg.schedule.target_kl
    if w.aux is not None:
        kwargs["aux"] = w.aux.module
    out = w.engine(x, **kwargs)
    loss = out["loss"]
    # A NaN on one rank must stop every rank's backward, or the others would wait forever
    # in the gradient all-reduce: agree first, then skip together.
    (bad,) = _all_reduce([0.0 if torch.isfinite(loss).item() else 1.0], w.device, op="max")
    if bad:
        # No rank ran backward or step, so DeepSpeed's micro-step counter did not move and
        # the next batch takes this one's place.
        return {"skipped": 1.0, "boundary": False}
    boundary = w.engine.is_gradient_accumulation_boundary()
    w.engine.backward(loss)
    if boundary and w.cfg.dist.zero_stage == 0:
        _drop_nonfinite_grads(w)
    w.engine.step()
    extras = {k: float(v) for k, v in out.get("metrics", {}).items()}
    if w.aux is not None:
        extras.update(w.aux.step(w.engine.module, out))
    return {
        "extras": extras,
        "boundary": boundary,
        "loss": loss.item(),
        "recon": out["recon"].detach().item(),
        "kl": out["kl"].detach().item(),
        "elbo": out["elbo"].detach().item(),
        "beta": beta,
        "kl_per_dim": out["kl_per_dim"].detach().float().cpu(),
        "skipped": 0.0,
    }


def _kl_weight(w: Worker) -> float:
    """The schedule's KL weight now, in steps or fractional epochs as configured."""
    sc, total_steps = w.cfg.schedule, w.cfg.train.max_steps
    if sc.unit == "epoch":
        per_epoch = max(w.stream.steps_per_epoch // w.cfg.train.grad_accum_steps, 1)
        return kl_weight(w.state.step / per_epoch, sc, w.cfg.model.beta, total_steps / per_epoch)
    return kl_weight(w.state.step, sc, w.cfg.model.beta, total_steps)


def _drop_nonfinite_grads(w: Worker) -> None:
    """Without ZeRO, DeepSpeed applies any gradient: drop a non-finite one so Adam skips the step.

    Every rank holds the same all-reduced gradient here, so every rank decides the same.
    ZeRO 1-3 optimizers check overflow themselves and count it in ``engine.skipped_steps``.
    """
    params = [p for p in w.engine.module.parameters() if p.grad is not None]
    if params and not all(torch.isfinite(p.grad).all() for p in params):
        for p in params:
            p.grad = None
        w.state.skipped_steps += 1


def train_loop_per_worker(loop_config: dict) -> None:
    """Entry point of every Ray Train worker. ``loop_config`` is a plain dict (see trainer)."""
    # torch.distributed warns on every ZeRO collective that DeepSpeed still uses the old names.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    w = build_worker(loop_config)
    cfg, st = w.cfg, w.state
    if w.rank == 0 and w.resumed_from is not None:
        print(f"[vaepipe] resumed from step {w.resumed_from}")
        w.log.tags({"vaepipe.resumed_from_step": w.resumed_from})
    window = _Window()
    consecutive_skips = 0
    while st.step < cfg.train.max_steps:
        for batch in w.stream.iter_epoch(st.epoch, start_step=st.step_in_epoch):
            st.step_in_epoch += 1
            st.corrupt_samples += int(batch.get("n_corrupt", 0))
            out = train_step(w, batch)
            if out["skipped"]:
                st.skipped_steps += 1
                consecutive_skips += 1
                if consecutive_skips >= cfg.train.max_consecutive_skips:
                    raise FloatingPointError(
                        f"diverged: {consecutive_skips} consecutive non-finite losses at step {st.step} "
                        f"(train.max_consecutive_skips): lower optim.lr (now {cfg.optim.lr}) "
                        f"or check the data at {cfg.data.path}")
                continue
            consecutive_skips = 0
            if not out["boundary"]:
                continue  # accumulating: the optimizer step comes with a later micro-batch
            st.samples_seen += cfg.data.batch_size * w.world_size
            st.step += 1
            window.add(out)
            _maybe_fault(st.step, w.fault)
            if st.step % cfg.train.log_every == 0 or st.step == cfg.train.max_steps:
                _log_window(w, window)
            if cfg.data.val_batches and (st.step % cfg.train.val_every == 0 or st.step == cfg.train.max_steps):
                _validate(w)
            if st.step % cfg.train.image_every == 0 or st.step == cfg.train.max_steps:
                _log_images(w, batch)
            if st.step % cfg.train.checkpoint_every == 0 or st.step == cfg.train.max_steps:
                _checkpoint(w, window.last_metrics)
            if st.step >= cfg.train.max_steps:
                break
        else:
            st.epoch, st.step_in_epoch = st.epoch + 1, 0
    if cfg.tracking.log_model:
        _export_model(w)
    w.log.flush()


class _Window:
    """Metrics accumulated between two logs (averaged, so logs are not single-batch noise)."""

    def __init__(self) -> None:
        self.reset()
        self.last_metrics: dict[str, float] = {}
        self.t0 = time.perf_counter()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.extras: dict[str, float] = {}
        self.count = 0
        self.kl_dims: Optional[torch.Tensor] = None
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        if out.get("skipped"):
            return
        self.count += 1
        for k in ("loss", "recon", "kl", "elbo", "beta"):
            self.sums[k] = self.sums.get(k, 0.0) + out[k]
        for k, v in out.get("extras", {}).items():
            self.extras[k] = self.extras.get(k, 0.0) + v
        kd = out["kl_per_dim"]
        self.kl_dims = kd.clone() if self.kl_dims is None else self.kl_dims + kd


def _log_window(w: Worker, win: _Window) -> None:
    st, cfg = w.state, w.cfg
    n = max(win.count, 1)
    local = [win.sums.get(k, math.nan) / n for k in ("loss", "recon", "kl", "elbo")]
    extra_keys = sorted(win.extras)  # the same keys on every rank: same model, same code path
    local += [win.extras[k] / n for k in extra_keys]
    # Mean over ranks of each rank's window mean; skipped/corrupt counts are summed.
    ds_skipped = getattr(w.engine, "skipped_steps", 0) or 0
    reduced = _all_reduce(local + [float(st.corrupt_samples)], w.device)
    loss, recon, kl, elbo = (v / w.world_size for v in reduced[:4])
    extras = {k: v / w.world_size for k, v in zip(extra_keys, reduced[4:-1])}
    elapsed = time.perf_counter() - win.t0
    kl_dims = win.kl_dims / n if win.kl_dims is not None else torch.zeros(cfg.model.latent_dim)
    metrics = {
        "loss": loss, "recon": recon, "kl": kl, "elbo": elbo,
        "beta": win.sums.get("beta", 0.0) / n,
        "active_units": float((kl_dims > 0.01).sum()),
        "skipped_steps": float(st.skipped_steps + ds_skipped),
        "corrupt_samples": reduced[-1],
        "images_per_sec": win.count * cfg.data.batch_size * cfg.train.grad_accum_steps * w.world_size / max(elapsed, 1e-9),
        "epoch": float(st.epoch),
    }
    metrics.update(extras)
    metrics.update({f"kl_dim/{i:03d}": float(v) for i, v in enumerate(kl_dims.tolist())})
    w.last_kl_dims = kl_dims
    w.log.metrics(metrics, st.step)
    st.history.append([st.step, loss])
    if w.rank == 0:
        print(f"[vaepipe] step {st.step}/{cfg.train.max_steps} loss {loss:.2f} recon {recon:.2f} kl {kl:.2f} "
              f"beta {metrics['beta']:.3f} AU {int(metrics['active_units'])} {metrics['images_per_sec']:.0f} img/s", flush=True)
    win.last_metrics = {k: v for k, v in metrics.items() if not k.startswith("kl_dim/")}
    win.reset()


def _validate(w: Worker) -> None:
    """Light evaluation on the valid split: loss, ELBO terms, active units and a collapse check.

    Ranks may hold different numbers of validation batches; under ZeRO-3 every forward is a
    collective, so all ranks score the smallest count.
    """
    from pipeline.evaluate.diagnostics import active_units_kl, collapse_verdict

    batches = list(w.stream.iter_eval("valid", max_batches=w.cfg.data.val_batches))
    n = int(-_all_reduce([-float(len(batches))], w.device, op="max")[0])  # min over ranks
    module = w.engine.module
    was_training = module.training
    module.eval()
    sums, kl_dims = [0.0, 0.0, 0.0, 0.0], None
    with torch.no_grad():
        for batch in batches[:n]:
            out = w.engine(batch["image"].to(w.device).to(_dtype(w)), beta=w.cfg.model.beta, free_bits=0.0)
            for i, k in enumerate(("loss", "recon", "kl", "elbo")):
                sums[i] += float(out[k])
            kd = out["kl_per_dim"].detach().double().cpu()
            kl_dims = kd if kl_dims is None else kl_dims + kd
    module.train(was_training)
    dims = kl_dims.tolist() if kl_dims is not None else []
    reduced = _all_reduce(sums + dims, w.device)
    count = max(n * w.world_size, 1)
    val = {f"val_{k}": reduced[i] / count for i, k in enumerate(("loss", "recon", "kl", "elbo"))}
    kl_per_dim = torch.tensor(reduced[4:]) / count
    if len(kl_per_dim):
        val["val_active_units"] = float(active_units_kl(kl_per_dim))
        verdict = collapse_verdict(kl_per_dim, val["val_kl"])
        if verdict["collapsed"] and w.rank == 0:
            warnings.warn(f"step {w.state.step}: {verdict['message']}", RuntimeWarning, stacklevel=1)
        w.log.tags({"vaepipe.posterior_collapse": verdict["collapsed"]})
    w.log.metrics(val, w.state.step)
    # negative ELBO on the validation split is what sweeps optimise
    w.last_val = {"val_loss": val["val_loss"], "val_neg_elbo": -val["val_elbo"]}


def _dtype(w: Worker) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(w.precision, torch.float32)


def _log_images(w: Worker, batch: dict) -> None:
    """Reconstruction and sample grids, plus the per-dimension KL bar plot (rank 0 only).

    Under ZeRO-3 every rank must take part in the forward (parameters are gathered
    collectively), so all ranks compute and only rank 0 writes.
    """
    module, n = w.engine.module, w.cfg.tracking.image_grid_size
    was_training = module.training
    module.eval()
    with torch.no_grad():
        x = batch["image"][: n * n // 2].to(w.device).to(_dtype(w))
        recon = module.reconstruct(x)
        # every rank draws the same z (ZeRO-3 runs the decoder collectively), fixed across steps
        rng_state = torch.get_rng_state()
        torch.manual_seed(w.cfg.train.seed)
        samples = module.sample(n * n, device=w.device)
        torch.set_rng_state(rng_state)
    module.train(was_training)
    if w.rank != 0:
        return
    pairs = torch.stack([x.float().cpu(), recon.float().cpu()], dim=1).flatten(0, 1)  # input, recon, ...
    step = w.state.step
    w.log.image(make_grid(pairs.numpy(), nrow=n), f"images/reconstructions_step{step:07d}.png")
    w.log.image(make_grid(samples.float().cpu().numpy(), nrow=n), f"images/samples_step{step:07d}.png")
    if w.last_kl_dims is not None and w.last_kl_dims.numel():
        fig = kl_bar_plot(w.last_kl_dims, title=f"per-dimension KL at step {step}")
        w.log.figure(fig, f"images/kl_per_dim_step{step:07d}.png")


def _checkpoint(w: Worker, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard into its own folder, then all report one checkpoint.

    Ray merges the ranks' folders into one checkpoint on storage, so a restart on any
    rank layout that matches the world size finds every shard.
    """
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        saved = {"train_state": w.state.state_dict(), "data_state": w.stream.state_dict(),
                 "config": to_dict(w.cfg), "mlflow_run_id": w.log.run_id}
        w.engine.save_checkpoint(tmp, tag=CKPT_TAG, client_state={"vaepipe": saved})
        if w.rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps(saved))
            if w.aux is not None:
                torch.save(w.aux.state_dict(), Path(tmp) / AUX_FILE)
            (Path(tmp) / "config.yaml").write_text(to_yaml(w.cfg))
        report = {**metrics, **w.last_val, "step": w.state.step}
        ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _export_model(w: Worker) -> None:
    """Gather full fp32 weights (all ranks, for ZeRO-3) and let rank 0 log the pyfunc."""
    import deepspeed

    module = w.engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
                 for k, v in module.state_dict().items()}
    if w.rank != 0:
        return
    from pipeline.serving import log_pyfunc

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "weights.pt"
        # the family's constructor args (what build_model needs), keyed by the registered name
        model_config = {"name": w.cfg.model.name, **dict(getattr(module, "config", {}) or to_dict(w.cfg)["model"])}
        torch.save({"model_config": model_config, "state_dict": state, "config": to_dict(w.cfg)}, path)
        uri = log_pyfunc(w.log.run_id, path, model_config, to_yaml(w.cfg))
    w.log.tags({"vaepipe.model_uri": uri})


def _maybe_fault(step: int, fault: dict) -> None:
    """Fault injection for fault-tolerance tests and drills: with ``VAEPIPE_FAULT_AT_STEP=N`` and
    ``VAEPIPE_FAULT_MARKER=<file>`` in the driver's environment, the process of every rank
    that reaches step N first dies once (the marker file keeps the restarted group alive)."""
    at, marker = fault.get("VAEPIPE_FAULT_AT_STEP"), fault.get("VAEPIPE_FAULT_MARKER")
    if at and marker and step == int(at) and not Path(marker).exists():
        Path(marker).write_text(str(step))
        os._exit(1)

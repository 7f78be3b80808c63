"""What a run shows while it trains: metric windows, validation, image grids (rank 0 writes).

Every function here that runs the model is called on every rank: under ZeRO-3 a forward
gathers parameters collectively, so all ranks compute and only rank 0 logs.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from typing import Any, Optional

import torch

from pipeline.evaluate.visualize import kl_bar_plot, make_grid
from pipeline.tracking import say
from pipeline.train.collectives import all_reduce_values
from pipeline.train.engine import input_dtype


class MetricWindow:
    """Metrics accumulated between two logs (averaged, so logs are not single-batch noise)."""

    def __init__(self) -> None:
        self.reset()
        self.last_metrics: dict[str, float] = {}

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.extras: dict[str, float] = {}
        # per key: a metric may be absent from some steps (a skipped discriminator update
        # reports only disc_skipped), so each extra is averaged over the steps that had it
        self.extra_counts: dict[str, int] = {}
        self.count = 0
        self.kl_dims: Optional[torch.Tensor] = None
        self.t0 = time.perf_counter()

    def add(self, out: dict) -> None:
        if out.get("skipped"):
            return
        self.count += 1
        for k in ("loss", "recon", "kl", "elbo", "beta"):
            self.sums[k] = self.sums.get(k, 0.0) + _wide(out[k])
        for k, v in out.get("extras", {}).items():
            self.extras[k] = self.extras.get(k, 0.0) + _wide(v)
            self.extra_counts[k] = self.extra_counts.get(k, 0) + 1
        kd = _wide(out["kl_per_dim"])
        self.kl_dims = kd.clone() if self.kl_dims is None else self.kl_dims + kd


def _wide(v):
    """Device tensors stay where they are (summed in float64: bf16 sums lose digits fast)."""
    return v.detach().double() if torch.is_tensor(v) else v


def eta(seconds: float) -> str:
    """Time left as a person reads it: ``45s``, ``3m12s``, ``2h05m``."""
    s = int(round(seconds))
    hours, rest = divmod(s, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def log_window(w: Any, win: MetricWindow) -> None:
    """Average the window over ranks, log it (rank 0) and start a new window."""
    st, cfg = w.state, w.cfg
    n = max(win.count, 1)
    local = [float(win.sums.get(k, math.nan)) / n for k in ("loss", "recon", "kl", "elbo")]
    # the same keys on every rank: same model, same code path, skips agreed over ranks
    extra_keys = sorted(win.extras)
    local += [float(win.extras[k]) / win.extra_counts[k] for k in extra_keys]
    # where each step's time went on this rank (``train.phase_timers``), as ms per step
    timing = {f"time_ms/{k}": v for k, v in w.clock.take(win.count).items()} if getattr(w, "clock", None) else {}
    extra_keys += sorted(timing)
    local += [timing[k] for k in sorted(timing)]
    # Mean over ranks of each rank's window mean; skipped/corrupt counts are summed.
    ds_skipped = getattr(w.engine, "skipped_steps", 0) or 0
    reduced = all_reduce_values(local + [float(st.corrupt_samples)], w.device)
    loss, recon, kl, elbo = (v / w.world_size for v in reduced[:4])
    extras = {k: v / w.world_size for k, v in zip(extra_keys, reduced[4:-1])}
    elapsed = time.perf_counter() - win.t0
    kl_dims = (win.kl_dims / n).float().cpu() if win.kl_dims is not None else torch.zeros(0)
    metrics = {
        "loss": loss, "recon": recon, "kl": kl,
        **({"elbo": elbo} if w.objective == "neg_elbo" else {w.objective: -elbo}),
        "beta": float(win.sums.get("beta", 0.0)) / n,
        "active_units": float((kl_dims > 0.01).sum()),
        "skipped_steps": float(st.skipped_steps + ds_skipped),
        "grad_norm_skips": float(st.grad_norm_skips),
        "corrupt_samples": reduced[-1],
        "images_per_sec": win.count * cfg.data.batch_size * cfg.train.grad_accum_steps * w.world_size / max(elapsed, 1e-9),
        "epoch": float(st.epoch),
        "world_size": float(w.world_size),
    }
    metrics.update(extras)
    if cfg.tracking.kl_per_dim_metrics:
        metrics.update({f"kl_dim/{i:03d}": float(v) for i, v in enumerate(kl_dims.tolist())})
    w.last_kl_dims = kl_dims
    w.log.metrics(metrics, st.step)
    st.history.append([st.step, loss])
    if w.rank == 0:
        left = cfg.train.max_steps - st.step
        say(f"step {st.step}/{cfg.train.max_steps} loss {loss:.2f} recon {recon:.2f} kl {kl:.2f} "
            f"beta {metrics['beta']:.3f} AU {int(metrics['active_units'])} {metrics['images_per_sec']:.0f} img/s"
            + (f" {100 * st.step // cfg.train.max_steps}% eta {eta(left * elapsed / max(win.count, 1))}" if left > 0 else ""))
    win.last_metrics = {k: v for k, v in metrics.items() if not k.startswith("kl_dim/")}
    win.reset()


VALIDATION_STREAM = 0x76616C  # the seed coordinate of validation's own draws ("val")


def validate(w: Any) -> None:
    """Light evaluation on the valid split: loss, ELBO terms, active units and a collapse check.

    Ranks may hold different numbers of validation batches; under ZeRO-3 every forward is a
    collective, so all ranks score the smallest count.

    Its noise (the posterior samples) is drawn from generators of its own, seeded alike at every
    validation: two checkpoints are scored with the same draws, and the training's random stream
    is the same whichever steps are validated (every checkpoint step is, for its model).
    """
    from pipeline.evaluate.diagnostics import active_units_kl, collapse_verdict
    from pipeline.seeds import mixed_seeds

    batches = list(w.stream.iter_eval("valid", max_batches=w.cfg.data.val_batches))
    n = int(-all_reduce_values([-float(len(batches))], w.device, op="max")[0])  # min over ranks
    module = w.engine.module
    was_training = module.training
    module.eval()
    sums, kl_dims = [0.0, 0.0, 0.0, 0.0], None
    with torch.no_grad(), torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
        torch.manual_seed(mixed_seeds(w.cfg.train.seed, VALIDATION_STREAM, w.rank)[0])
        for batch in batches[:n]:
            out = w.engine(batch["image"].to(w.device).to(input_dtype(w.precision)), beta=w.cfg.model.beta, free_bits=0.0)
            for i, k in enumerate(("loss", "recon", "kl", "elbo")):
                sums[i] += float(out[k])
            kd = out["kl_per_dim"].detach().double().cpu()
            kl_dims = kd if kl_dims is None else kl_dims + kd
    module.train(was_training)
    dims = kl_dims.tolist() if kl_dims is not None else []
    reduced = all_reduce_values(sums + dims, w.device)
    count = max(n * w.world_size, 1)
    val = {f"val_{k}": reduced[i] / count for i, k in enumerate(("loss", "recon", "kl"))}
    # named for what it is: val_neg_elbo only where -elbo is a bound (models.objective_name)
    val[f"val_{w.objective}"] = -reduced[3] / count
    kl_per_dim = torch.tensor(reduced[4:]) / count
    if len(kl_per_dim):
        val["val_active_units"] = float(active_units_kl(kl_per_dim))
        verdict = collapse_verdict(kl_per_dim, val["val_kl"])
        if verdict["collapsed"] and w.rank == 0:
            warnings.warn(f"step {w.state.step}: {verdict['message']}", RuntimeWarning, stacklevel=1)
        w.log.tags({"vaepipe.posterior_collapse": verdict["collapsed"]})
    w.log.metrics(val, w.state.step)
    # what sweeps rank: val_neg_elbo for bounds; other families report their own quantity
    w.last_val = {"val_loss": val["val_loss"], f"val_{w.objective}": val[f"val_{w.objective}"]}


def log_images(w: Any, batch: dict) -> None:
    """Reconstruction and sample grids, latent traversals and the per-dimension KL bar plot,
    logged as MLflow images (key + step, for the UI's step slider; rank 0 writes).

    Every rank calls this (the gather below is collective); all ranks compute and only rank 0
    writes.
    """
    module, n = w.engine.module, w.cfg.tracking.image_grid_size
    was_training = module.training
    module.eval()
    with torch.no_grad(), gathered_for_direct_calls(w):
        x = batch["image"][: n * n // 2].to(w.device).to(input_dtype(w.precision))
        recon = module.reconstruct(x)
        # every rank draws the same z, fixed across steps; fork_rng puts back every generator
        # it touched (CUDA's too), so each rank's own training noise stream carries on unchanged
        with torch.random.fork_rng(devices=[w.device] if w.device.type == "cuda" else []):
            torch.manual_seed(w.cfg.train.seed)
            samples = module.sample(n * n, device=w.device)
        traversals = _traversals(module, x[:1], w.last_kl_dims)
    module.train(was_training)
    if w.rank != 0:
        return
    pairs = torch.stack([x.float().cpu(), recon.float().cpu()], dim=1).flatten(0, 1)  # input, recon, ...
    step = w.state.step
    w.log.image(make_grid(pairs.numpy(), nrow=n), "reconstructions", step)
    w.log.image(make_grid(samples.float().cpu().numpy(), nrow=n), "samples", step)
    if traversals is not None:
        w.log.image(make_grid(traversals.float().cpu()), "traversals", step)
    if w.last_kl_dims is not None and w.last_kl_dims.numel():
        fig = kl_bar_plot(w.last_kl_dims, title=f"per-dimension KL at step {step}")
        w.log.figure(fig, "kl_per_dim", step)


def gathered_for_direct_calls(w: Any):
    """Under ZeRO-3: the whole model gathered on every rank, for calls outside ``engine.forward``.

    ``reconstruct`` and ``sample`` are not the engine's forward, and families read parameters
    outside the forward of the module that owns them (MoG prior logits/means/scales in
    ``sample``, the ladder's ``h_top``, conv skip gates, a grad-trained VQ codebook lookup).
    ZeRO-3 gathers a parameter only inside its owner's forward (or, for such "external" reads,
    only while ``engine.forward`` runs), so these reads would see an empty partition; they
    happened to work only right after an eval forward, which leaves parameters gathered.
    Why the whole module rather than per-site fixes: ``models/`` is torch only and cannot
    register external parameters, every new family adds such reads, and the cost is one
    full copy of a VAE's weights per rank for the length of one image call, as export pays.
    Collective: every rank must call it together (log_images runs on all ranks).
    """
    if w.cfg.dist.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(w.engine.module.parameters()), modifier_rank=None)


def _traversals(module: Any, x0: torch.Tensor, kl_dims: Optional[torch.Tensor], rows: int = 8):
    """Traversals of the ``rows`` most informative units (the first ones before any KL is
    known), for families with a flat Gaussian latent (``encode`` -> (mu, logvar)); None for
    the others (VQ grids, code priors)."""
    from pipeline.evaluate.visualize import latent_traversals

    code = module.encode(x0)
    if not isinstance(code, tuple):
        return None
    if kl_dims is not None and kl_dims.numel():
        dims = torch.argsort(kl_dims.float(), descending=True)[:rows].tolist()
    else:
        dims = list(range(min(rows, code[0].shape[1])))
    return latent_traversals(module, x0, dims=dims, steps=9)

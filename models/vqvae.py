"""VQ-VAE (``vqvae``, van den Oord et al. 2017) with an EMA or gradient-trained codebook.

Encoder: ``log2(downsample)`` conv down blocks and a 1×1 projection to a ``code_dim`` grid of
side ``resolution / downsample``. Each grid vector is replaced by its nearest codebook vector
(straight-through gradient), and a mirrored conv decoder maps the grid back to likelihood
parameters.

Loss (per-sample units, like the other families' ``recon``):
``recon + commitment·Σ||z_e − sg(z_q)||²`` (+ ``Σ||sg(z_e) − z_q||²`` when ``update == "grad"``),
sums taken over the code grid of one sample.

Likelihood bookkeeping: the posterior is a deterministic one-hot over codes and the prior is
uniform over K codes, so KL[q||p] = h·w·log K nats per image — a constant that does not train
anything. ``kl`` is reported as 0, ``kl_per_dim`` is empty, and ``elbo = −recon`` (the ELBO up to
that constant; ``log_likelihood_terms`` includes it). ``sample(n)`` without a learned prior draws
codes uniformly, so its images are only a sanity check; train ``vq_prior`` for real samples.

Codebook under ``update == "ema"``: a buffer (no gradient can reach it; ZeRO-3 does not partition
buffers), updated in train-mode forward passes:
N_k ← γN_k + (1−γ)n_k,  m_k ← γm_k + (1−γ)Σ_{i→k} z_e,i,  Ñ_k = (N_k + ε)/(N + Kε)·N,  e_k = m_k/Ñ_k.
Dead codes (N_k < ``dead_code_threshold``) are re-initialised from random encoder outputs of the
current batch. Usage statistics N_k are tracked under ``update == "grad"`` too, so restarts work
in both modes.

Multi-rank training: ``models`` never touches torch.distributed. By default statistics are
per-rank (and codebooks drift apart). The pipeline makes them global by calling
``model.set_stat_reducer(fn)`` with ``fn(t) -> t summed over ranks`` (e.g. an all-reduce SUM that
returns its argument): counts n_k and sums Σz_e are reduced before the EMA step, and restart
vectors are averaged over ranks, so every rank applies the identical update and codebooks stay
bit-identical. Every rank calls forward in lockstep, so the collectives match.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from models.config_access import check_positive_ints, make_likelihood, resolve_family_config, to_plain
from models.layers import make_down_block, make_up_block
from models.likelihoods import at_least_float32
from models.registry import register_model

StatReducer = Callable[[torch.Tensor], torch.Tensor]


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation with straight-through gradients, EMA updates and restarts."""

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        update: str = "ema",
        ema_decay: float = 0.99,
        ema_epsilon: float = 1e-5,
        dead_code_threshold: float = 1.0,
    ) -> None:
        super().__init__()
        if update not in ("ema", "grad"):
            raise ValueError(f"model.vq.update must be 'ema' or 'grad', got {update!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"model.vq.ema_decay must be in [0, 1), got {ema_decay!r}")
        if not ema_epsilon > 0:
            raise ValueError(f"model.vq.ema_epsilon must be > 0, got {ema_epsilon!r}")
        if not dead_code_threshold >= 0:
            raise ValueError(f"model.vq.dead_code_threshold must be >= 0 (0 disables), got {dead_code_threshold!r}")
        self.codebook_size, self.code_dim, self.update = codebook_size, code_dim, update
        self.decay, self.epsilon, self.dead_threshold = ema_decay, ema_epsilon, dead_code_threshold
        init = torch.empty(codebook_size, code_dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if update == "ema":
            self.register_buffer("codebook", init)
        else:
            self.codebook = nn.Parameter(init)
        # N_k starts at 1 so that m_k = e_k and the first EMA step is consistent.
        self.register_buffer("ema_cluster_size", torch.ones(codebook_size))
        self.register_buffer("ema_embed_sum", init.clone())
        self.stat_reducer: StatReducer | None = None

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.stat_reducer is None else self.stat_reducer(t)

    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """argmin_k ||z − e_k||² for flat [N, D] via ||z||² − 2z·e + ||e||² (an [N, K] matrix only)."""
        flat = flat.float()
        book = self.codebook.float()
        dist = flat.pow(2).sum(1, keepdim=True) - 2.0 * flat @ book.t() + book.pow(2).sum(1)[None, :]
        return dist.argmin(dim=1)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> codebook vectors as a grid [B, D, h, w]."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2)

    @torch.no_grad()
    def _update_statistics(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """EMA step (and codebook refresh under ``ema``), then dead-code restarts; returns #restarted."""
        flat = flat.float()
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        counts = self._reduce(counts)
        size = self.ema_cluster_size.float().mul(self.decay).add(counts, alpha=1.0 - self.decay)
        self.ema_cluster_size.copy_(size)
        if self.update == "ema":
            sums = torch.zeros(self.codebook_size, self.code_dim, device=flat.device)
            sums.index_add_(0, codes, flat)
            sums = self._reduce(sums)
            embed_sum = self.ema_embed_sum.float().mul(self.decay).add(sums, alpha=1.0 - self.decay)
            self.ema_embed_sum.copy_(embed_sum)
            total = size.sum()
            smoothed = (size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
            self.codebook.copy_(embed_sum / smoothed[:, None])
        return self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> torch.Tensor:
        if self.dead_threshold <= 0:
            return torch.zeros((), device=flat.device)
        dead = self.ema_cluster_size < self.dead_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return torch.zeros((), device=flat.device)
        picks = torch.randint(0, flat.shape[0], (self.codebook_size,), device=flat.device)
        candidates = flat[picks]
        if self.stat_reducer is not None:
            world = self._reduce(torch.ones((), device=flat.device))
            candidates = self._reduce(candidates) / world  # identical on every rank
        self.codebook.data[dead] = candidates[dead].to(self.codebook.dtype)
        self.ema_cluster_size[dead] = self.dead_threshold
        self.ema_embed_sum[dead] = (candidates[dead] * self.dead_threshold).to(self.ema_embed_sum.dtype)
        return torch.tensor(float(num_dead), device=flat.device)

    def forward(self, z_e: torch.Tensor) -> dict[str, torch.Tensor]:
        """Quantise z_e [B, D, h, w]: straight-through z_q, codes [B, h, w], losses and usage metrics.

        Quantisation uses the codebook as it was before this call's EMA update (as in Sonnet).
        """
        b, d, hh, ww = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        codes_flat = self.nearest_codes(flat)
        codes = codes_flat.view(b, hh, ww)
        z_q = self.lookup(codes).to(z_e.dtype)
        commitment = (z_e.float() - z_q.detach().float()).pow(2).flatten(1).sum(1).mean()
        codebook_loss = (z_e.detach().float() - z_q.float()).pow(2).flatten(1).sum(1).mean()
        z_st = z_e + (z_q - z_e).detach()  # forward value z_q, gradient passed to z_e unchanged
        with torch.no_grad():
            usage = torch.bincount(codes_flat, minlength=self.codebook_size).float()
            probs = usage / usage.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())
            used = (usage > 0).float().mean()
        restarted = torch.zeros((), device=z_e.device)
        if self.training:
            restarted = self._update_statistics(flat.detach(), codes_flat)
        return {
            "z_q": z_st, "codes": codes, "commitment": commitment, "codebook_loss": codebook_loss,
            "perplexity": perplexity, "usage": used, "restarted": restarted,
        }


BASE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "resolution": 64,
    "base_channels": 32,
    "likelihood": "bernoulli",
    "obs_std": 0.1,
    "logistic_components": 5,
    "vq": {
        "codebook_size": 512, "code_dim": 64, "downsample": 4, "commitment": 0.25,
        "update": "ema", "ema_decay": 0.99, "ema_epsilon": 1e-5, "dead_code_threshold": 1.0,
    },
}

FLAVORS: dict[str, dict[str, Any]] = {
    "base": {},
    "debug": {"base_channels": 8, "vq": {"codebook_size": 16, "code_dim": 8}},
}


@register_model("vqvae")
class VQVAE(nn.Module):
    """VQ-VAE; see the module docstring. ``encoder_blocks`` / ``decoder_blocks`` are checkpointable."""

    # A grid of discrete codes, not a Gaussian vector: evaluation draws the posterior with
    # ``sample_posterior`` and leaves out the per-unit metrics (active units, MIG, SAP, traversals).
    latent_kind = "codes"

    def __init__(
        self,
        in_channels: int = 3,
        resolution: int = 64,
        base_channels: int = 32,
        likelihood: str = "bernoulli",
        obs_std: float = 0.1,
        logistic_components: int = 5,
        vq: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        vq = {**BASE_DEFAULTS["vq"], **(to_plain(vq) or {})}
        check_positive_ints(
            "vqvae", in_channels=in_channels, resolution=resolution, base_channels=base_channels,
            **{"vq.codebook_size": vq["codebook_size"], "vq.code_dim": vq["code_dim"],
               "vq.downsample": vq["downsample"]},
        )
        downsample = int(vq["downsample"])
        if downsample & (downsample - 1) or resolution % downsample:
            raise ValueError(
                f"model.vq.downsample must be a power of two dividing model.resolution={resolution}, "
                f"got {downsample}"
            )
        if not vq["commitment"] >= 0:
            raise ValueError(f"model.vq.commitment must be >= 0, got {vq['commitment']!r}")
        vq = {
            "codebook_size": int(vq["codebook_size"]), "code_dim": int(vq["code_dim"]),
            "downsample": downsample, "commitment": float(vq["commitment"]), "update": vq["update"],
            "ema_decay": float(vq["ema_decay"]), "ema_epsilon": float(vq["ema_epsilon"]),
            "dead_code_threshold": float(vq["dead_code_threshold"]),
        }
        self.config = {
            "in_channels": int(in_channels), "resolution": int(resolution),
            "base_channels": int(base_channels), "likelihood": likelihood, "obs_std": float(obs_std),
            "logistic_components": int(logistic_components), "vq": vq,
        }
        self.in_channels, self.resolution = int(in_channels), int(resolution)
        self.codebook_size, self.code_dim = vq["codebook_size"], vq["code_dim"]
        self.grid = self.resolution // downsample
        self.commitment_weight = vq["commitment"]
        self.likelihood, params_per_channel = make_likelihood(
            likelihood, obs_std, int(logistic_components), self.in_channels
        )
        self.quantizer = VectorQuantizer(
            vq["codebook_size"], vq["code_dim"], vq["update"], vq["ema_decay"], vq["ema_epsilon"],
            vq["dead_code_threshold"],
        )
        self._build(int(base_channels), int(math.log2(downsample)), params_per_channel)

    @classmethod
    def resolve_config(cls, cfg: Any) -> dict[str, Any]:
        """Constructor kwargs: base defaults < flavor preset < fields the config sets."""
        return resolve_family_config(cfg, BASE_DEFAULTS, FLAVORS, "vqvae")

    @classmethod
    def from_config(cls, cfg: Any) -> "VQVAE":
        """Build from a duck-typed model config (dataclass / OmegaConf / namespace / dict)."""
        return cls(**cls.resolve_config(cfg))

    def _build(self, base: int, stages: int, params_per_channel: int) -> None:
        widths = [base * 2 ** min(i, 2) for i in range(stages)]
        blocks, prev = [], self.in_channels
        for width in widths:
            blocks.append(make_down_block(prev, width, batch_norm=False))
            prev = width
        self.encoder_blocks = nn.ModuleList(blocks)
        self.pre_quant = nn.Sequential(
            nn.Conv2d(prev, prev, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(prev, self.code_dim, 1)
        )
        out_ch = self.in_channels * params_per_channel
        top = widths[-1] if widths else base
        blocks = [nn.Sequential(nn.Conv2d(self.code_dim, top, 3, padding=1), nn.ReLU(inplace=True))]
        rev = widths[::-1]
        for i, width in enumerate(rev):
            last = i == len(rev) - 1
            nxt = out_ch if last else rev[i + 1]
            blocks.append(make_up_block(width, nxt, batch_norm=False, activation=not last))
        if not widths:
            blocks.append(nn.Conv2d(top, out_ch, 3, padding=1))
        self.decoder_blocks = nn.ModuleList(blocks)

    def set_stat_reducer(self, reducer: StatReducer | None) -> None:
        """Install ``reducer(t) -> t summed over ranks`` for codebook statistics (None: per-rank)."""
        self.quantizer.stat_reducer = reducer

    def checkpoint_blocks(self) -> list[list[nn.Module]]:
        """Encoder conv blocks and the pre-quantisation convs, decoder conv blocks (the quantiser
        is never recomputed: it updates state)."""
        return [list(self.encoder_blocks), [self.pre_quant], list(self.decoder_blocks)]

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.resolution, self.resolution)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"vqvae expects input of shape [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                f"(model.in_channels, model.resolution), got {list(x.shape)}"
            )

    def encode_continuous(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-quantisation encoder output z_e [B, code_dim, h, w]."""
        self._check_input(x)
        h = x
        for block in self.encoder_blocks:
            h = block(h)
        return self.pre_quant(h)

    def decode_logits(self, z_q: torch.Tensor) -> torch.Tensor:
        """Raw likelihood parameters for a quantised grid [B, code_dim, h, w]."""
        h = z_q.to(next(self.decoder_blocks.parameters()).dtype)  # the codebook may be kept in fp32
        for block in self.decoder_blocks:
            h = block(h)
        return h

    @torch.no_grad()
    def encode_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Code indices LongTensor [B, h, w] (no EMA update, no gradient)."""
        z_e = self.encode_continuous(x)
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, self.code_dim)
        return self.quantizer.nearest_codes(flat).view(z_e.shape[0], z_e.shape[2], z_e.shape[3])

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] for code indices [B, h, w]."""
        if codes.dtype not in (torch.int64, torch.int32) or codes.dim() != 3:
            raise ValueError(f"vqvae.decode_codes expects integer codes [B, h, w], got {codes.dtype} {list(codes.shape)}")
        return self.likelihood.mean(self.decode_logits(self.quantizer.lookup(codes.long())))

    def sample_posterior(self, x: torch.Tensor) -> torch.Tensor:
        """A draw of q(z|x): the posterior is one-hot, so every draw is x's own codes [B, h, w]."""
        return self.encode_codes(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Quantised latent grid z_q [B, code_dim, h, w] (what ``decode`` takes)."""
        return self.quantizer.lookup(self.encode_codes(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from a grid z_q [B, code_dim, h, w] or integer codes [B, h, w]."""
        if not torch.is_floating_point(z):
            return self.decode_codes(z)
        return self.likelihood.mean(self.decode_logits(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode_codes(x)) in [0, 1] (no gradient, no codebook update)."""
        return self.decode_codes(self.encode_codes(x))

    @torch.no_grad()
    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n images from uniformly random codes (the VQ-VAE's own prior; use vq_prior for real samples)."""
        device = self.quantizer.codebook.device if device is None else device
        codes = torch.randint(0, self.codebook_size, (n, self.grid, self.grid), device=device)
        return self.decode_codes(codes)

    def forward(
        self,
        x: torch.Tensor,
        beta: float | torch.Tensor | None = None,
        free_bits: float = 0.0,
        target_kl: float = 0.0,
        aux: Any = None,
    ) -> dict[str, Any]:
        """Reconstruction + commitment (+ codebook) loss; beta / free_bits / target_kl do not apply
        (there is no trainable KL) and are accepted for the shared protocol. In train mode this
        updates the codebook statistics (EMA and restarts)."""
        z_e = self.encode_continuous(x)
        q = self.quantizer(z_e)
        params = self.decode_logits(q["z_q"])
        recon = self.likelihood.nll(params.float(), x.float()).mean()
        loss = recon + self.commitment_weight * q["commitment"]
        if self.quantizer.update == "grad":
            loss = loss + q["codebook_loss"]
        # q(z|x) is one-hot and p(z) uniform over K codes at each of the h*w positions, so
        # KL(q||p) = h*w*log K for every image: the constant that makes -(recon + kl) a bound.
        kl = recon.new_full((), self.grid * self.grid * math.log(self.codebook_size))
        metrics = {
            "commitment": q["commitment"].detach(),
            "codebook_perplexity": q["perplexity"],
            "codebook_usage": q["usage"],
            "dead_codes_restarted": q["restarted"],
        }
        if self.quantizer.update == "grad":
            metrics["codebook_loss"] = q["codebook_loss"].detach()
        return {
            "loss": loss,
            "recon": recon,
            "kl": kl,
            "kl_per_dim": recon.new_zeros(0),
            "elbo": -(recon + kl),
            "x_hat": self.likelihood.mean(params),
            "codes": q["codes"],
            "z_e": z_e,
            "metrics": metrics,
        }

    @torch.no_grad()
    def log_likelihood_terms(self, x: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """For codes z [B, h, w]: log p(x|z_q), log p(z) = −h·w·log K (uniform prior) and
        log q(z|x) = 0 where z are x's own codes, −inf otherwise (the posterior is one-hot)."""
        params = at_least_float32(self.decode_logits(self.quantizer.lookup(z.long())))
        own = (self.encode_codes(x) == z).flatten(1).all(dim=1)
        log_q = torch.where(own, 0.0, float("-inf")).to(params)
        log_pz = torch.full_like(log_q, -z[0].numel() * math.log(self.codebook_size))
        return {"log_px_z": self.likelihood.log_prob(params, at_least_float32(x)), "log_pz": log_pz, "log_qz_x": log_q}

"""ELBO decomposition, active units and posterior-collapse checks over a data set.

Everything is accumulated in float64 (:class:`ELBOAccumulator`): sums and counts for the ELBO
terms, per-dim (count, mean, M2) moments for the posterior means. A distributed evaluation
gathers the workers' ``state_dict()`` and merges them (Chan's parallel formula for the
moments); the averages are only formed in ``compute()``.

Two definitions of an *active* latent unit are offered because they answer different
questions:

* KL-based: the data-averaged KL of dimension i, E_x KL(q(z_i|x) || p(z_i)), exceeds a
  threshold. Cheap (it is the model's ``kl_per_dim``), but a unit whose posterior differs from
  the prior by the same amount for every x counts as active though it carries no information.
* Covariance-based (Burda et al. 2016): A_i = Cov_x(E_{q(z|x)}[z_i]) > threshold, i.e. the
  posterior mean of unit i moves with the input.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

__all__ = [
    "ELBOAccumulator",
    "evaluate_elbo",
    "active_units_kl",
    "active_units_cov",
    "collapse_verdict",
    "ACTIVE_UNIT_THRESHOLD",
    "COLLAPSE_MIN_TOTAL_KL",
    "COLLAPSE_MAX_INACTIVE_FRACTION",
]

ACTIVE_UNIT_THRESHOLD = 0.01  # nats (KL) or variance units (cov); Burda et al. use 1e-2
COLLAPSE_MIN_TOTAL_KL = 0.1  # nats per sample: below this the decoder ignores z
COLLAPSE_MAX_INACTIVE_FRACTION = 0.9  # more than 90% of the units inactive

_SCALARS = ("elbo_sum", "recon_sum", "kl_sum", "count")
_MU_MOMENTS = ("mu_count", "mu_mean", "mu_m2")


def _as_float64_vector(values: Any) -> torch.Tensor:
    return torch.as_tensor(values).detach().to("cpu", torch.float64).reshape(-1)


def active_units_kl(kl_per_dim: Any, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Number of dims whose data-averaged KL (nats) exceeds ``threshold``."""
    return int((_as_float64_vector(kl_per_dim) > threshold).sum())


def active_units_cov(mu_all: Any, threshold: float = ACTIVE_UNIT_THRESHOLD) -> int:
    """Burda et al.'s count: dims whose posterior mean has variance over the data > threshold.

    ``mu_all`` is [N, D] (posterior means, one row per input). The variance is the population
    variance (divide by N), the same as the streaming version in :class:`ELBOAccumulator`.
    """
    mu = torch.as_tensor(mu_all).detach().to("cpu", torch.float64)
    if mu.dim() != 2 or mu.shape[0] < 1:
        raise ValueError(f"active_units_cov expects mu_all of shape [N, D] with N >= 1, got {list(mu.shape)}")
    return int((mu.var(dim=0, unbiased=False) > threshold).sum())


def collapse_verdict(
    kl_per_dim: Any,
    total_kl: Optional[float] = None,
    unit_threshold: float = ACTIVE_UNIT_THRESHOLD,
    min_total_kl: float = COLLAPSE_MIN_TOTAL_KL,
    max_inactive_fraction: float = COLLAPSE_MAX_INACTIVE_FRACTION,
) -> dict:
    """Is the posterior collapsed? A warning-level verdict, not an error.

    Collapsed when the total KL per sample is below ``min_total_kl`` nats (0.1: the code
    carries under 0.15 bits about x) or when more than ``max_inactive_fraction`` (90%) of the
    units have data-averaged KL ≤ ``unit_threshold`` (0.01 nats). ``total_kl`` defaults to the
    sum of ``kl_per_dim``. Returns collapsed, inactive_fraction, active_units, num_units,
    total_kl and a one-line message saying what was seen and what to try.
    """
    kl = _as_float64_vector(kl_per_dim)
    num_units = int(kl.numel())
    if num_units == 0:
        raise ValueError("collapse_verdict needs a non-empty kl_per_dim")
    total = float(kl.sum()) if total_kl is None else float(total_kl)
    active = active_units_kl(kl, unit_threshold)
    inactive_fraction = 1.0 - active / num_units
    low_kl = total < min_total_kl
    mostly_inactive = inactive_fraction > max_inactive_fraction
    collapsed = low_kl or mostly_inactive
    if collapsed:
        reasons = []
        if low_kl:
            reasons.append(f"total KL {total:.4g} nats < {min_total_kl:g}")
        if mostly_inactive:
            reasons.append(f"{num_units - active}/{num_units} units inactive (KL <= {unit_threshold:g} nats), "
                           f"more than {max_inactive_fraction:.0%}")
        message = ("WARNING: posterior collapse: " + "; ".join(reasons)
                   + ". Try KL annealing (warm-up), free bits, a smaller beta or a weaker decoder.")
    else:
        message = (f"ok: {active}/{num_units} units active (KL > {unit_threshold:g} nats), "
                   f"total KL {total:.4g} nats")
    return {"collapsed": collapsed, "inactive_fraction": inactive_fraction, "active_units": active,
            "num_units": num_units, "total_kl": total, "message": message}


class ELBOAccumulator:
    """Running sums for the data-averaged ELBO, reconstruction, KL, per-dim KL and Cov_x(mu).

    ``update`` takes either a model output dict (``forward(x)``: per-sample-mean ``elbo``,
    ``recon``, ``kl``, batch-mean ``kl_per_dim`` and ``mu`` [B, D]) or a batch (a tensor,
    a ``{"image": ...}`` dict from the data stream, or an (x, ...) tuple), which is then run
    through ``model`` without gradient. The batch size is taken from ``mu`` (or x) so the
    per-batch means are re-weighted into exact data averages.

    ``state_dict()`` is a flat dict of float64 tensors: sums (``*_sum``, ``count``) and, for the
    posterior means, per-dim moments ``mu_count``, ``mu_mean``, ``mu_m2`` (sum of squared
    deviations). The moments are combined with Chan et al.'s parallel formula, not added: an
    E[mu²] − E[mu]² form loses every digit when the means sit far from 0 (mu ≈ 1e4 with a
    variance of 1e-2 leaves nothing of float64's 16 digits). To combine workers, gather their
    state dicts and ``merge`` them (:meth:`from_state` rebuilds an accumulator from one).
    Give ``latent_dim`` when a worker may see no batch so every rank has the same shapes.
    """

    def __init__(self, model: Any = None, latent_dim: Optional[int] = None):
        self.model = model
        self._sums: dict[str, torch.Tensor] = {k: torch.zeros((), dtype=torch.float64) for k in _SCALARS}
        if latent_dim is not None:
            self._sums["kl_per_dim_sum"] = torch.zeros(latent_dim, dtype=torch.float64)
            self._sums.update(_moments(torch.zeros(0, latent_dim, dtype=torch.float64)))

    # -- accumulation -------------------------------------------------------------------
    def _run_model(self, batch: Any) -> Mapping[str, torch.Tensor]:
        if self.model is None:
            raise ValueError("ELBOAccumulator.update got a batch but has no model: pass model= or a forward() output dict")
        if isinstance(batch, Mapping):
            x = batch["image"]
        elif isinstance(batch, (tuple, list)):
            x = batch[0]
        else:
            x = batch
        try:
            device = next(self.model.parameters()).device
            x = x.to(device)
        except (AttributeError, StopIteration):
            pass
        with torch.no_grad():
            return self.model(x)

    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float64)
        if key in self._sums and self._sums[key].shape == value.shape:
            self._sums[key] += value
        elif key == "kl_per_dim_sum" and key not in self._sums:
            self._sums[key] = value.clone()
        else:
            raise ValueError(f"ELBOAccumulator: {key} has shape {list(value.shape)}, "
                             f"expected {list(self._sums[key].shape)} (latent_dim changed between batches?)")

    def _merge_mu(self, other: Mapping[str, torch.Tensor]) -> None:
        if "mu_mean" not in other:
            return
        if "mu_mean" not in self._sums:
            self._sums.update({k: other[k].clone() for k in _MU_MOMENTS})
            return
        if self._sums["mu_mean"].shape != other["mu_mean"].shape:
            raise ValueError(f"ELBOAccumulator: mu has {other['mu_mean'].numel()} dims, expected "
                             f"{self._sums['mu_mean'].numel()} (latent_dim changed between batches?)")
        self._sums.update(_chan_merge(self._sums, other))

    def update(self, out_or_batch: Any) -> "ELBOAccumulator":
        is_output = isinstance(out_or_batch, Mapping) and "elbo" in out_or_batch and "kl_per_dim" in out_or_batch
        out = out_or_batch if is_output else self._run_model(out_or_batch)
        mu = out.get("mu")
        if isinstance(mu, torch.Tensor) and mu.dim() == 2:
            n = mu.shape[0]
        elif isinstance(out.get("x_hat"), torch.Tensor):
            n = out["x_hat"].shape[0]
        else:
            raise ValueError("ELBOAccumulator.update: the output dict needs 'mu' [B, D] or 'x_hat' to know the batch size")
        for key in ("elbo", "recon", "kl"):
            self._add(f"{key}_sum", torch.as_tensor(out[key]).reshape(()) * n)
        self._add("kl_per_dim_sum", torch.as_tensor(out["kl_per_dim"]).reshape(-1) * n)
        if isinstance(mu, torch.Tensor) and mu.dim() == 2:
            self._merge_mu(_moments(mu.detach().to("cpu", torch.float64)))
        self._sums["count"] += n
        return self

    # -- distributed plumbing -----------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat dict of float64 tensors: sums plus the mu moments; combine two with :meth:`merge`."""
        return {k: v.clone() for k, v in self._sums.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = [k for k in _SCALARS if k not in state]
        partial = [k for k in _MU_MOMENTS if k not in state] if any(k in state for k in _MU_MOMENTS) else []
        if missing or partial:
            raise KeyError(f"ELBOAccumulator state lacks {missing + partial}; got keys {sorted(state)}")
        self._sums = {k: torch.as_tensor(v).detach().to("cpu", torch.float64).clone() for k, v in state.items()}

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> "ELBOAccumulator":
        acc = cls()
        acc.load_state_dict(state)
        return acc

    def merge(self, other: "ELBOAccumulator | Mapping[str, torch.Tensor]") -> "ELBOAccumulator":
        """Combine another accumulator (or its state dict) into this one, in place; returns self.

        Sums add; the mu moments combine by Chan's formula, so the merged variance equals the
        one-pass variance of the union whatever the split.
        """
        state = other.state_dict() if isinstance(other, ELBOAccumulator) else other
        for key, value in state.items():
            if key not in _MU_MOMENTS:
                self._add(key, torch.as_tensor(value))
        self._merge_mu({k: torch.as_tensor(state[k]).to(torch.float64) for k in _MU_MOMENTS if k in state})
        return self

    # -- results ------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return int(self._sums["count"])

    def compute(self, threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict:
        """Data averages: elbo, recon, kl (nats per sample), kl_per_dim [D], mu_variance [D]
        (population Cov_x(E_q[z]) diagonal, when ``mu`` was seen), active units by both
        definitions and the :func:`collapse_verdict`."""
        n = self.count
        if n == 0:
            raise ValueError("ELBOAccumulator.compute: no samples were accumulated")
        s = self._sums
        result: dict[str, Any] = {
            "num_samples": n,
            "elbo": float(s["elbo_sum"] / n),
            "recon": float(s["recon_sum"] / n),
            "kl": float(s["kl_sum"] / n),
            "kl_per_dim": s["kl_per_dim_sum"] / n,
        }
        result["active_units_kl"] = active_units_kl(result["kl_per_dim"], threshold)
        if "mu_mean" in s and s["mu_count"] > 0:
            result["mu_variance"] = s["mu_m2"] / s["mu_count"]
            result["active_units_cov"] = int((result["mu_variance"] > threshold).sum())
        if result["kl_per_dim"].numel():  # families without a continuous latent (VQ-VAE) have no units
            result["collapse"] = collapse_verdict(result["kl_per_dim"], result["kl"], unit_threshold=threshold)
        return result


def _moments(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """count, per-dim mean and sum of squared deviations (M2) of float64 rows [N, D]."""
    n = rows.shape[0]
    mean = rows.mean(0) if n else rows.new_zeros(rows.shape[1])
    return {"mu_count": torch.tensor(float(n), dtype=torch.float64), "mu_mean": mean,
            "mu_m2": (rows - mean).pow(2).sum(0)}


def _chan_merge(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moments of the union of two sets (Chan, Golub & LeVeque 1979); exact, no cancellation."""
    na, nb = a["mu_count"], b["mu_count"]
    if nb == 0:
        return {k: a[k].clone() for k in _MU_MOMENTS}
    if na == 0:
        return {k: b[k].clone() for k in _MU_MOMENTS}
    n = na + nb
    delta = b["mu_mean"] - a["mu_mean"]
    return {"mu_count": n, "mu_mean": a["mu_mean"] + delta * (nb / n),
            "mu_m2": a["mu_m2"] + b["mu_m2"] + delta.pow(2) * (na * nb / n)}


def evaluate_elbo(model: Any, batches: Any, max_batches: Optional[int] = None,
                  threshold: float = ACTIVE_UNIT_THRESHOLD) -> dict:
    """Mean ELBO, recon, KL, per-dim KL, active units and collapse verdict over ``batches``.

    Runs ``model`` in eval mode without gradient (restoring its mode afterwards); each item of
    ``batches`` is anything :meth:`ELBOAccumulator.update` accepts as a batch. ``forward``
    is called with the model's defaults; the reported ELBO is -(recon + KL), independent of β.
    """
    was_training = getattr(model, "training", False)
    model.eval()
    acc = ELBOAccumulator(model=model)
    try:
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            acc.update(batch)
    finally:
        model.train(was_training)
    return acc.compute(threshold)

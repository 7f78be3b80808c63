"""KL weight schedules: the factor the model's KL term is multiplied by at a point of training."""

from __future__ import annotations

from pipeline.config import ScheduleConfig


def kl_weight(t: float, schedule: ScheduleConfig, beta: float, total: float) -> float:
    """KL weight at position ``t`` of a run of length ``total`` (both in ``schedule.unit``).

    - none: ``beta`` throughout.
    - linear: ``beta * min(1, t / warmup)``. Starting near zero lets the decoder learn to
      use z before the KL term pulls the posterior onto the prior (early posterior collapse).
    - cyclical (Fu et al. 2019): the run is cut into ``cycles`` periods; in each, the weight
      rises linearly from 0 to ``beta`` over the first ``cycle_ratio`` of the period and
      stays there. Re-opening the KL "gate" lets latents collapsed early be picked up again.
    """
    if schedule.kl_anneal == "linear":
        return beta * min(1.0, t / schedule.warmup)
    if schedule.kl_anneal == "cyclical":
        period = total / schedule.cycles
        tau = (t % period) / period
        return beta * min(1.0, tau / schedule.cycle_ratio)
    return beta

"""KL weight schedules: the factor the model's KL term is multiplied by at a given step."""

from __future__ import annotations

from pipeline.config import ScheduleConfig


def kl_weight(step: int, schedule: ScheduleConfig, beta: float) -> float:
    """Linear warm-up ``beta * min(1, step / warmup)``; the target beta once warm-up is over.

    Starting the KL weight near zero lets the decoder learn to use z before the KL term
    pulls the posterior onto the prior (the usual cure for early posterior collapse).
    """
    if schedule.kl_warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / schedule.kl_warmup_steps)

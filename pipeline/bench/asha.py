"""``vaepipe bench asha``: one sweep's trials run twice on the same Ray instance, with ASHA and
then with every trial run to the end (FIFO, no early stopping); the wall times compared."""

from __future__ import annotations

import time
from dataclasses import replace

from pipeline.config import VaepipeConfig


def asha_speedup(cfg: VaepipeConfig, space: dict, seed: int = 0) -> dict:
    """Wall time of a sweep under ASHA against the same trials all run to ``train.max_steps``.

    The trials are drawn once (:func:`pipeline.tune.draw_trials`), so both sweeps train the
    same configurations with the same concurrency. ASHA runs first: whatever the first sweep
    pays for cold caches counts against ASHA, not for it.
    """
    from pipeline.tune import draw_trials, run_sweep

    trials = draw_trials(space, cfg.tune.num_samples, seed)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = {"trials": len(trials), "max_steps": cfg.train.max_steps, "workers_per_trial": cfg.dist.num_workers}
    for scheduler in ("asha", "fifo"):
        run_cfg = replace(cfg, tune=replace(cfg.tune, scheduler=scheduler, search="random", register_best=False,
                                            name=f"bench-{scheduler}-{stamp}"))
        t0 = time.perf_counter()
        summary = run_sweep(run_cfg, space, points=trials)
        wall = time.perf_counter() - t0
        rows = summary["trials"]
        out[scheduler] = {
            "wall_s": wall,
            "trial_steps": sum(int(r["last_step"]) for r in rows),
            "stopped": sorted(int(r["last_step"]) for r in rows if r["status"] == "stopped"),
            "failed": summary["failed"],
            "best": summary["best"][cfg.tune.metric],
            "parent_run_id": summary["parent_run_id"],
        }
    out["speedup"] = out["fifo"]["wall_s"] / out["asha"]["wall_s"]
    out["trial_steps_ratio"] = out["fifo"]["trial_steps"] / max(out["asha"]["trial_steps"], 1)
    return out

"""``vaepipe bench ...``: each benchmark against a baseline measured in the same invocation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli_common import console, fail as _fail, load as _load

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, each against a baseline measured in the same run.")


@bench_app.command("throughput", context_settings={"allow_extra_args": True})
def bench_throughput(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(Path("jobs/quickstart.yaml"), help="Job YAML; extra args are overrides."),
    steps: int = typer.Option(60, help="Timed steps for each side."),
    out: Optional[Path] = typer.Option(None, help="Also write the figures as JSON here."),
):
    """images/s of the pipeline (Ray workers + DeepSpeed) beside a plain single-process PyTorch loop."""
    import json

    from pipeline.bench.throughput import throughput

    cfg = _load(config, ctx.args)
    res = throughput(cfg, steps)
    table = Table(title=f"throughput at {res['resolution']}px, batch {res['batch_size_per_worker']} per worker, {steps} steps")
    table.add_column("setup")
    table.add_column("images/s", justify="right")
    table.add_row(f"plain PyTorch, 1 process ({res['torch_threads_baseline']} threads)", f"{res['plain_pytorch_images_per_sec']:.1f}")
    table.add_row(f"vaepipe: {res['pipeline_workers']} Ray workers, ZeRO-{res['zero_stage']}", f"{res['pipeline_images_per_sec']:.1f}")
    table.add_row("ratio", f"{res['ratio']:.2f}x")
    console.print(table)
    if out:
        out.write_text(json.dumps(res, indent=2))


@bench_app.command("asha", context_settings={"allow_extra_args": True})
def bench_asha(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/sweeps/asha_bench.yaml"), help="Sweep YAML; extra args are overrides."),
    seed: int = typer.Option(0, help="Seed of the trial draw shared by both sweeps."),
    out: Optional[Path] = typer.Option(None, help="Also write the figures as JSON here."),
):
    """Wall time of a sweep under ASHA beside the same trials all run to the end (FIFO)."""
    import json

    from pipeline.bench.asha import asha_speedup
    from pipeline.config import ConfigError
    from pipeline.tune import load_sweep

    try:
        cfg, space = load_sweep(config, ctx.args)
    except ConfigError as exc:
        _fail(str(exc))
    res = asha_speedup(cfg, space, seed)
    table = Table(title=f"{res['trials']} trials x {res['workers_per_trial']} workers, up to {res['max_steps']} steps")
    for col in ("scheduler", "wall s", "trial-steps", "stopped early at", "failed", f"best {cfg.tune.metric}"):
        table.add_column(col)
    for name, label in (("asha", "ASHA"), ("fifo", "every trial to the end")):
        r = res[name]
        table.add_row(label, f"{r['wall_s']:.0f}", str(r["trial_steps"]), ", ".join(map(str, r["stopped"])) or "-",
                      str(r["failed"]), f"{r['best']:.4g}")
    console.print(table)
    console.print(f"ASHA speed-up (wall): {res['speedup']:.2f}x; trial-steps saved: {res['trial_steps_ratio']:.2f}x")
    if out:
        out.write_text(json.dumps(res, indent=2))

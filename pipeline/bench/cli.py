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


@bench_app.command("memory", context_settings={"allow_extra_args": True})
def bench_memory(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/quickstart.yaml"), help="Job YAML; extra args are overrides."),
    steps: int = typer.Option(3, help="Timed steps per configuration (median reported)."),
    warmup: int = typer.Option(1, help="Untimed steps before them."),
    workers: int = typer.Option(2, help="Processes per configuration (fresh ones each time)."),
    stages: str = typer.Option("0,1,2,3", help="ZeRO stages, comma-separated."),
    offload: bool = typer.Option(True, help="Also ZeRO 1-2 with optimizer offload and ZeRO-3 with optimizer+parameter offload."),
    out: Path = typer.Option(Path("bench-results"), help="Folder for memory.json and memory.png."),
    mlflow: bool = typer.Option(True, help="Log the figures and files as a run of the vaepipe-bench experiment."),
):
    """Peak memory per worker and step time for ZeRO 0-3, offload and activation checkpointing,
    with the parameter/gradient/optimizer bytes each rank holds beside DeepSpeed's estimate."""
    from pipeline.bench.memory import default_cases, memory_report
    from pipeline.bench.report import publish
    from pipeline.tracking import resolve_tracking_uri

    cfg = _load(config, ctx.args)
    try:
        chosen = sorted({int(s) for s in stages.split(",") if s.strip()})
    except ValueError:
        _fail(f"--stages {stages!r}: must be comma-separated ZeRO stages, e.g. 0,1,2,3")
    if not chosen or any(s not in (0, 1, 2, 3) for s in chosen):
        _fail(f"--stages {stages!r}: ZeRO stages are 0, 1, 2 and 3")
    if cfg.model.name == "vq_prior":
        _fail("bench memory measures a family on its own; vq_prior needs a trained parent (use vqvae)")
    report = memory_report(cfg, default_cases(chosen, offload), steps, warmup, workers, progress=console.print)
    publish(report, out, resolve_tracking_uri(cfg) if mlflow else None, console)

"""``vaepipe bench ...``: each benchmark against a baseline measured in the same invocation."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli_common import console, fail as _fail, load

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks, each against a baseline measured in the same run.")


OUT_HELP = "Folder for <name>.json and <name>.png."
MLFLOW_HELP = "Log the figures and files as a run of the vaepipe-bench experiment."


def _publish(report, out: Path, cfg, mlflow: bool) -> None:
    from pipeline.bench.report import publish
    from pipeline.tracking import resolve_tracking_uri

    publish(report, out, resolve_tracking_uri(cfg) if mlflow else None, console)


def _load(config: Path, args: list):
    """The job a benchmark measures: it times Ray Train workers, so local mode is refused."""
    cfg = load(config, args)
    if cfg.dist.local:
        _fail("dist.num_workers=0 (local mode) starts no Ray Train workers to measure: give dist.num_workers >= 1")
    return cfg


def _zero_stages(stages: str) -> tuple[int, ...]:
    """``--stages 0,1,2,3`` as a tuple, or a refusal naming the value."""
    try:
        zero = tuple(int(z) for z in stages.split(","))
    except ValueError:
        zero = ()
    if not zero or any(z not in (0, 1, 2, 3) for z in zero):
        _fail(f"--stages {stages!r}: give ZeRO stages 0-3, comma-separated")
    return zero


@bench_app.command("overhead", context_settings={"allow_extra_args": True})
def bench_overhead(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/bench/overhead32.yaml"), help="Job YAML; extra args are overrides."),
    steps: int = typer.Option(120, help="Optimizer steps per run (each side)."),
    repeats: int = typer.Option(3, help="Alternating repetitions of baseline and pipeline."),
    system_metrics: str = typer.Option("off", help="MLflow system metrics in the pipeline runs: off, on or both."),
    compiled_baseline: bool = typer.Option(False, help="Also time the bare loop with its model under torch.compile."),
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """A real `vaepipe train` run beside a bare single-process loop on in-memory data: ratio and
    where each step's time goes (data wait, forward, backward, optimizer, communication, observe)."""
    from pipeline.bench.overhead import overhead

    if system_metrics not in ("off", "on", "both"):
        _fail(f"--system-metrics {system_metrics!r}: must be off, on or both")
    cfg = _load(config, ctx.args)
    _publish(overhead(cfg, steps, repeats, system_metrics, compiled_baseline=compiled_baseline), out, cfg, mlflow)


@bench_app.command("data", context_settings={"allow_extra_args": True})
def bench_data(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/bench/overhead32.yaml"), help="Job YAML; extra args are overrides."),
    repeats: int = typer.Option(3, help="Alternating repetitions of every reader."),
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """The streaming reader's images/s (1 process and one per worker) beside a plain tarfile+PIL
    loop, WebDataset's own pipeline, and what the training step consumes."""
    from pipeline.bench.data import data_bench

    cfg = _load(config, ctx.args)
    _publish(data_bench(cfg, repeats), out, cfg, mlflow)


@bench_app.command("checkpoint", context_settings={"allow_extra_args": True})
def bench_checkpoint(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/bench/overhead32.yaml"), help="Job YAML; extra args are overrides."),
    storage: list[str] = typer.Option(["runs/bench-checkpoint"], help="Run folder root to checkpoint into, local or "
                                      "s3://bucket/prefix (S3 endpoint and credentials from the AWS_* env); repeatable."),
    steps: int = typer.Option(60, help="Optimizer steps per run."),
    every: int = typer.Option(10, help="Steps between checkpoints in the runs that checkpoint."),
    repeats: int = typer.Option(2, help="Alternating repetitions of the three ways."),
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """Step time with no checkpoint, and with one every N steps uploaded sync or async
    (train.checkpoint_upload), on each storage given: what a checkpoint costs the training."""
    from pipeline.bench.checkpoint import checkpoint_bench

    cfg = _load(config, ctx.args)
    try:
        report = checkpoint_bench(cfg, storage, steps, every, repeats)
    except ValueError as exc:
        _fail(str(exc))
    _publish(report, out, cfg, mlflow)


@bench_app.command("validation", context_settings={"allow_extra_args": True})
def bench_validation(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/bench/overhead32.yaml"), help="Job YAML; extra args are overrides."),
    steps: int = typer.Option(60, help="Optimizer steps per run."),
    every: int = typer.Option(10, help="Steps between checkpoints, each one validated."),
    val_batches: int = typer.Option(4, help="Validation batches per rank at each checkpoint (off the loop: as many samples)."),
    repeats: int = typer.Option(2, help="Alternating repetitions of the three ways."),
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """Training images/s with no validation, with each checkpoint validated in the loop, and with it
    validated off the loop by a Ray Train validation task (train.validation)."""
    from pipeline.bench.validation import validation_bench

    cfg = _load(config, ctx.args)
    try:
        report = validation_bench(cfg, steps, every, val_batches, repeats)
    except ValueError as exc:
        _fail(str(exc))
    _publish(report, out, cfg, mlflow)


@bench_app.command("quality", context_settings={"allow_extra_args": True})
def bench_quality(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/digits.yaml"), help="Job YAML (the reference model); extra args are overrides."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds; each trains both ways."),
    steps: int = typer.Option(200, help="Optimizer steps of every run."),
    max_samples: int = typer.Option(0, help="Held-out samples scored (0: the whole split)."),
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """Test -ELBO of the reference model trained through vaepipe train and in the bare loop, on the
    same data, steps and seeds; exits 1 when the pipeline trains worse beyond the seeds' spread."""
    import shutil
    import tempfile

    from pipeline.bench.quality import quality_bench

    cfg = _load(config, ctx.args)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        _fail(f"--seeds {seeds!r}: give integers, comma-separated")
    work = Path(tempfile.mkdtemp(prefix="vaepipe-quality-"))  # the runs' checkpoints
    try:
        report = quality_bench(cfg, seed_list, steps, max_samples or None, work)
    except ValueError as exc:
        _fail(str(exc))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _publish(report, out, cfg, mlflow)
    if report.summary["worse"]:
        _fail(f"the pipeline trains worse than the bare loop: {report.summary['gap_nats']:.2f} nats, beyond the "
              f"seeds' spread ({report.summary['tolerance_nats']:.2f})")


@bench_app.command("scaling", context_settings={"allow_extra_args": True})
def bench_scaling(
    ctx: typer.Context,
    config: Path = typer.Option(Path("jobs/bench/overhead32.yaml"), help="Job YAML; extra args are overrides."),
    steps: int = typer.Option(60, help="Optimizer steps per run."),
    stages: str = typer.Option("0,1,2,3", help="ZeRO stages to measure, comma-separated."),
    gpu: str = typer.Option("H100", help="GPU of the prediction (dense bf16 peak from its data sheet)."),
    mfu: float = typer.Option(0.4, help="Assumed fraction of the GPU's peak the model reaches."),
    predict_resolution: int = typer.Option(256, help="Resolution of the model the GPU prediction is for."),
    predict_batch: int = typer.Option(32, help="Micro-batch per GPU in the prediction; the accumulation that reaches 90% at 64 GPUs is computed per ZeRO stage."),
    inter_gbps: float = typer.Option(400.0, help="Link between nodes, Gb/s per GPU."),
    intra_gbps: float = typer.Option(2400.0, help="Link within a node (NVLink), Gb/s per GPU."),
    latency_us: float = typer.Option(10.0, help="Latency per hop of a collective, microseconds."),
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """Weak scaling over 1..N workers for each ZeRO stage and the fastest workers x threads layout of
    this machine, then predicted efficiency at 8, 64 and 256 GPUs for stated links."""
    from pipeline.bench.flops import DENSE_BF16_PEAK
    from pipeline.bench.scaling import Links, scaling

    if gpu not in DENSE_BF16_PEAK:
        _fail(f"--gpu {gpu!r}: known GPUs are {', '.join(DENSE_BF16_PEAK)}")
    zero = _zero_stages(stages)
    cfg = _load(config, ctx.args)
    # the GPU prediction is for the high-resolution model: the same family at predict_resolution, 128-d latent
    big = _load(config, [*ctx.args, f"data.resolution={predict_resolution}", "model.latent_dim=128"])
    links = Links(intra_gbps=intra_gbps, inter_gbps=inter_gbps, latency_us=latency_us)
    for report in scaling(cfg, steps, zero, links, gpu, mfu, big, predict_batch):
        _publish(report, out, cfg, mlflow)


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
    out: Path = typer.Option(Path("bench-results"), help=OUT_HELP),
    mlflow: bool = typer.Option(True, help=MLFLOW_HELP),
):
    """Peak memory per worker and step time for ZeRO 0-3, offload and activation checkpointing,
    with the parameter/gradient/optimizer bytes each rank holds beside DeepSpeed's estimate."""
    from pipeline.bench.memory import default_cases, memory_report

    cfg = _load(config, ctx.args)
    chosen = sorted(set(_zero_stages(stages)))
    if cfg.model.name == "vq_prior":
        _fail("bench memory measures a family on its own; vq_prior needs a trained parent (use vqvae)")
    report = memory_report(cfg, default_cases(chosen, offload), steps, warmup, workers, progress=console.print)
    _publish(report, out, cfg, mlflow)

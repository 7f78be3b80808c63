"""The ``vaepipe`` command line (Typer + rich).

Heavy imports (torch, ray, mlflow) happen inside commands so ``vaepipe --help`` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.bench.cli import bench_app
from pipeline.cli_common import console, fail as _fail, load as _load

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Distributed VAE training: shards -> Ray Train + DeepSpeed -> MLflow.")
data_app = typer.Typer(no_args_is_help=True, help="Make, shard and inspect data sets.")
config_app = typer.Typer(no_args_is_help=True, help="Show the resolved config.")
jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: list, status, logs, stop.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(jobs_app, name="jobs")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Folder to write the CelebA-format data set into."),
    n: int = typer.Option(5000, help="Number of images."),
    seed: int = typer.Option(0, help="Random seed (the set is deterministic for a seed)."),
    workers: Optional[int] = typer.Option(None, help="Processes (default: all cores)."),
):
    """Generate synthetic faces with ground-truth factors, in CelebA's exact layout."""
    from pipeline.data.synth import generate_synthetic_celeba

    path = generate_synthetic_celeba(out, n=n, seed=seed, workers=workers)
    console.print(f"[green]wrote[/] {n} images to {path}")


@data_app.command("digits")
def data_digits(
    out: Path = typer.Option(..., help="Folder to write the digit images into."),
    resolution: int = typer.Option(32, help="Square output size (the source is 8x8; 32 fits the reference conv VAE)."),
    resample: str = typer.Option("bilinear", help="Upsampling: bilinear (smooth strokes) or nearest (the 17 source levels as blocks)."),
):
    """Write scikit-learn's 1797 real 8x8 UCI handwritten digits as a folder of grayscale PNGs."""
    from pipeline.data.digits import write_digits

    try:
        counts = write_digits(out, resolution, resample)
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"[green]wrote[/] {sum(counts.values())} digits ({resolution}x{resolution}, {resample}) to {out}")
    console.print("split (list_eval_partition.txt, ratios 0.8/0.1/0.1 by image-id hash): "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()) + "; digit class in factors.csv")
    console.print(f"next: vaepipe data shard --source {out} --out data/shards/digits{resolution} "
                  f"--resolution {resolution} --format png")


@data_app.command("shard")
def data_shard(
    source: str = typer.Option(..., help="CelebA folder (img_align_celeba/ or .zip + list files) or a folder of square images."),
    out: str = typer.Option(..., help="Output: local folder, file:// or s3://bucket/prefix."),
    resolution: int = typer.Option(64, help="Stored square resolution."),
    shard_size: int = typer.Option(1000, help="Samples per tar shard."),
    image_format: str = typer.Option("jpg", "--format", help="jpg, png or webp."),
    workers: Optional[int] = typer.Option(None, help="Processes (default: all cores)."),
    split: Optional[str] = typer.Option(None, help="all=train, all=valid or all=test: the whole source is one split."),
    split_ratios: Optional[str] = typer.Option(None, help="train,valid,test fractions, e.g. 0.8,0.1,0.1 (by image-id hash)."),
    partition: Optional[str] = typer.Option(None, help="File of '<image id> 0|1|2' lines (CelebA's list_eval_partition.txt format)."),
):
    """Write WebDataset shards per split plus manifest.json (re-runs skip matching shards).

    Split rule: the one flag given; else the source's list_eval_partition.txt (always there
    for CelebA); else, for a plain image folder, ratios 0.8/0.1/0.1 by image-id hash.
    """
    from pipeline.data.shards import write_shards
    from pipeline.data.splits import rule_from_flags

    try:
        rule = rule_from_flags(split, split_ratios, partition)
        manifest = write_shards(source, out, resolution=resolution, shard_size=shard_size, image_format=image_format,
                                workers=workers, split_rule=rule)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _print_manifest(out, manifest)


def _print_manifest(url: str, manifest: dict, checks: Optional[list] = None) -> None:
    from pipeline.data.splits import describe_rule

    table = Table(title=f"{url}  ({manifest['resolution']}px {manifest.get('image_format', 'jpg')}, source: {manifest.get('source', '?')})")
    for col in ("split", "shards", "samples"):
        table.add_column(col)
    for split, info in manifest["splits"].items():
        table.add_row(split, str(len(info["shards"])), str(info["num_samples"]))
    console.print(table)
    console.print(f"split rule: {describe_rule(manifest.get('split_rule'))}")
    if manifest.get("skipped_corrupt"):
        console.print(f"[yellow]skipped corrupt source images:[/] {manifest['skipped_corrupt']}")
    if checks is not None:
        bad = [c for c in checks if not c[1]]
        console.print(f"sha256: {len(checks) - len(bad)}/{len(checks)} shards verified")
        for name, _, expected, actual in bad:
            console.print(f"[red]MISMATCH[/] {name}: manifest {expected} != file {actual}")


@data_app.command("inspect")
def data_inspect(url: str = typer.Argument(..., help="Shard set folder or URL."),
                 verify: bool = typer.Option(True, help="Recompute the sha256 of every shard.")):
    """Summarise a shard set's manifest and verify every shard's checksum."""
    from pipeline.data.shards import read_manifest, verify_shards

    try:
        manifest = read_manifest(url)
    except FileNotFoundError as exc:
        _fail(str(exc))
    checks = verify_shards(url) if verify else None
    _print_manifest(url, manifest, checks)
    if checks and not all(c[1] for c in checks):
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
def train(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="Job YAML (e.g. jobs/quickstart.yaml)."),
    resume: Optional[str] = typer.Option(None, help="Checkpoint folder, Ray run folder (local or s3://) or MLflow run id to continue."),
    verbose: bool = typer.Option(False, "--verbose", help="Also print Ray Train's report dumps and MLflow's progress bars (tracking.verbose=true)."),
):
    """Train on Ray Train + DeepSpeed; extra args are dotted overrides (model.latent_dim=64)."""
    cfg = _load(config, [*ctx.args, *(["tracking.verbose=true"] if verbose else [])])
    from pipeline.config import ConfigError
    from pipeline.train.failures import NotRetried
    from pipeline.train.trainer import run_training

    try:
        result = run_training(cfg, resume=resume)
    except (ConfigError, FileNotFoundError, NotRetried) as exc:
        _fail(str(exc))
    from pipeline.redact import redact_text

    uri = redact_text(result.tracking_uri)
    table = Table(title="vaepipe train: done", show_header=False)
    table.add_row("MLflow run", result.run_id)
    table.add_row("tracking URI", uri)
    table.add_row("model", result.model_uri or "-")
    table.add_row("checkpoint", result.checkpoint_path or "-")
    for k in ("loss", "recon", "kl", "val_neg_elbo", "images_per_sec", "skipped_steps", "corrupt_samples"):
        if k in result.metrics:
            table.add_row(k, f"{result.metrics[k]:.4g}")
    table.add_row("wall time", f"{result.wall_s:.0f} s")
    console.print(table)
    console.print(f"images, system metrics and the data set input: {_where_to_look(uri, result.run_id)}")


def _where_to_look(uri: str, run_id: str) -> str:
    """A tracking server serves its own UI: the run's page there. A database or folder store
    has none: the `mlflow ui` command that opens one on it."""
    if uri.startswith(("http://", "https://")):
        from pipeline.tracking import make_client

        experiment_id = make_client(uri).get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in `mlflow ui --backend-store-uri {uri}`"


@app.command()
def register(
    run_id: str = typer.Option(..., help="MLflow run whose model to register."),
    name: str = typer.Option(..., help="Registered model name."),
    alias: Optional[str] = typer.Option(None, help="Alias to point at the new version (e.g. champion)."),
    best: Optional[str] = typer.Option(None, help="Register the run's checkpoint model with the best value of this "
                                       "validation metric (e.g. val_neg_elbo); default: the newest checkpoint's."),
    mode: str = typer.Option("min", help="--best: whether the metric is minimised (min) or maximised (max)."),
    tracking_uri: Optional[str] = typer.Option(None, help="Default: MLFLOW_TRACKING_URI or sqlite:///mlruns.db."),
):
    """Register a run's model (its newest checkpoint's, or the best validated one) in the MLflow
    Model Registry and set an alias."""
    from pipeline.config import VaepipeConfig
    from pipeline.tracking import register_model, resolve_tracking_uri

    if mode not in ("min", "max"):
        _fail(f"--mode {mode!r} is not min or max")
    cfg = VaepipeConfig()
    cfg.tracking.tracking_uri = tracking_uri
    uri = resolve_tracking_uri(cfg)
    try:
        version = register_model(uri, run_id, name, alias, best=best, mode=mode)
    except ValueError as exc:
        _fail(str(exc))
    target = f"models:/{name}@{alias}" if alias else f"models:/{name}/{version}"
    console.print(f"[green]registered[/] {name} version {version} -> {target}")


@app.command()
def sample(
    model: str = typer.Option(..., help="Model URI, e.g. models:/vae-celeba@champion or runs:/<id>/model."),
    n: int = typer.Option(64, help="Number of samples."),
    out: Path = typer.Option(Path("samples.png"), help="PNG grid to write."),
    seed: int = typer.Option(0, help="Sampling seed."),
    temperature: float = typer.Option(1.0, help="Prior temperature (vdvae: scales every group's prior std)."),
    tracking_uri: Optional[str] = typer.Option(None, help="Default: MLFLOW_TRACKING_URI or sqlite:///mlruns.db."),
):
    """Draw samples from a logged or registered model and save them as a PNG grid."""
    import math

    import numpy as np
    from PIL import Image

    from pipeline.config import VaepipeConfig
    from pipeline.evaluate.visualize import make_grid
    from pipeline.tracking import make_client, resolve_tracking_uri

    cfg = VaepipeConfig()
    cfg.tracking.tracking_uri = tracking_uri
    make_client(resolve_tracking_uri(cfg))
    import mlflow.pyfunc

    import warnings

    from pipeline.serving import check_model_uri

    try:
        check_model_uri(model)
    except ValueError as exc:
        _fail(str(exc))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*type hint.*")
        pyfunc = mlflow.pyfunc.load_model(model)
    params = {"method": "sample", "n": n, "seed": seed}
    if temperature != 1.0:  # models logged before the param existed accept the others
        params["temperature"] = temperature
    try:
        images = pyfunc.predict(np.zeros((1, 1, 1, 1), np.float32), params=params)
    except ValueError as exc:
        _fail(str(exc))
    Image.fromarray(make_grid(images, nrow=int(math.ceil(math.sqrt(n))))).save(out)
    console.print(f"[green]wrote[/] {n} samples {tuple(images.shape[1:])} to {out}")


@config_app.command("show", context_settings={"allow_extra_args": True})
def config_show(ctx: typer.Context, config: Optional[Path] = typer.Option(None, help="Job YAML.")):
    """Print the resolved config (defaults <- YAML <- overrides) as YAML."""
    from pipeline.config import to_yaml

    console.print(to_yaml(_load(config, ctx.args)), highlight=False, markup=False)


@app.command()
def evaluate(
    model: str = typer.Option(..., help="Model URI: models:/name@alias, models:/name/3 or runs:/<id>/model."),
    data: str = typer.Option(..., help="Shard set (folder, file:// or s3://)."),
    metrics: str = typer.Option("nll,elbo,au,mig,sap", help="Comma list of nll (= neg_iwae_nats), elbo, au, mig, sap, fid."),
    split: str = typer.Option("test", help="Split to score."),
    k: int = typer.Option(1000, help="Importance samples per image for nll / neg_iwae_nats."),
    max_samples: Optional[int] = typer.Option(None, help="Score at most this many images."),
    workers: int = typer.Option(1, help="Ray workers scoring shares of the split (1 = this process)."),
    fid_weights: Optional[str] = typer.Option(None, help="pt_inception-2015-12-05-6726825d.pth (else VAEPIPE_FID_WEIGHTS)."),
    tracking_uri: Optional[str] = typer.Option(None, help="Default: MLFLOW_TRACKING_URI or sqlite:///mlruns.db."),
    experiment: str = typer.Option("vaepipe-eval", help="MLflow experiment of the evaluation run."),
):
    """Score a model (IWAE bound, ELBO, active units, MIG, SAP, FID) into a new MLflow run.

    The IWAE bound is shown as nll only where the likelihood is a probability of the stored data.
    """
    from pipeline.config import VaepipeConfig
    from pipeline.evaluate.job import result_notes, run_evaluation, scalar_metrics
    from pipeline.evaluate.runner import EvalSpec
    from pipeline.tracking import resolve_tracking_uri

    cfg = VaepipeConfig()
    cfg.tracking.tracking_uri = tracking_uri
    try:
        spec = EvalSpec(metrics=[m.strip() for m in metrics.split(",") if m.strip()], split=split, k=k,
                        max_samples=max_samples, fid_weights=fid_weights)
    except ValueError as exc:
        _fail(str(exc))
    if "fid" in spec.metrics:
        from pipeline.evaluate.fid import fid_available

        ok, msg = fid_available(fid_weights)
        if not ok:
            console.print(f"[yellow]FID skipped:[/] {msg}")
    try:
        run_id, results = run_evaluation(model, data, spec, workers, resolve_tracking_uri(cfg), experiment)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    console.print(f"{model} on {data} [{split}]")
    console.print(f"split {split}: {_split_size(data, split)} samples")
    table = Table(title=f"evaluation ({results['num_samples']} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in scalar_metrics(results).items():
        table.add_row(name, f"{value:.4g}")
    console.print(table)
    for note in result_notes(results):
        console.print(note, markup=False, highlight=False)
    if "collapse" in results:
        console.print(results["collapse"]["message"])
    console.print(f"MLflow evaluation run: {run_id}")


def _split_size(data: str, split: str):
    from pipeline.data.shards import read_manifest

    return read_manifest(data)["splits"].get(split, {}).get("num_samples", 0)


@app.command(context_settings={"allow_extra_args": True})
def tune(
    ctx: typer.Context,
    config: Optional[Path] = typer.Option(None, help="Sweep YAML (jobs/sweeps/*.yaml); extra args are overrides."),
    resume: Optional[str] = typer.Option(None, help="Experiment folder of an interrupted sweep to continue."),
    promote: bool = typer.Option(False, "--promote", help="Register the best trial as 'challenger' under --name and "
                                 "move 'champion' to it only if it wins the gate of `vaepipe promote`."),
    name: Optional[str] = typer.Option(None, help="--promote: registered model name."),
    metrics: str = typer.Option("neg_iwae_nats,au", help="--promote: gate metrics, as for `vaepipe promote`."),
    margins: str = typer.Option("0", help="--promote: one margin, or one per metric."),
    split: str = typer.Option("test", help="--promote: split both models are scored on."),
    k: int = typer.Option(200, help="--promote: importance samples per image for nll / neg_iwae_nats."),
    max_samples: Optional[int] = typer.Option(None, help="--promote: score at most this many images."),
):
    """Hyperparameter search: each trial a Ray Train + DeepSpeed run, one MLflow child run per trial.

    With --promote, the sweep ends in a metric-gated promotion (exit 1 when the champion stays)."""
    from pipeline.config import ConfigError
    from pipeline.evaluate.runner import EvalSpec
    from pipeline.tune import load_sweep, run_sweep

    if not config and not resume:
        _fail("give --config <sweep.yaml> or --resume <experiment folder>")
    if promote and not name:
        _fail("--promote needs --name <registered model name>")
    try:
        spec = EvalSpec(metrics=_csv(metrics), split=split, k=k, max_samples=max_samples) if promote else None
        gate_margins = [float(m) for m in _csv(margins)]
        cfg, space = load_sweep(config, ctx.args) if config else (None, None)
        if promote and cfg is not None:
            from pipeline.promote import check_gate_before_sweep

            check_gate_before_sweep(cfg, spec.metrics)
        summary = run_sweep(cfg, space, resume=resume, register_as=name if promote else None)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    _print_sweep(summary)
    if promote:
        _promote_sweep(summary, spec, gate_margins)


def _csv(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def _print_sweep(summary: dict) -> None:
    metric = summary["best"]
    table = Table(title=f"sweep: {len(summary['trials'])} trials, {summary['stopped_early']} stopped early, {summary['failed']} failed")
    for col in ("trial", "status", "last step", "metric"):
        table.add_column(col)
    for row in summary["trials"]:
        value = [v for k, v in row.items() if k not in ("trial_id", "run_id", "status", "last_step")]
        table.add_row(row["trial_id"], row["status"], str(row["last_step"]), str(value[0] if value else "-"))
    console.print(table)
    console.print(f"best trial {metric['trial_id']} (MLflow run {metric['run_id']}); parent run {summary['parent_run_id']}")
    if summary["registered_version"]:
        console.print(f"registered as challenger: version {summary['registered_version']}")
    console.print(f"resume with: vaepipe tune --resume {summary['experiment_path']}")


def _promote_sweep(summary: dict, spec, margins: list[float]) -> None:
    from pipeline.promote import promote_sweep

    try:
        wins, rows, version, run_id = promote_sweep(summary, spec, margins, summary["tracking_uri"])
    except ValueError as exc:
        _fail(str(exc))
    console.print(f"promotion on {summary['data_path']} ({spec.split} split): decision run {run_id}, linked from "
                  f"parent run {summary['parent_run_id']}", markup=False, highlight=False)
    _print_decision(summary["registered_name"], wins, rows, version)


def _print_decision(name: str, wins: bool, rows: list, version: Optional[int]) -> None:
    """The champion-vs-challenger table and the verdict; exit 1 when the champion stays."""
    from pipeline.promote import NO_CHAMPION

    table = Table(title=f"{name}: champion vs challenger")
    for col in ("metric", "champion", "challenger", "improvement", "margin", "ok"):
        table.add_column(col)
    for r in rows:
        table.add_row(r.metric, f"{r.champion:.4g}", f"{r.challenger:.4g}", f"{r.improvement:+.4g}", f"{r.margin:g}", "yes" if r.ok else "NO")
    if rows:
        console.print(table)
    else:
        console.print(f"nothing to compare ({NO_CHAMPION}, or the challenger already is the champion); decision logged")
    if wins:
        console.print(f"[green]promoted:[/] models:/{name}@champion -> version {version}")
    else:
        console.print(f"[red]refused:[/] champion stays at version {version}")
        raise typer.Exit(1)


@app.command()
def promote(
    name: str = typer.Option(..., help="Registered model name with a 'challenger' alias."),
    data: str = typer.Option(..., help="Shard set both models are scored on."),
    metrics: str = typer.Option("neg_iwae_nats,au", help="Comma list; the first must improve, the rest must not get worse. "
                                "nll only for a likelihood that is a probability of the stored data."),
    margins: str = typer.Option("0", help="One margin, or one per metric (in the metric's units)."),
    split: str = typer.Option("valid", help="Split to score."),
    k: int = typer.Option(200, help="Importance samples per image for nll / neg_iwae_nats."),
    max_samples: Optional[int] = typer.Option(None, help="Score at most this many images."),
    workers: int = typer.Option(1, help="Ray workers for the scoring."),
    tracking_uri: Optional[str] = typer.Option(None, help="Default: MLFLOW_TRACKING_URI or sqlite:///mlruns.db."),
):
    """Move alias 'champion' to the 'challenger' version only if it beats the champion."""
    from pipeline.config import VaepipeConfig
    from pipeline.evaluate.runner import EvalSpec
    from pipeline.promote import promote as do_promote
    from pipeline.tracking import resolve_tracking_uri

    cfg = VaepipeConfig()
    cfg.tracking.tracking_uri = tracking_uri
    try:
        spec = EvalSpec(metrics=_csv(metrics), split=split, k=k, max_samples=max_samples)
        wins, rows, version = do_promote(name, data, spec, [float(m) for m in margins.split(",")], resolve_tracking_uri(cfg), workers)
    except ValueError as exc:
        _fail(str(exc))
    _print_decision(name, wins, rows, version)


ADDRESS_HELP = "Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS, else RAY_API_SERVER_ADDRESS)."


def _say(text: str) -> None:
    """One plain line, never wrapped (ids and URLs stay copyable)."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def _jobs_client(address: Optional[str]):
    from pipeline.jobs import JobsError, connect

    try:
        return connect(address)
    except JobsError as exc:
        _fail(str(exc))


@app.command(context_settings={"allow_extra_args": True})
def submit(
    ctx: typer.Context,
    config: Path = typer.Option(..., help="Job YAML (jobs/*.yaml) or sweep YAML (jobs/sweeps/*.yaml); extra args are overrides."),
    address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
    wait: bool = typer.Option(False, "--wait", help="Follow the job's logs until it ends; exit 0 only if it succeeded."),
    working_dir: Optional[Path] = typer.Option(None, help="Checkout to upload (default: this vaepipe checkout)."),
):
    """Run `vaepipe train` (job file) or `vaepipe tune` (sweep file) on a Ray cluster through Ray Jobs."""
    from pipeline.config import ConfigError
    from pipeline.job_spec import build_job_spec, project_root
    from pipeline.jobs import JobsError, dashboard_url
    from pipeline.jobs import submit as submit_job

    try:
        spec, root = build_job_spec(config, ctx.args), project_root(working_dir)
    except ConfigError as exc:
        _fail(str(exc))
    for note in spec.notes:
        _say(f"note: {note}")
    client = _jobs_client(address)
    try:
        job_id = submit_job(client, spec, config, root)
    except JobsError as exc:
        _fail(str(exc))
    from pipeline.redact import redact_text

    _say(f"submitted {job_id}: {spec.entrypoint}")
    _say(f"dashboard: {dashboard_url(client, job_id)}")
    _say(f"MLflow experiment: {spec.experiment} at {redact_text(spec.tracking_uri or 'the job working dir (sqlite)')}")
    if not wait:
        _say(f"follow with: vaepipe jobs logs {job_id} --follow --address {client.get_address()}")
        return
    _follow(client, job_id)


def _follow(client, job_id: str) -> None:
    from pipeline.jobs import JobsError, follow_logs

    try:
        status = follow_logs(client, job_id)
    except KeyboardInterrupt:
        _say(f"\nstopped following; the job keeps running (vaepipe jobs stop {job_id})")
        raise typer.Exit(130)
    except JobsError as exc:
        _fail(str(exc))
    _say(f"job {job_id}: {status}")
    raise typer.Exit(0 if status == "SUCCEEDED" else 1)


@jobs_app.command("list")
def jobs_list(address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)):
    """Every job of the cluster, oldest first: id, status, MLflow experiment, entrypoint."""
    from pipeline.jobs import job_rows

    for row in job_rows(_jobs_client(address)):
        _say(f"{row['id']}  {row['status']:<9}  {row['experiment']}  {row['entrypoint']}")


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(..., help="Submission id."),
                address: Optional[str] = typer.Option(None, help=ADDRESS_HELP)):
    """A job's status, message and entrypoint."""
    from pipeline.jobs import job_info

    try:
        info = job_info(_jobs_client(address), job_id)
    except RuntimeError as exc:
        _fail(f"job {job_id}: {exc}")
    _say(f"{job_id}: {info.status.value}")
    _say(f"entrypoint: {info.entrypoint}")
    if info.message:
        _say(f"message: {info.message}")


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Submission id."),
              address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
              follow: bool = typer.Option(False, "--follow", "-f", help="Stream until the job ends; exit 0 only if it succeeded.")):
    """A job's driver log."""
    from pipeline.jobs import job_logs

    client = _jobs_client(address)
    if follow:
        _follow(client, job_id)
    try:
        sys.stdout.write(job_logs(client, job_id))
    except RuntimeError as exc:
        _fail(f"job {job_id}: {exc}")


@jobs_app.command("stop")
def jobs_stop(job_id: str = typer.Argument(..., help="Submission id."),
              address: Optional[str] = typer.Option(None, help=ADDRESS_HELP),
              timeout: float = typer.Option(60.0, help="Seconds to wait for the job to end.")):
    """Stop a running job and wait until it has ended."""
    from pipeline.jobs import stop

    try:
        status = stop(_jobs_client(address), job_id, timeout)
    except RuntimeError as exc:
        _fail(f"job {job_id}: {exc}")
    _say(f"job {job_id}: {status}")


@app.command("models")
def list_models_cmd():
    """List the registered model families."""
    from models import list_models

    for name in list_models():
        console.print(name)


def main() -> None:  # console script entry point
    app(prog_name="vaepipe")


if __name__ == "__main__":
    sys.exit(main())

"""Hyperparameter searches: Ray Tune over full distributed training runs, tracked in MLflow.

Ray 2.60 is Train V2: each trial is a small driver function that builds its own
``TorchTrainer`` (through ``run_training``) with Tune's ``TuneReportCallback``, so a trial
can use several workers and DeepSpeed. The driver takes almost no CPU
(``with_resources({"CPU": 0.01})``); Train's workers are not counted by Tune, so
``max_concurrent_trials`` is capped here to what the cluster can hold.

A sweep file names a base job, a search space over dotted config keys, and ``tune.*``
settings; any other top-level section overrides the base job::

    base: ../quickstart.yaml
    space:
      model.latent_dim: {choice: [16, 32, 64]}
      optim.lr: {loguniform: [1.0e-4, 1.0e-3]}
    tune: {num_samples: 8, scheduler: asha, metric: val_neg_elbo, mode: min}
    train: {max_steps: 200}

MLflow: one parent run per sweep, one child run per trial (the trial's own training run).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from pipeline.config import ConfigError, VaepipeConfig, apply_overrides, from_dict, known_keys, load_config, to_dict
from pipeline.credentials import AWS_CREDENTIAL_ENV, SWEEP_CREDENTIAL_ENV, WorkerEnv, kept_out_of_environ
from pipeline.redact import redact_config_dict, redact_text

DOMAINS = ("choice", "grid", "uniform", "loguniform", "randint", "quniform")
SWEEP_STATE = "vaepipe_sweep.json"
DRIVER_CPU = 0.01  # a trial's driver only waits on its TorchTrainer


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> tuple[VaepipeConfig, dict]:
    """(base config <- sweep sections <- CLI overrides, validated search space)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file '{path}' does not exist")
    doc = yaml.safe_load(path.read_text()) or {}
    space = doc.pop("space", None)
    if not space:
        raise ConfigError(f"sweep file '{path}' has no 'space:' section of dotted keys to search")
    base = doc.pop("base", None)
    cfg = load_config((path.parent / base) if base else None)
    flat = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in _flatten(doc).items()]
    cfg = apply_overrides(cfg, flat, f"sweep file '{path}'")
    cfg = apply_overrides(cfg, list(overrides), "command-line override")
    validate_space(space, cfg)
    check_comparable(space, cfg)
    return cfg, space


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def validate_space(space: dict, cfg: VaepipeConfig) -> None:
    """Every key must be a config key and every listed value must make a valid config."""
    keys = set(known_keys())
    for key, spec in space.items():
        if key not in keys and not any(k.startswith(key + ".") for k in keys):
            raise ConfigError(f"search space key '{key}' is not a config key (see `vaepipe config show`)")
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DOMAINS:
            raise ConfigError(f"search space '{key}': {spec!r} must be one of {{{'|'.join(DOMAINS)}: [...]}}")
        kind, values = next(iter(spec.items()))
        probes = values if kind in ("choice", "grid") else values[:2]
        for v in probes:
            apply_overrides(cfg, {key: v}, f"search space '{key}'")


def _objective(cfg: VaepipeConfig) -> str:
    from models import objective_name

    return objective_name(cfg.model)


def check_comparable(space: dict, cfg: VaepipeConfig) -> None:
    """Refuse a sweep whose trials would report different quantities under ``tune.metric``.

    ``val_<objective>`` is what a trial reports (``val_neg_elbo`` only where -ELBO is a bound);
    ranking needs every trial to report the same quantity on the same data scale, so the
    metric must be the family's and no searched key may change the objective or the likelihood.
    """
    metric, base = cfg.tune.metric, _objective(cfg)
    if metric.startswith("val_") and cfg.train.off_loop and cfg.dist.num_workers > 0:
        raise ConfigError(f"tune.metric={metric!r} with train.validation=off_loop: a Ray Train trial's validation "
                          "tasks finish after its reports, so Tune's scheduler never sees it; set "
                          "train.validation=in_loop, or rank by a training metric (tune.metric=loss)")
    if metric.startswith("val_") and metric not in ("val_loss", f"val_{base}"):
        raise ConfigError(f"tune.metric={metric!r} is never reported by model.name={cfg.model.name!r}: its "
                          f"validation quantity is val_{base} ({_OBJECTIVES.get(base, base)}); set tune.metric=val_{base}")
    if cfg.progressive.enabled:
        check_equal_resolution(space, cfg)
    if "model.likelihood" in space and metric != "val_loss":
        raise ConfigError(f"search space key 'model.likelihood' makes trials incomparable under tune.metric={metric!r}: "
                          "log-likelihoods of different observation models are not on one scale; fix the likelihood "
                          "and sweep the rest")
    for key, spec in space.items():
        kind, values = next(iter(spec.items()))
        if kind not in ("choice", "grid") or not key.startswith("model."):
            continue
        for v in values:
            other = _objective(apply_overrides(cfg, {key: v}, f"search space '{key}'"))
            if other != base:
                raise ConfigError(f"search space '{key}' value {v!r} makes a trial report val_{other} "
                                  f"({_OBJECTIVES.get(other, other)}) while the others report val_{base}: "
                                  "they cannot be ranked together; sweep them separately")


# keys that move a progressive run's stage boundaries, hence the resolution a trial is at
_STAGE_KEYS = ("progressive.stage_images", "progressive.final_stage_images", "progressive.start_resolution")


def _stage_variants(space: dict, cfg: VaepipeConfig) -> list[VaepipeConfig]:
    """One config per combination of the searched values of the stage-boundary keys (``cfg`` if none)."""
    import itertools

    searched = {}
    for key in _STAGE_KEYS:
        if key not in space:
            continue
        kind, values = next(iter(space[key].items()))
        if kind not in ("choice", "grid"):
            raise ConfigError(f"search space '{key}': {kind} cannot be checked for equal resolution at ASHA's rungs; "
                              "search it with choice or grid")
        searched[key] = values
    return [apply_overrides(cfg, dict(zip(searched, combo)), "search space stage keys")
            for combo in itertools.product(*searched.values())]


def asha_clock(cfg: VaepipeConfig, space: dict) -> tuple[str, int]:
    """ASHA's (time attribute, max_t): optimizer steps, or images seen for a progressive run (a step
    is different work in each stage), up to the longest trial the space can draw."""
    if not cfg.progressive.enabled:
        return "step", cfg.train.max_steps
    from pipeline.stages import build_stages, total_images

    return "images_seen", max(total_images(build_stages(c)) for c in _stage_variants(space, cfg))


def check_equal_resolution(space: dict, cfg: VaepipeConfig) -> None:
    """A progressive sweep compares trials at ASHA's rungs only where every trial is at one resolution:
    a validation ELBO at 16 px and one at 32 px are not on one scale. Checked at each rung and one
    report interval past it (ASHA reads the first report at or after the rung)."""
    from pipeline.stages import build_stages, images_per_step, phase_at

    if cfg.tune.scheduler != "asha":
        return
    _, max_t = asha_clock(cfg, space)
    rungs, t = [], cfg.tune.grace_period
    while t < max_t:
        rungs.append(t)
        t *= cfg.tune.reduction_factor
    for rung in rungs:
        seen = set()
        for c in _stage_variants(space, cfg):
            stages = build_stages(c)
            late = rung + c.train.checkpoint_every * max(images_per_step(s, c.dist.world_size) for s in stages)
            seen |= {phase_at(stages, rung).stage.resolution, phase_at(stages, late).stage.resolution}
        if len(seen) > 1:
            raise ConfigError(f"tune.grace_period={cfg.tune.grace_period}: at ASHA's rung of {rung} images seen the "
                              f"trials would be at resolutions {sorted(seen)}, and their validation ELBOs are not "
                              "comparable; move the rungs (grace_period, reduction_factor) into a stage every "
                              "trial shares, e.g. a long enough progressive.final_stage_images")


_OBJECTIVES = {"neg_elbo": "negative ELBO in nats, a bound on -log p(x)",
               "neg_objective": "the training objective, not a bound: encoder->decoder skips condition on x",
               "code_nll": "negative log-likelihood of the VQ codes in nats, not of the pixels"}


def build_param_space(space: dict, grid_as_choice: bool = False) -> dict:
    from ray import tune

    make = {
        "choice": lambda v: tune.choice(v),
        "grid": lambda v: tune.choice(v) if grid_as_choice else tune.grid_search(v),
        "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
        "randint": lambda v: tune.randint(*v), "quniform": lambda v: tune.quniform(*v),
    }
    # Tune flattens nested keys with "/"; dotted names stay flat and readable in results.
    return {key: make[kind](values) for key, spec in space.items() for kind, values in spec.items()}


def grid_size(space: dict) -> int:
    """Trials per sample: Tune runs every combination of the ``grid`` keys ``num_samples`` times."""
    return math.prod(len(values) for spec in space.values() for kind, values in spec.items() if kind == "grid")


def _trial(params: dict, base: dict, parent_run_id: str, env: WorkerEnv) -> None:
    """One trial: the base config with this trial's values, trained by Ray Train + DeepSpeed.

    ``base`` is redacted; ``env`` carries the live tracking URI and credentials."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipeline.train.trainer import run_training

    env.apply()
    ctx = tune.get_context()
    trial_id = ctx.get_trial_id()
    cfg = apply_overrides(from_dict(base), {k: v for k, v in params.items()}, f"trial {trial_id}")
    cfg = replace(cfg, train=replace(cfg.train, run_name=f"{ctx.get_experiment_name()}-{trial_id}"),
                  tracking=replace(cfg.tracking, run_name=f"trial-{trial_id}", register_name=None))
    tags = {"vaepipe.trial_id": trial_id, **{f"vaepipe.hp.{k}": str(v) for k, v in params.items()}}
    if cfg.tune.scheduler == "pbt":
        _pbt_trial(cfg, parent_run_id, tags)
        return
    _close_dead_trial_runs(cfg, parent_run_id, trial_id)
    local = cfg.dist.local  # the trial trains in this process and reports to Tune itself
    run_training(cfg, parent_run_id=parent_run_id, callbacks=() if local else (TuneReportCallback(),), run_tags=tags,
                 credential_env=SWEEP_CREDENTIAL_ENV, report_to_tune=local)


def _close_dead_trial_runs(cfg: VaepipeConfig, parent_run_id: str, trial_id: str) -> None:
    """A trial started again (its sweep's driver was killed and ``tune --resume`` re-runs it from
    the start) trains into a new child run; the one the dead driver left RUNNING is ended KILLED."""
    from pipeline import tracking

    uri = tracking.resolve_tracking_uri(cfg)
    client = tracking.make_client(uri)
    for run in _trial_runs(uri, parent_run_id, trial_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "vaepipe.trial_status", "restarted")
            client.set_terminated(run.info.run_id, "KILLED")


def _pbt_trial(cfg: VaepipeConfig, parent_run_id: str, tags: dict) -> None:
    """PBT trial: train in segments of ``perturbation_interval`` steps, each ending in a Tune
    checkpoint (the DeepSpeed checkpoint folder). When PBT exploits, Tune restarts this
    function with the better trial's checkpoint and mutated values: training resumes from
    that checkpoint's DeepSpeed state with the new hyperparameters.

    Each segment is a separate ``fit()``: Train V2 reports metrics to Tune but not Tune
    checkpoints, so the driver reports them itself between segments.
    """
    from ray import tune

    from pipeline import tracking
    from pipeline.train.checkpoint import STATE_FILE
    from pipeline.train.trainer import run_training

    checkpoint = tune.get_checkpoint()
    resume = checkpoint.path if checkpoint is not None else None
    step = json.loads((Path(resume) / STATE_FILE).read_text())["train_state"]["step"] if resume else 0
    restored_step = step
    uri = tracking.resolve_tracking_uri(cfg)
    run_id = _trial_run_id(uri, parent_run_id, tags["vaepipe.trial_id"])
    interval, total = cfg.tune.perturbation_interval, cfg.train.max_steps
    while step < total:
        target = min(total, (step // interval + 1) * interval)
        seg = replace(cfg, train=replace(cfg.train, max_steps=target, run_name=f"{cfg.train.run_name}-{target}"),
                      tracking=replace(cfg.tracking, log_model=cfg.tracking.log_model and target == total))
        result = run_training(seg, resume=resume, parent_run_id=parent_run_id, run_tags=tags, mlflow_run_id=run_id,
                              credential_env=SWEEP_CREDENTIAL_ENV)
        if checkpoint is not None and step == restored_step:
            # restarted by PBT with another trial's checkpoint (or by a resumed sweep)
            tracking.make_client(uri).set_tag(result.run_id, "vaepipe.pbt_restored_step", str(restored_step))
        run_id, resume, step = result.run_id, result.checkpoint_path, target
        tune.report({**result.metrics, "step": step}, checkpoint=tune.Checkpoint.from_directory(resume))


def _trial_runs(uri: str, parent_run_id: str, trial_id: str) -> list:
    """The MLflow child runs of ``trial_id`` under the sweep's parent run."""
    from pipeline import tracking

    client = tracking.make_client(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                      f"and tags.`vaepipe.trial_id` = '{trial_id}'")


def _trial_run_id(uri: str, parent_run_id: str, trial_id: str) -> Optional[str]:
    """The MLflow child run of ``trial_id`` if an earlier segment made one."""
    runs = _trial_runs(uri, parent_run_id, trial_id)
    return runs[0].info.run_id if runs else None


def _scheduler(cfg: VaepipeConfig, space: dict):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    t = cfg.tune
    if t.scheduler == "asha":
        time_attr, max_t = asha_clock(cfg, space)
        return ASHAScheduler(time_attr=time_attr, max_t=max_t, grace_period=t.grace_period,
                             reduction_factor=t.reduction_factor)
    if t.scheduler == "pbt":
        # synchronous: every trial reaches the interval before anyone exploits, so trials that
        # start late (each trial pays a fit() start-up) are still compared with the others
        return PopulationBasedTraining(time_attr="step", perturbation_interval=t.perturbation_interval,
                                       hyperparam_mutations=build_param_space(space), quantile_fraction=0.5, synch=True)
    return FIFOScheduler()


def _search_alg(cfg: VaepipeConfig, points: Optional[list[dict]] = None, max_concurrent: int = 0):
    if points is not None:
        from ray.tune.search.basic_variant import BasicVariantGenerator

        # a search algorithm passed in keeps its own limit: Tune's max_concurrent_trials skips it
        return BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent)
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.train.seed)
    return None


def trial_resources(cfg: VaepipeConfig) -> dict:
    """What a trial's own process holds: a sliver while it waits on its Train workers, or in local
    mode (``dist.num_workers=0``: the trial trains in its own process) the one rank's CPUs and GPUs."""
    d = cfg.dist
    if not d.local:
        return {"CPU": DRIVER_CPU}
    return {"CPU": d.cpus_per_worker, **({"GPU": d.gpus_per_worker} if d.gpus_per_worker else {})}


def concurrency_cap(cfg: VaepipeConfig) -> int:
    """Trials that fit at once: Tune does not count Train's workers, so we must."""
    import ray

    res, d = ray.cluster_resources(), cfg.dist
    per_trial = trial_resources(cfg)["CPU"] + d.num_workers * d.cpus_per_worker  # the trial process + its workers
    fit = int(res.get("CPU", 1) // per_trial) if per_trial else cfg.tune.max_concurrent
    if fit < 1:
        need = (f"dist.cpus_per_worker = {d.cpus_per_worker} CPUs (local mode)" if d.local else
                f"dist.num_workers*dist.cpus_per_worker = {d.num_workers * d.cpus_per_worker} CPUs plus {DRIVER_CPU} for "
                "its driver")
        raise ConfigError(f"a trial needs {need}, but the Ray cluster has {res.get('CPU', 0)}: "
                          "lower dist.num_workers or dist.cpus_per_worker")
    if cfg.dist.gpus_per_worker:
        per_trial_gpus = cfg.dist.world_size * cfg.dist.gpus_per_worker
        fit = min(fit, int(res.get("GPU", 0) // per_trial_gpus))
        if fit < 1:  # a trial that can never be placed would wait for ever, pending
            raise ConfigError(f"a trial needs dist.num_workers*dist.gpus_per_worker = {per_trial_gpus:g} GPUs, but the Ray "
                              f"cluster has {res.get('GPU', 0):g}: lower dist.num_workers or dist.gpus_per_worker")
    return max(1, min(cfg.tune.max_concurrent, fit))


def draw_trials(space: dict, num_samples: int, seed: int = 0) -> list[dict]:
    """The trials a random/grid search would run, drawn once (as Tune draws them: every grid
    point ``num_samples`` times, the other keys sampled), so two sweeps can run the same ones."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    rng = np.random.RandomState(seed)
    return [spec for _ in range(num_samples)
            for _, spec in generate_variants(build_param_space(space), random_state=rng)]


def run_sweep(cfg: VaepipeConfig, space: dict, resume: Optional[str] = None,
              points: Optional[list[dict]] = None, register_as: Optional[str] = None) -> dict:
    """Run (or resume) a sweep; returns a summary with the parent run and the best trial.

    ``points``: run exactly these trials (from :func:`draw_trials`) instead of searching.
    ``register_as``: register the best trial under this name as ``challenger`` (``--promote``).
    """
    from ray import tune

    from pipeline import tracking
    from pipeline.train.trainer import _absolute, has_validation_split, init_ray, preflight

    if resume:
        exp_dir = Path(resume)
        if not (exp_dir / SWEEP_STATE).exists():
            raise FileNotFoundError(f"--resume {resume}: no {SWEEP_STATE} there; pass the sweep's experiment folder")
        state = json.loads((exp_dir / SWEEP_STATE).read_text())
        cfg, space = from_dict(state["config"]), state["space"]
    else:
        cfg = replace(cfg, data=replace(cfg.data, path=_absolute(cfg.data.path)),
                      train=replace(cfg.train, storage_path=_absolute(cfg.train.storage_path)),
                      tracking=replace(cfg.tracking, artifact_location=_absolute(cfg.tracking.artifact_location)))
        manifest = preflight(cfg)
        if cfg.tune.metric.startswith("val_") and not has_validation_split(manifest):
            raise ConfigError(f"tune.metric={cfg.tune.metric} needs a 'valid' split, and data.path={cfg.data.path} "
                              f"has only {', '.join(sorted(manifest['splits']))}: shard with a valid split or "
                              "search on a training metric (tune.metric=loss)")
    if register_as:
        cfg = replace(cfg, tune=replace(cfg.tune, register_best=True, register_name=register_as))
    uri = tracking.resolve_tracking_uri(cfg)  # before Ray starts: its processes inherit a password-free env
    init_ray(cfg, spare_cpus=0 if cfg.dist.local else 1)  # local-mode trials hold their CPUs themselves
    # trials run in their own working directories: give them the resolved, absolute store
    cfg = replace(cfg, tracking=replace(cfg.tracking, tracking_uri=uri))
    name = cfg.tune.name or f"vaepipe-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = _absolute(cfg.tune.storage_path)
    if resume:
        parent = state["parent_run_id"]
        tracking.make_client(uri).update_run(parent, status="RUNNING")
    else:
        cap = concurrency_cap(cfg)  # a sweep that cannot be placed fails here, before anything is written
        exp_dir = Path(storage) / name
        parent = tracking.start_run(replace(cfg, tracking=replace(cfg.tracking, run_name=name)), uri,
                                    {"vaepipe.sweep": name})
    trainable = tune.with_resources(tune.with_parameters(_trial, base=redact_config_dict(to_dict(cfg)), parent_run_id=parent,
                                                         env=WorkerEnv.capture(uri, SWEEP_CREDENTIAL_ENV)), trial_resources(cfg))
    if resume:
        tuner = tune.Tuner.restore(str(exp_dir), trainable=trainable, resume_errored=False, restart_errored=False)
    else:
        from pipeline.sweep_progress import SweepProgress

        samples = len(points) if points is not None else cfg.tune.num_samples
        total = samples if points is not None else samples * grid_size(space)  # grid keys multiply the samples
        tuner = tune.Tuner(
            trainable,
            param_space=build_param_space(space, grid_as_choice=points is not None),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, num_samples=samples,
                                        scheduler=_scheduler(cfg, space), search_alg=_search_alg(cfg, points, cap),
                                        max_concurrent_trials=cap),
            run_config=tune.RunConfig(name=name, storage_path=storage,
                                      callbacks=[SweepProgress(cfg.tune.metric, cfg.tune.mode, total)]),
        )
        exp_dir.mkdir(parents=True, exist_ok=True)
        state = {"config": to_dict(cfg), "space": space, "parent_run_id": parent}
        (exp_dir / SWEEP_STATE).write_text(json.dumps(redact_config_dict(state)))
    with _credentials_held_back(storage):
        grid = tuner.fit()
    try:
        return summarize(cfg, space, grid, parent, uri, exp_dir)
    except Exception:
        tracking.end_run(uri, parent, "FAILED")  # `vaepipe tune --resume` summarizes again
        raise


def _credentials_held_back(storage: str):
    """While Tune launches trials, the AWS credentials are not in this process's environment:
    Tune would copy them into each trial's ``runtime_env``, which Ray logs in clear. The trials
    get them in their ``WorkerEnv``. A sweep whose Tune storage is on S3 keeps them: its driver
    syncs the experiment there from its own environment."""
    from contextlib import nullcontext

    from pipeline.data import storage as data_storage

    return nullcontext() if data_storage.is_s3(storage) else kept_out_of_environ(AWS_CREDENTIAL_ENV)


def ran_to_the_end(cfg: VaepipeConfig, space: dict, result) -> bool:
    """Whether a trial finished its run: ``train.max_steps`` steps, or for a progressive trial every
    stage of its own schedule (its searched stage lengths decide how many images that is)."""
    metrics = result.metrics or {}
    if not cfg.progressive.enabled:
        return metrics.get("step", 0) >= cfg.train.max_steps
    from pipeline.stages import build_stages, total_images

    params = {k.removeprefix("config/"): v for k, v in (result.config or {}).items()}
    trial = apply_overrides(cfg, {k: v for k, v in params.items() if k in space}, "trial config")
    return metrics.get("images_seen", 0) >= total_images(build_stages(trial))


def summarize(cfg: VaepipeConfig, space: dict, grid, parent: str, uri: str, exp_dir: Path) -> dict:
    """Tag trials (best, early-stopped, failed), log the table and plot on the parent, register."""
    from pipeline import tracking

    client = tracking.make_client(uri)
    exp_id = client.get_run(parent).info.experiment_id
    children: dict = {}  # a trial re-run by `tune --resume` has two runs: its newest one counts
    for r in client.search_runs([exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'", max_results=10000,
                                order_by=["attributes.start_time DESC"]):
        children.setdefault(r.data.tags.get("vaepipe.trial_id"), r)
    rows, early, failed = [], 0, 0
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or _trial_id_in_path(result.path, children)
        run = children.get(trial_id)
        step = (result.metrics or {}).get("step", 0)
        status = "failed" if result.error else ("finished" if ran_to_the_end(cfg, space, result) else "stopped")
        early += status == "stopped"
        failed += status == "failed"
        if run is not None:
            client.set_tag(run.info.run_id, "vaepipe.trial_status", status)
            if status == "failed":
                client.set_tag(run.info.run_id, "vaepipe.error", redact_text(str(result.error))[:4000])
            if run.info.status == "RUNNING":  # Tune stopped the trial's driver before it closed its run
                client.set_terminated(run.info.run_id, "KILLED" if status == "stopped" else "FAILED")
        params = {k.removeprefix("config/"): v for k, v in (result.config or {}).items()}
        rows.append({"trial_id": trial_id, "run_id": run.info.run_id if run else None, "status": status,
                     "last_step": step, cfg.tune.metric: (result.metrics or {}).get(cfg.tune.metric), **params})
    scored = [r for r in rows if r[cfg.tune.metric] is not None and r["status"] != "failed"]
    if not scored:
        tracking.end_run(uri, parent, "FAILED")
        raise RuntimeError(f"no trial of the sweep reported {cfg.tune.metric}; see the child runs of {parent}")
    best = (min if cfg.tune.mode == "min" else max)(scored, key=lambda r: r[cfg.tune.metric])
    if best["run_id"]:
        client.set_tag(best["run_id"], "vaepipe.best_trial", "true")
    client.set_tag(parent, "vaepipe.best_run_id", str(best["run_id"]))
    client.log_metric(parent, f"best_{cfg.tune.metric}", float(best[cfg.tune.metric]))
    for key, value in (("trials", len(rows)), ("trials_stopped_early", early), ("trials_failed", failed)):
        client.log_metric(parent, key, value)
    client.log_text(parent, redact_text(_table_csv(rows)), "sweep/trials.csv")
    client.log_figure(parent, metric_plot(rows, list(space), cfg.tune.metric), "sweep/metric_vs_hyperparameters.png")
    version = None
    if cfg.tune.register_best and best["run_id"]:
        version = register_challenger(uri, cfg, best["run_id"], rows)
    tracking.end_run(uri, parent, "FINISHED")
    return {"parent_run_id": parent, "experiment_path": str(exp_dir), "best": best, "trials": rows,
            "stopped_early": early, "failed": failed, "registered_version": version, "data_path": cfg.data.path, "tracking_uri": uri,
            "registered_name": cfg.tune.register_name if version else None}


def _trial_id_in_path(path: str, known: Sequence[Optional[str]]) -> Optional[str]:
    """A trial that never reported has no ``trial_id`` metric; Tune's folder for it is
    ``<trainable>_<trial id>_<index>_<params>_<date>`` (the id's form depends on the search
    algorithm), so find which known trial id the folder name holds."""
    name = Path(path).name
    return next((t for t in known if t and f"_{t}_" in name), None)


def _table_csv(rows: list[dict]) -> str:
    import csv
    import io

    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("trial_id", "status", "last_step"), k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _plottable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return "-".join(map(str, value))
    return value if isinstance(value, (int, float, str)) else str(value)


def register_challenger(uri: str, cfg: VaepipeConfig, best_run_id: str, rows: list[dict]) -> int:
    """Register the sweep's challenger. With a validation ``tune.metric`` and a model per checkpoint,
    that is the checkpoint model with the best validated value over every trial that did not fail
    (an earlier checkpoint of any trial can win); otherwise the best trial's last model."""
    from pipeline import tracking

    t = cfg.tracking
    if cfg.tune.metric.startswith("val_") and t.log_model and t.model_per_checkpoint:
        runs = [r["run_id"] for r in rows if r["run_id"] and r["status"] != "failed"]
        return tracking.register_model(uri, best_run_id, cfg.tune.register_name, "challenger",
                                       best=cfg.tune.metric, mode=cfg.tune.mode, among=runs)
    return tracking.register_model(uri, best_run_id, cfg.tune.register_name, "challenger")


def metric_plot(rows: list[dict], hyperparameters: list[str], metric: str):
    """One scatter per hyperparameter: the metric of every trial against its value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(4 * max(1, len(hyperparameters)), 3.2), dpi=100)
    for i, hp in enumerate(hyperparameters):
        ax = fig.add_subplot(1, max(1, len(hyperparameters)), i + 1)
        # list-valued choices (e.g. latent dims per level) become categories such as "32-16-8"
        pts = [(_plottable(r.get(hp)), r[metric], r["status"]) for r in rows
               if r.get(metric) is not None and r.get(hp) is not None]
        for status, color in (("finished", "tab:blue"), ("stopped", "tab:gray"), ("failed", "tab:red")):
            sel = [(x, y) for x, y, s in pts if s == status]
            if sel:
                ax.scatter([x for x, _ in sel], [y for _, y in sel], c=color, label=status, s=18)
        if all(isinstance(x, (int, float)) and x > 0 for x, _, _ in pts) and "lr" in hp:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # a narrow range would overprint its minor labels
        ax.set_xlabel(hp)
        ax.set_ylabel(metric)
    fig.axes[0].legend(fontsize=7) if fig.axes else None
    fig.tight_layout()
    return fig

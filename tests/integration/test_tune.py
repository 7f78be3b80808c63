"""Sweeps: the space is checked before any trial starts; an ASHA sweep of distributed trials
stops some early, records a parent and one child per trial and registers the best; an
interrupted sweep resumes without re-running finished trials; promotion is metric-gated.

Only the ASHA drill's trials are distributed (2 Ray Train workers each). The other sweeps are
about Tune (a searcher's resume, PBT's exploit, promotion), so their trials train in local mode
(``dist.num_workers=0``: in the trial's own process, reporting to Tune directly) instead of
starting a Train controller, its helper actors and a worker for every trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import base_overrides, wait_all_cpus_free
from pipeline.config import ConfigError, load_config

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def _sweep_file(tmp_path: Path, shards: str, space: dict, **sections) -> Path:
    doc = {"space": space}
    for override in base_overrides(shards, tmp_path):
        key, value = override.split("=", 1)
        node = doc
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_unknown_space_key_fails_before_any_trial(tmp_path, shards32):
    from pipeline.tune import load_sweep

    bad = _sweep_file(tmp_path, shards32, {"model.latnt_dim": {"choice": [4, 8]}})
    with pytest.raises(ConfigError, match="model.latnt_dim"):
        load_sweep(bad)
    bad_value = _sweep_file(tmp_path, shards32, {"dist.zero_stage": {"choice": [1, 7]}})
    with pytest.raises(ConfigError, match="dist.zero_stage"):
        load_sweep(bad_value)
    bad_domain = _sweep_file(tmp_path, shards32, {"optim.lr": {"normal": [0, 1]}})
    with pytest.raises(ConfigError, match="optim.lr"):
        load_sweep(bad_domain)


def test_trials_that_never_reported_are_matched_by_their_folder():
    from pipeline.tune import _trial_id_in_path

    known = ["c894b_00001", "c894b_00002", "092815e5", None]
    assert _trial_id_in_path("/x/_trial_c894b_00002_2_optim_lr=1000.0000_2026-11-23_23-17-15", known) == "c894b_00002"
    assert _trial_id_in_path("/x/_trial_092815e5_1_model.ladder.latent_dims=32_16_2026-11-24", known) == "092815e5"
    assert _trial_id_in_path("/x/_trial_ffff0_00009_9_x=1_2026-11-24", known) is None


def test_sweep_plot_takes_list_string_and_numeric_hyperparameters():
    from pipeline.tune import metric_plot

    rows = [{"model.ladder.latent_dims": [32, 16, 8], "model.ladder.merge": "residual", "optim.lr": 1e-3,
             "val_neg_elbo": 10.0, "status": "finished"},
            {"model.ladder.latent_dims": [64, 32], "model.ladder.merge": "precision", "optim.lr": 3e-4,
             "val_neg_elbo": 12.0, "status": "stopped"},
            {"model.ladder.latent_dims": [64, 32], "model.ladder.merge": "precision", "optim.lr": 1e3,
             "val_neg_elbo": None, "status": "failed"}]
    fig = metric_plot(rows, ["model.ladder.latent_dims", "model.ladder.merge", "optim.lr"], "val_neg_elbo")
    fig.canvas.draw()  # rendering is where matplotlib rejects unplottable values
    dims_ax, merge_ax, lr_ax = fig.axes
    assert [t.get_text() for t in dims_ax.get_xticklabels()] == ["32-16-8", "64-32"]
    assert sorted(t.get_text() for t in merge_ax.get_xticklabels()) == ["precision", "residual"]
    assert lr_ax.get_xscale() == "log"
    assert sum(len(c.get_offsets()) for c in dims_ax.collections) == 2  # the failed trial has no metric


def test_sweep_progress_line_counts_trials_by_state_and_names_the_best_latest_report():
    from types import SimpleNamespace as T

    from pipeline.sweep_progress import SweepProgress
    from pipeline.tune import grid_size

    assert grid_size({"optim.lr": {"grid": [1, 2, 3]}, "model.beta": {"grid": [1, 2]}, "x": {"choice": [1]}}) == 6
    trials = [T(trial_id="a", status="TERMINATED", last_result={"val_neg_elbo": 120.0}),
              T(trial_id="b", status="RUNNING", last_result={"val_neg_elbo": 101.5}),
              T(trial_id="c", status="ERROR", last_result={"val_neg_elbo": float("nan")}),
              T(trial_id="d", status="PENDING", last_result={})]
    assert SweepProgress("val_neg_elbo", "min", total=6).line(trials) == (
        "sweep: 1/6 done, 1 running, 3 waiting, 1 failed; best val_neg_elbo 101.5 (trial b)")
    assert SweepProgress("val_neg_elbo", "max").line(trials).endswith("best val_neg_elbo 120 (trial a)")
    assert SweepProgress("loss", "min", total=4).line(trials) == "sweep: 1/4 done, 1 running, 1 waiting, 1 failed"


@pytest.mark.integration
def test_asha_sweep_of_distributed_trials(ray_session, shards32, tmp_path, second_local_ray, capsys):
    """Run while a second local Ray instance is up: Train's placement-group cleaner used to
    auto-detect "the" cluster, fail on two, and leave stopped trials' CPUs reserved."""
    from pipeline.tracking import make_client
    from pipeline.tune import load_sweep, run_sweep

    # One 2-worker trial at a time, in the grid's order. lr 1e-2 reaches the first rung (step 12)
    # first and sets its cutoff (its loss spikes over steps 3-6, then falls far below lr 1e-5's by
    # step 9); lr 1e-5 barely moves, trails there and is stopped with 36 of its 48 steps to go, so
    # the stop lands long before it could finish. lr 1e3 diverges after its first step (a bad
    # region): that trial fails, once although dist.max_failures allows a restart (a restart
    # would diverge again), and the sweep goes on.
    path = _sweep_file(
        tmp_path, shards32, {"optim.lr": {"grid": [1e-2, 1e-5, 1e3]}}, dist={"max_failures": 1},
        train={"max_steps": 48, "checkpoint_every": 12, "val_every": 6, "image_every": 48, "max_consecutive_skips": 3},
        tune={"num_samples": 1, "scheduler": "asha", "grace_period": 12, "reduction_factor": 2, "max_concurrent": 1,
              "register_best": True, "register_name": "vae-sweep", "storage_path": str(tmp_path / "tune")},
    )
    cfg, space = load_sweep(path)
    t0 = time.perf_counter()
    summary = run_sweep(cfg, space)
    print(f"3-trial sweep wall time {time.perf_counter() - t0:.0f} s; stopped early: "
          f"{[(r['trial_id'], r['last_step']) for r in summary['trials'] if r['status'] == 'stopped']}")
    assert len(summary["trials"]) == 3
    assert {r["optim.lr"]: r["status"] for r in summary["trials"]} == {1e-2: "finished", 1e-5: "stopped", 1e3: "failed"}
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[vaepipe] sweep: ")]
    assert progress and all("/3 done" in line for line in progress), progress  # a line a trial event, out of 3
    assert summary["stopped_early"] == 1
    assert summary["failed"] == 1
    assert [r["optim.lr"] for r in summary["trials"] if r["status"] == "failed"] == [1e3]
    client = make_client(cfg.tracking.tracking_uri)
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 3
    assert sorted(c.data.tags["vaepipe.trial_status"] for c in children) == ["failed", "finished", "stopped"]
    assert parent.data.metrics["trials_stopped_early"] == summary["stopped_early"]
    assert parent.data.metrics["trials_failed"] == 1
    failed = [c for c in children if c.data.tags["vaepipe.trial_status"] == "failed"]
    assert failed[0].info.status == "FAILED" and "diverged" in failed[0].data.tags["vaepipe.error"]
    assert "not retried" in failed[0].data.tags["vaepipe.error"]  # failures.FailOnce: no restart spent on it
    assert any(a.path == "sweep/trials.csv" for a in client.list_artifacts(parent.info.run_id, "sweep"))
    best = client.get_model_version_by_alias("vae-sweep", "challenger")
    assert best.tags["vaepipe.run_id"] == summary["best"]["run_id"]
    from pipeline.serving import load_logged_weights

    # logged before the trial's last report, so ASHA stopping it at max_t cannot cut the upload short
    assert "state_dict" in load_logged_weights("models:/vae-sweep@challenger")
    assert summary["best"]["optim.lr"] == 1e-2
    cpus = wait_all_cpus_free(ray_session)
    assert cpus["free"] == cpus["total"], f"placement groups left behind: {cpus}"
    assert second_local_ray.poll() is None  # the other instance was up the whole time


@pytest.mark.integration
def test_interrupted_optuna_sweep_over_ladder_levels_resumes_without_rerunning(ray_session, shards32, tmp_path):
    """The hierarchical sweep's shape, Optuna TPE over list-valued latent dims per level, with its
    driver killed after the first trial: `tune --resume` restores the searcher and the finished
    trial, runs only what was left, and each trial trained the hierarchy it was given."""
    path = _sweep_file(
        tmp_path, shards32, {"model.ladder.latent_dims": {"choice": [[8, 4], [8, 4, 2]]},
                             "model.ladder.merge": {"choice": ["precision", "residual"]}},
        model={"name": "ladder_vae"}, dist={"num_workers": 0}, tracking={"log_model": False},
        train={"max_steps": 4, "checkpoint_every": 4, "val_every": 4, "image_every": 4},
        tune={"num_samples": 2, "search": "optuna", "scheduler": "fifo", "max_concurrent": 1,
              "storage_path": str(tmp_path / "tune"), "name": "interrupted"},
    )
    exp = tmp_path / "tune" / "interrupted"
    # The drivers join the session's Ray as a cluster client would; killing one leaves the
    # cluster (and the other tests on it) running, and Ray reaps the dead driver's trials.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "tune", "--config", str(path)], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and len(_finished_trials(exp)) < 1:
            time.sleep(2)
        assert _finished_trials(exp), "no trial finished before the deadline"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver dies mid-sweep, as a killed job would
        driver.wait()
    done_before = _finished_trials(exp)
    resumed = subprocess.run([sys.executable, "-m", "pipeline.cli", "tune", "--resume", str(exp)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert len(_finished_trials(exp)) == 2
    from pipeline.tracking import make_client

    state = json.loads((exp / "vaepipe_sweep.json").read_text())
    client = make_client(state["config"]["tracking"]["tracking_uri"])
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {
        "sweep/trials.csv", "sweep/metric_vs_hyperparameters.png"}
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    per_trial = {}
    for r in runs:
        per_trial.setdefault(r.data.tags["vaepipe.trial_id"], []).append(r)
    assert len(per_trial) == 2
    for trial_id in done_before:  # every trial that had finished before the kill trained exactly once
        assert len(per_trial[trial_id]) == 1, f"finished trial {trial_id} was trained again"
    finished = []
    for trial_id, trial_runs in per_trial.items():  # one finished run each; one the kill cut short is KILLED
        statuses = sorted(r.info.status for r in trial_runs)
        assert statuses in (["FINISHED"], ["FINISHED", "KILLED"]), (trial_id, statuses)
        finished += [r for r in trial_runs if r.info.status == "FINISHED"]
    for child in finished:  # each trial trained the hierarchy it was given
        dims = json.loads(child.data.tags["vaepipe.hp.model.ladder.latent_dims"])
        assert dims in ([8, 4], [8, 4, 2])
        assert {f"kl_level/{i}" for i in range(len(dims))} <= set(child.data.metrics)


def _finished_trials(exp: Path) -> list[str]:
    """Trial ids that Tune's own saved experiment state records as finished."""
    states = sorted(exp.glob("experiment_state-*.json"))  # named by start time: the last is the newest
    if not states:
        return []
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (ValueError, KeyError):
        return []  # caught mid-write
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]


def _log_model(uri: str, cfg, model, name: str) -> None:
    from pipeline import tracking
    from pipeline.config import to_dict, to_yaml
    from pipeline.serving import log_pyfunc

    run_id = tracking.start_run(cfg, uri)
    path = Path(cfg.train.storage_path) / run_id / "weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    mc = {"name": cfg.model.name, **model.config}
    torch.save({"model_config": mc, "state_dict": model.state_dict(), "config": to_dict(cfg)}, path)
    tracking.make_client(uri).set_tag(run_id, "vaepipe.model_uri", log_pyfunc(run_id, path, mc, to_yaml(cfg)))
    tracking.end_run(uri, run_id)
    return run_id


def test_promotion_moves_champion_only_for_a_better_challenger(shards32, tmp_path):
    from models import build_model
    from pipeline.data.stream import ShardStream
    from pipeline.evaluate.runner import EvalSpec
    from pipeline.evaluate.diagnostics import active_units_cov
    from pipeline.promote import compare, promote
    from pipeline.tracking import make_client, register_model

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"model.likelihood": "bernoulli"}))
    uri = cfg.tracking.tracking_uri
    torch.manual_seed(0)
    untrained = build_model(cfg.model)
    trained = build_model(cfg.model)
    trained.load_state_dict(untrained.state_dict())
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for i, batch in enumerate(ShardStream(shards32, "train", 16, 32, 0, 1, num_workers=0).iter_epoch(0)):
        loss = trained(batch["image"])["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    weak = register_model(uri, _log_model(uri, cfg, untrained.eval(), "weak"), "vae-promo", "champion")
    strong = register_model(uri, _log_model(uri, cfg, trained.eval(), "strong"), "vae-promo", "challenger")
    # bernoulli on continuous pixels: the IWAE bound is compared under its own name, not as nll
    spec = EvalSpec(metrics=["neg_iwae_nats", "au"], split="valid", k=8, batch_k=8)
    au_margin = 8.0  # the whole 8-unit latent: the au gate passes here, it is exercised below
    wins, rows, version = promote("vae-promo", shards32, spec, [0.0, au_margin], uri)
    assert wins and version == strong
    client = make_client(uri)
    assert str(client.get_model_version_by_alias("vae-promo", "champion").version) == str(strong)
    assert rows[0].metric == "neg_iwae_nats" and rows[0].challenger < rows[0].champion
    # the au row is Burda's count on the same split, computed here another way
    valid = torch.cat([b["image"] for b in ShardStream(shards32, "valid", 8, 32, 0, 1, num_workers=0).iter_eval("valid")])
    with torch.no_grad():
        direct = [active_units_cov(m.eval().encode(valid)[0].double()) for m in (untrained, trained)]
    assert (rows[1].metric, rows[1].champion, rows[1].challenger) == ("au", direct[0], direct[1])
    # a margin one unit tighter than the drop in active units the strong model shows refuses it
    drop = rows[1].champion - rows[1].challenger
    if drop >= 1:
        _, tight = compare({"neg_iwae_nats": rows[0].champion, "active_units_cov": rows[1].champion},
                           {"neg_iwae_nats": rows[0].challenger, "active_units_cov": rows[1].challenger},
                           ["neg_iwae_nats", "au"], [0.0, drop - 1])
        assert not tight[1].ok
    # now the weak model challenges the strong champion and is refused
    client.set_registered_model_alias("vae-promo", "challenger", weak)
    wins, rows, version = promote("vae-promo", shards32, spec, [0.0, au_margin], uri)
    assert not wins and version == strong
    assert str(client.get_model_version_by_alias("vae-promo", "champion").version) == str(strong)
    decisions = [r.data.tags["vaepipe.decision"] for r in client.search_runs(
        [client.get_experiment_by_name("vaepipe-promotions").experiment_id])]
    assert sorted(decisions) == ["promoted", "refused"]


@pytest.mark.integration
def test_pbt_exploit_restores_deepspeed_checkpoint(ray_session, shards32, tmp_path):
    from pipeline.tracking import make_client
    from pipeline.tune import load_sweep, run_sweep

    path = _sweep_file(
        tmp_path, shards32, {"optim.lr": {"choice": [1e-5, 1e-2]}},
        train={"max_steps": 8, "checkpoint_every": 4, "val_every": 4, "image_every": 8},
        dist={"num_workers": 0}, tracking={"log_model": False},
        tune={"num_samples": 2, "scheduler": "pbt", "perturbation_interval": 4, "max_concurrent": 2,
              "storage_path": str(tmp_path / "tune")},
    )
    cfg, space = load_sweep(path, ["train.seed=3"])
    summary = run_sweep(cfg, space)
    assert all(r["status"] == "finished" for r in summary["trials"]), summary["trials"]
    client = make_client(cfg.tracking.tracking_uri)
    children = client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    restored = [c for c in children if "vaepipe.pbt_restored_step" in c.data.tags]
    assert restored, "PBT never exploited: no trial restarted from another trial's checkpoint"
    assert restored[0].data.tags["vaepipe.pbt_restored_step"] == "4"
    assert restored[0].data.tags["vaepipe.resumed_from_step"] == "4"  # the workers loaded the DeepSpeed state


def test_sweep_refuses_trials_whose_metric_is_not_comparable(tmp_path):
    """Skips turn -ELBO into a non-bound, a likelihood choice changes the scale, a prior over
    codes reports a code NLL: each is refused before any trial runs, naming the key."""
    from pipeline.config import ConfigError
    from pipeline.tune import load_sweep

    def sweep(space: str, extra: str = "") -> Path:
        p = tmp_path / "s.yaml"
        p.write_text(f"base: {JOBS / 'quickstart.yaml'}\nspace:\n{space}\n{extra}")
        return p

    with pytest.raises(ConfigError, match=r"model.skip_connections.*val_neg_objective"):
        load_sweep(sweep("  model.skip_connections: {choice: [false, true]}"))
    with pytest.raises(ConfigError, match=r"model.likelihood"):
        load_sweep(sweep("  model.likelihood: {choice: [bernoulli, gaussian]}"))
    with pytest.raises(ConfigError, match=r"tune.metric='val_neg_elbo'.*val_code_nll"):
        load_sweep(sweep("  optim.lr: {choice: [0.001]}", "model: {name: vq_prior}"))
    cfg, _ = load_sweep(sweep("  optim.lr: {choice: [0.001, 0.01]}", "model: {name: vq_prior}\ntune: {metric: val_code_nll}"))
    assert cfg.tune.metric == "val_code_nll"


def test_vqvae_elbo_includes_the_uniform_code_prior():
    """-ELBO of a VQ-VAE = recon NLL + h*w*log K: a bigger codebook pays for its bits."""
    import math

    import torch

    from models import build_model
    from pipeline.config import load_config

    for k in (16, 256):
        cfg = load_config(None, ["model.name=vqvae", "model.flavor=debug", "data.resolution=32",
                                 f"model.vq.codebook_size={k}"])
        out = build_model(cfg.model).eval()(torch.rand(2, 3, 32, 32))
        grid = 32 // cfg.model.vq.downsample
        assert float(out["kl"]) == pytest.approx(grid * grid * math.log(k), rel=1e-6)
        assert float(out["elbo"]) == pytest.approx(-(float(out["recon"]) + grid * grid * math.log(k)), rel=1e-6)


@pytest.mark.integration
def test_tune_promote_moves_the_alias_only_for_a_winner(ray_session, shards32, tmp_path):
    """`vaepipe tune --promote`: sweep, register the best as challenger, gate it against the
    champion on the test split; the alias moves when it wins, exit 1 when it does not, and
    both decisions are logged and linked from their sweep's parent run."""
    from models import build_model
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.tracking import make_client, register_model

    name = "vae-tune-promote"
    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"model.likelihood": "bernoulli"}))
    uri = cfg.tracking.tracking_uri
    torch.manual_seed(0)
    weak = register_model(uri, _log_model(uri, cfg, build_model(cfg.model).eval(), "weak"), name, "champion")
    path = _sweep_file(
        tmp_path, shards32, {"optim.lr": {"grid": [1e-2]}}, model={"likelihood": "bernoulli"},
        train={"max_steps": 12, "checkpoint_every": 12, "val_every": 12, "image_every": 12},
        dist={"num_workers": 0}, tune={"num_samples": 1, "scheduler": "fifo", "max_concurrent": 2,
                                        "storage_path": str(tmp_path / "tune")},
    )
    gate = ["--promote", "--name", name, "--metrics", "neg_iwae_nats", "--k", "8", "--max-samples", "16"]
    client = make_client(uri)

    def sweep(margins: str):
        result = CliRunner().invoke(app, ["tune", "--config", str(path), *gate, "--margins", margins],
                                    env={"COLUMNS": "200"})
        parents = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                                     filter_string="tags.`vaepipe.sweep` != ''", order_by=["attributes.start_time DESC"])
        return result, parents[0]

    won, parent = sweep("0")
    assert won.exit_code == 0, won.output
    assert "champion vs challenger" in won.output and "promoted:" in won.output
    challenger = client.get_model_version_by_alias(name, "challenger")
    assert challenger.tags["vaepipe.run_id"] == parent.data.tags["vaepipe.best_run_id"]
    assert client.get_model_version_by_alias(name, "champion").version == challenger.version != str(weak)
    assert parent.data.tags["vaepipe.promotion.decision"] == "promoted"
    decision = client.get_run(parent.data.tags["vaepipe.promotion.run_id"])
    assert decision.data.tags["vaepipe.sweep_run_id"] == parent.info.run_id
    assert {t.key: t.value for t in decision.inputs.dataset_inputs[0].tags}["mlflow.data.context"] == "test"
    assert decision.data.metrics["challenger/neg_iwae_nats"] < decision.data.metrics["champion/neg_iwae_nats"]

    champion = challenger.version
    refused, parent2 = sweep("1e9")  # no model improves the bound by a billion nats
    assert refused.exit_code == 1, refused.output
    assert "refused:" in refused.output and f"champion stays at version {champion}" in refused.output
    assert client.get_model_version_by_alias(name, "champion").version == champion
    assert client.get_model_version_by_alias(name, "challenger").version != champion
    assert parent2.info.run_id != parent.info.run_id and parent2.data.tags["vaepipe.promotion.decision"] == "refused"
    assert client.get_run(parent2.data.tags["vaepipe.promotion.run_id"]).data.tags["vaepipe.decision"] == "refused"


@pytest.mark.parametrize("metric,per_checkpoint,expect_best", [
    ("val_neg_elbo", True, True),    # every checkpoint model of the trials that did not fail competes
    ("loss", True, False),           # a training metric is linked to no validated model: the best trial's last
    ("val_neg_elbo", False, False),  # one model per trial: the best trial's
])
def test_the_sweeps_challenger_is_the_best_validated_checkpoint_over_its_trials(monkeypatch, metric, per_checkpoint,
                                                                               expect_best):
    from pipeline import tracking
    from pipeline.config import load_config
    from pipeline.tune import register_challenger

    calls = []
    monkeypatch.setattr(tracking, "register_model", lambda *a, **k: calls.append((a, k)) or 7)
    cfg = load_config(None, [f"tune.metric={metric}", "tune.mode=min", "tune.register_name=vae-x",
                             f"tracking.model_per_checkpoint={str(per_checkpoint).lower()}"])
    rows = [{"run_id": "r1", "status": "finished"}, {"run_id": "r2", "status": "stopped early"},
            {"run_id": "r3", "status": "failed"}, {"run_id": None, "status": "failed"}]
    assert register_challenger("uri", cfg, "r1", rows) == 7
    (args, kwargs), = calls
    assert args == ("uri", "r1", "vae-x", "challenger")
    assert kwargs == ({"best": metric, "mode": "min", "among": ["r1", "r2"]} if expect_best else {})

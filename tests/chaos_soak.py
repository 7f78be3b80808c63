"""A chaos soak: a run whose workers and driver are SIGKILLed at random ends where the
uninterrupted run ends, and its MLflow run holds each record once.

    python tests/chaos_soak.py --kills 8 --steps 400 --seed 1

The soak starts its own local Ray and trains the same job twice into one SQLite MLflow store
(2 workers, ZeRO-2, fp32, a loss logged every step, a checkpoint and a LoggedModel every
``--checkpoint-every`` steps, images every ``--image-every``):

- the reference, uninterrupted, in this process;
- the chaos run, as ``vaepipe train`` processes. After each kill the soak waits for the run to
  log a new step past a random target, then a random fraction of a second, and SIGKILLs either
  one Ray Train worker (Ray restarts the group from the newest committed checkpoint; each kill
  costs one of ``dist.max_failures``) or the driver, which takes its Train controller and
  workers with it; the soak then starts ``vaepipe train --resume <run folder>``.

``check_against_reference`` then compares them (see its docstring) and the soak prints its
figures: kills, minutes, steps. The suite's short version is
``test_train_integration.py::test_whole_job_killed_mid_checkpoint_resumes_from_the_last_committed``
(a driver and a worker killed in a 12-step run), which makes the same checks.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import base_overrides, fresh_sqlite_store  # noqa: E402  (also sets the suite's Ray variables)


# -- what a run holds ------------------------------------------------------------------------
@dataclass
class Record:
    """What an MLflow run and its run folder hold, each as a list so a duplicate shows."""

    metric_steps: dict  # key -> [steps]
    loss: dict  # step -> value (the last one logged, where a step was logged twice)
    images: dict  # (key, step) -> [artifact paths]
    model_steps: list  # the vaepipe.step of every live LoggedModel
    checkpoint_steps: list  # the step of every committed checkpoint in the run folder
    weights: dict  # the final checkpoint's module state (ZeRO 0-2: mp_rank_00's "module")


def read_record(client, run_id: str, run_dir: str) -> Record:
    from pipeline import logged_models
    from pipeline.logger import logged_images
    from pipeline.train.checkpoint import committed_checkpoints, marker_of

    run = client.get_run(run_id)
    histories = {k: client.get_metric_history(run_id, k) for k in run.data.metrics}
    models = logged_models.search(client, [run.info.experiment_id], [run_id])
    folders = committed_checkpoints(run_dir)
    return Record(metric_steps={k: sorted(m.step for m in h) for k, h in histories.items()},
                  loss={m.step: m.value for m in sorted(histories["loss"], key=lambda m: m.timestamp)},
                  images=logged_images(client, run_id),
                  model_steps=sorted(logged_models.step_of(m) for m in models),
                  checkpoint_steps=sorted(marker_of(f)["step"] for f in folders),
                  weights=final_weights(folders[0]))


def final_weights(folder) -> dict:
    from pipeline.train import weights_only
    from pipeline.train.checkpoint import CKPT_TAG

    return weights_only.load(str(Path(str(folder)) / CKPT_TAG / "mp_rank_00_model_states.pt"))["module"]


def duplicates(record: Record) -> list[str]:
    """Every metric step, image, model and checkpoint the run holds more than once."""
    found = [f"metric {k} at steps {sorted({s for s in v if v.count(s) > 1})}"
             for k, v in record.metric_steps.items() if len(v) != len(set(v))]
    found += [f"image {k}@{s} x{len(p)}" for (k, s), p in record.images.items() if len(p) > 1]
    found += [f"LoggedModel at step {s}" for s in sorted(set(record.model_steps)) if record.model_steps.count(s) > 1]
    found += [f"checkpoint of step {s}" for s in sorted(set(record.checkpoint_steps))
              if record.checkpoint_steps.count(s) > 1]
    return found


def check_against_reference(reference: Record, chaos: Record) -> None:
    """The interrupted run is the uninterrupted one: bit-for-bit final weights (CPU, fp32, ZeRO
    0-2), the same loss at every step, the same images (key and step), LoggedModels (steps) and
    committed checkpoints (steps), and nothing held twice."""
    assert not duplicates(chaos), f"held twice: {duplicates(chaos)}"
    differ = {s: (v, chaos.loss.get(s)) for s, v in reference.loss.items() if chaos.loss.get(s) != v}
    assert not differ, f"loss differs from the uninterrupted run at steps {sorted(differ)[:10]}: {differ}"
    assert sorted(chaos.loss) == sorted(reference.loss), "logged steps differ"
    assert set(chaos.images) == set(reference.images), (sorted(set(reference.images) ^ set(chaos.images)))
    assert chaos.model_steps == reference.model_steps, (chaos.model_steps, reference.model_steps)
    assert chaos.checkpoint_steps == reference.checkpoint_steps, (chaos.checkpoint_steps, reference.checkpoint_steps)
    assert_same_weights(reference.weights, chaos.weights)


def assert_same_weights(reference: dict, weights: dict) -> None:
    """Bit for bit the same tensors under the same names."""
    import torch

    assert weights.keys() == reference.keys()
    changed = [k for k, v in reference.items() if not torch.equal(weights[k], v)]
    assert not changed, f"final weights differ: {changed}"


# -- the soak --------------------------------------------------------------------------------
@dataclass
class Kill:
    what: str  # "worker" or "driver"
    logged_step: int  # the run's newest logged step when it landed
    at_s: float  # seconds since the chaos run started


@dataclass
class Soak:
    overrides: list
    run_dir: Path
    kills: int
    rng: random.Random
    address: str
    events: list = field(default_factory=list)
    driver: subprocess.Popen | None = None

    def start_driver(self, resume: bool) -> None:
        args = [sys.executable, "-m", "pipeline.cli", "train", *self.overrides, f"dist.address={self.address}"]
        if resume:
            args += ["--resume", str(self.run_dir)]
        drivers = len([e for e in self.events if e.what == "driver"])
        with open(self.run_dir.parent / f"driver-{drivers}.log", "w") as out:  # the driver's console, kept
            self.driver = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)

    def run(self, client, experiment: str, steps: int, checkpoint_every: int) -> float:
        """Start the run, kill it ``kills`` times, resume it after each driver kill; the wall seconds."""
        t0 = time.time()
        plan = [("worker", "driver")[i % 2] for i in range(self.kills)]
        self.rng.shuffle(plan)
        targets = sorted(self.rng.sample(range(2, steps - 1), self.kills))
        # before the first checkpoint a killed driver leaves nothing to --resume: that kill is a worker's
        plan = ["worker" if t <= checkpoint_every else what for what, t in zip(plan, targets)]
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.start_driver(resume=False)
        for what, target in zip(plan, targets):
            step = self.wait_for_step(client, experiment, target)
            time.sleep(self.rng.uniform(0, 1.5))  # anywhere in a step, a checkpoint, a log call
            step = max(step, logged_step(client, experiment))
            (self.kill_worker if what == "worker" else self.kill_driver)()
            self.events.append(Kill(what, step, round(time.time() - t0, 1)))
            print(f"[soak] {what} killed at logged step {step} ({time.time() - t0:.0f} s)", flush=True)
        code = self.driver.wait(timeout=3600)
        assert code == 0, f"the chaos run's last driver exited with {code}"
        return time.time() - t0

    def wait_for_step(self, client, experiment: str, target: int, timeout: float = 900) -> int:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.driver.poll() is None, f"the driver exited ({self.driver.returncode}) before step {target}"
            step = logged_step(client, experiment)
            if step >= target:
                return step
            time.sleep(0.2)
        raise TimeoutError(f"the chaos run did not log step {target} in {timeout:.0f} s")

    def kill_worker(self) -> None:
        workers = train_workers()
        assert workers, "no Ray Train worker to kill"
        self.rng.choice(workers).kill()  # SIGKILL

    def kill_driver(self) -> None:
        import ray

        self.driver.send_signal(signal.SIGKILL)
        self.driver.wait(timeout=60)
        deadline = time.time() + 120  # the job's controller and workers go with their driver
        while (train_workers() or ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]) \
                and time.time() < deadline:
            time.sleep(0.5)
        self.start_driver(resume=True)


def train_workers() -> list:
    """This soak's Ray Train worker processes (descendants of the Ray it started)."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc)
        except psutil.NoSuchProcess:
            pass
    return found


def logged_step(client, experiment: str) -> int:
    """The newest step at which the experiment's (one) run logged its loss, -1 before any."""
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    steps = [m.step for r in runs for m in r.data.to_proto().metrics if m.key == "loss"]
    return max(steps, default=-1)


def soak_overrides(shards: str, work: Path, uri: str, steps: int, checkpoint_every: int, image_every: int,
                   kills: int) -> list:
    return base_overrides(shards, work, tracking_uri=uri, **{
        "train.max_steps": steps, "train.log_every": 1, "train.precision": "fp32", "dist.zero_stage": 2,
        "train.checkpoint_every": checkpoint_every, "train.val_every": checkpoint_every,
        "train.image_every": image_every, "train.keep_checkpoints": 1000,
        "tracking.log_model": True, "tracking.model_per_checkpoint": True, "tracking.keep_models": 0,
        "dist.max_failures": kills + 1, "train.seed": 11})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--checkpoint-every", type=int, default=20)
    p.add_argument("--image-every", type=int, default=40)
    p.add_argument("--step-sleep", type=float, default=0.1, help="seconds added to every step (a longer soak)")
    p.add_argument("--seed", type=int, default=0, help="of the kill plan: which, and when")
    p.add_argument("--workdir", type=Path, default=None, help="kept when given; a temporary folder otherwise")
    args = p.parse_args(argv)
    from pipeline.config import load_config
    from pipeline.data.shards import write_shards
    from pipeline.data.synth import generate_synthetic_celeba
    from pipeline.ray_local import start_local_ray
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    import ray

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vaepipe-soak-"))
    source = generate_synthetic_celeba(work / "celeba", n=300, seed=0, workers=2, progress=False)
    shards = str(work / "shards")
    write_shards(str(source), shards, resolution=32, shard_size=100, workers=2, progress=False)
    uri = fresh_sqlite_store(work / "mlruns.db")
    overrides = soak_overrides(shards, work, uri, args.steps, args.checkpoint_every, args.image_every, args.kills)
    os.environ["VAEPIPE_FAULT_STEP_SLEEP"] = str(args.step_sleep)  # both runs' workers (the drivers inherit it)
    start_local_ray(num_cpus=4, log_to_driver=False)
    client = make_client(uri)
    try:
        t0 = time.time()
        ref = run_training(load_config(None, overrides + ["train.run_name=reference", "tracking.experiment=reference"]))
        ref_s = time.time() - t0
        reference = read_record(client, ref.run_id, ref.run_dir)
        soak = Soak(overrides + ["train.run_name=chaos", "tracking.experiment=chaos"], work / "runs" / "chaos",
                    args.kills, random.Random(args.seed), ray.get_runtime_context().gcs_address)
        chaos_s = soak.run(client, "chaos", args.steps, args.checkpoint_every)
        (run,) = client.search_runs([client.get_experiment_by_name("chaos").experiment_id])
        chaos = read_record(client, run.info.run_id, str(soak.run_dir))
        check_against_reference(reference, chaos)
    finally:
        ray.shutdown()
    workers = sum(k.what == "worker" for k in soak.events)
    print(f"[soak] passed: {args.steps} steps, {len(soak.events)} kills ({workers} workers, "
          f"{len(soak.events) - workers} drivers) in {chaos_s / 60:.1f} min (uninterrupted: {ref_s / 60:.1f} min); "
          f"kills at logged steps {[k.logged_step for k in soak.events]}; "
          f"{sum(len(v) for v in chaos.metric_steps.values())} metric values, {len(chaos.images)} images, "
          f"{len(chaos.model_steps)} LoggedModels, {len(chaos.checkpoint_steps)} checkpoints, each once", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

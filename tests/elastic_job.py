"""A training job on a simulated multi-node cluster (``ray.cluster_utils.Cluster``: a head without
CPUs and two 1-CPU worker nodes on loopback) that loses a node mid-run and later gets one back.

Run as a script by ``test_elastic.py`` (a Ray driver of its own, beside the test session's Ray):
``python tests/elastic_job.py <shards> <workdir>``; prints one JSON line with what happened.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _wait_for_commit(run_dir: Path, world: int, timeout: float = 300) -> None:
    from pipeline.train.checkpoint import commit_status, marker_of

    deadline = time.time() + timeout
    while time.time() < deadline:
        for d in run_dir.glob("checkpoint_*"):
            if commit_status(d)[0] and marker_of(d)["world_size"] == world:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no committed {world}-rank checkpoint in {run_dir}")


def _preemption_checkpoint(run_dir: Path, uri: str, timeout: float = 120) -> int:
    """The step of the just-in-time checkpoint once it is committed (its MLflow tag names it)."""
    from pipeline.tracking import make_client
    from pipeline.train.checkpoint import commit_status, marker_of

    client, deadline = make_client(uri), time.time() + timeout
    while time.time() < deadline:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        step = runs[0].data.tags.get("vaepipe.preemption_checkpoint_step") if runs else None
        if step is not None and any(commit_status(d)[0] and marker_of(d)["step"] == int(step)
                                    for d in run_dir.glob("checkpoint_*")):
            return int(step)
        time.sleep(0.5)
    raise TimeoutError(f"no just-in-time checkpoint committed in {run_dir} after the preemption notice")


def _chaos(cluster, workers: list, run_dir: Path, uri: str, events: list, returning: list) -> None:
    try:
        _wait_for_commit(run_dir, 2)
        # a spot reclaim: the node is announced (drained with a deadline), then it goes
        ray_cli = str(Path(sys.executable).with_name("ray"))
        subprocess.run([ray_cli, "drain-node", "--address", cluster.address, "--node-id", workers[0].node_id,
                        "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim (drill)",
                        "--deadline-remaining-seconds", "20"], check=True, capture_output=True)
        events.append(("preemption_notice", time.time()))
        events.append((f"preemption_checkpoint:{_preemption_checkpoint(run_dir, uri)}", time.time()))
        cluster.remove_node(workers[0], allow_graceful=False)  # the node is reclaimed
        events.append(("removed_node", time.time()))
        _wait_for_commit(run_dir, 1)  # the survivors trained on and checkpointed
        # resources come back: a node joins (Cluster.add_node only works from the main thread)
        returning.append(subprocess.Popen([ray_cli, "start", "--address", cluster.address, "--num-cpus", "1", "--block"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        events.append(("added_node", time.time()))
    except Exception as exc:  # reported in the JSON line; the test fails on it
        events.append((f"chaos failed: {type(exc).__name__}: {exc}", time.time()))


def main(shards: str, work: str) -> None:
    from ray.cluster_utils import Cluster

    from conftest import base_overrides
    from pipeline.config import load_config
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    work_dir = Path(work)
    # A lost node is declared dead after ~1 s of missed health checks instead of Ray's default
    # ~15 s, in which the controller would retry a 2-worker group that can no longer be placed
    # and spend dist.start_timeout_s on it, twice (measured: 30 s of the drill's 117).
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 2}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    os.environ["VAEPIPE_FAULT_STEP_SLEEP"] = "0.4"  # long enough for the node to go and come back
    os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "1"  # the drill announces the node's reclaim
    os.environ["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "0.5"
    cfg = load_config(None, base_overrides(shards, work_dir, **{
        "dist.address": cluster.address, "dist.num_workers": 2, "dist.min_workers": 1, "dist.resize_interval_s": 3, "dist.start_timeout_s": 15, "dist.start_retries": 6,
        "dist.max_failures": 3, "dist.preemption_check_every": 1, "train.max_steps": 60, "train.checkpoint_every": 4, "train.keep_checkpoints": 20,
        "train.log_every": 2, "train.val_every": 60, "train.image_every": 60, "train.run_name": "elastic",
        "tracking.log_model": False}))
    events: list = []
    returning: list = []
    chaos = threading.Thread(target=_chaos, args=(cluster, workers, work_dir / "runs" / "elastic", cfg.tracking.tracking_uri,
                                                  events, returning), daemon=True)
    chaos.start()
    result = run_training(cfg)
    client = make_client(result.tracking_uri)
    history = sorted(client.get_metric_history(result.run_id, "world_size"), key=lambda m: m.step)
    print(json.dumps({"step": result.metrics.get("step"), "events": [e for e, _ in events],
                      "world_sizes": [[m.step, m.value] for m in history],
                      "resumed_from": client.get_run(result.run_id).data.tags.get("vaepipe.resumed_from_step")}),
          flush=True)
    import ray

    ray.shutdown()  # the driver leaves before the cluster is taken down
    for proc in returning:
        proc.terminate()
        proc.wait(timeout=60)
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

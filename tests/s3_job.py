"""Training with its run folder on S3, on a simulated two-node cluster (``ray.cluster_utils.Cluster``:
a head without CPUs and two 1-CPU worker nodes on loopback, so the two workers are on two nodes
and share nothing but S3).

Run as a script by ``test_s3_end_to_end.py`` with the S3 endpoint and credentials in the
environment (every raylet it starts inherits them, as cluster nodes get them from theirs):
``python tests/s3_job.py <shards> <workdir> <tracking uri> <s3 storage url>``. Three runs:

1. ``first``: 2 workers, a worker exits at step 4, Ray restarts the group, which restores
   step 3's checkpoint from S3; ends at step 6 with the model logged.
2. ``--resume <s3 run folder of first>`` to step 9.
3. ``--resume <MLflow run id>`` (its ``vaepipe.run_dir`` tag now names run 2's folder) to step 12
   in local mode (one rank in this driver, whose disk holds nothing of the run either): the
   2-rank checkpoint is converted to a universal one, uploaded beside it.

Prints one JSON line with what each run reported.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _run(overrides: list[str], resume: str | None = None) -> dict:
    from pipeline.config import load_config
    from pipeline.tracking import make_client
    from pipeline.train.trainer import run_training

    result = run_training(load_config(None, overrides), resume=resume)
    tags = make_client(result.tracking_uri).get_run(result.run_id).data.tags
    return {"run_id": result.run_id, "step": result.metrics.get("step"), "run_dir": result.run_dir,
            "checkpoint": result.checkpoint_path, "resumed_from": tags.get("vaepipe.resumed_from_step"),
            "model_uri": result.model_uri}


def main(shards: str, work: str, tracking_uri: str, storage_url: str) -> None:
    from ray.cluster_utils import Cluster

    from conftest import base_overrides

    work_dir = Path(work)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    os.environ.update(VAEPIPE_FAULT_AT_STEP="4", VAEPIPE_FAULT_MARKER=str(work_dir / "fault.marker"))

    def overrides(**extra) -> list[str]:
        return base_overrides(shards, work_dir, tracking_uri=tracking_uri, **{
            "dist.address": cluster.address, "train.storage_path": storage_url, "train.checkpoint_every": 3,
            "train.log_every": 3, "train.val_every": 3, "train.image_every": 6, "train.keep_checkpoints": 3,
            "dist.max_failures": 1, "tracking.log_model": False, **extra})

    # run 1's drill exits a worker one step after the step-3 checkpoint and asserts that step 3 is
    # restored: its upload is synchronous, since an asynchronous one may still be in flight then (and
    # is then rightly never restored). Run 2 uploads asynchronously (auto, on S3); run 3 resumes from it.
    out = {"first": _run(overrides(**{"train.max_steps": 6, "train.run_name": "first", "tracking.log_model": True,
                                     "tracking.model_per_checkpoint": True, "tracking.keep_models": 1,
                                     "tracking.keep_best_models": 0,
                                     "train.checkpoint_upload": "sync"}))}
    out["by_url"] = _run(overrides(**{"train.max_steps": 9, "train.run_name": "by-url"}), resume=out["first"]["run_dir"])
    out["by_run_id"] = _run(overrides(**{"train.max_steps": 12, "train.run_name": "by-run-id", "dist.num_workers": 0}),
                            resume=out["first"]["run_id"])
    print(json.dumps(out), flush=True)
    import ray

    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""DeepSpeed's all-reduces through the shared-memory kernel: same training result as gloo, only
eligible calls routed (2 real gloo ranks, no Ray)."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks


def _train(rank: int, world: int, shm: bool, zero_stage: int, room_on_rank1: bool = True) -> dict:
    import os

    import torch

    from pipeline.train import local_allreduce
    from pipeline.train.timers import PhaseClock, activate, patch_collectives

    patch_collectives()  # as the worker does, before DeepSpeed's backend keeps its all-gather

    if rank == 1 and not room_on_rank1:
        local_allreduce.shm_room = lambda world: False  # as if this rank's /dev/shm were full
    if shm:
        shm = local_allreduce.prepare(world)
    import deepspeed

    from models import build_model
    from pipeline.config import load_config
    from pipeline.train.engine import build_deepspeed_config

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "data.batch_size=4",
                             f"dist.zero_stage={zero_stage}", "train.precision=fp32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=build_deepspeed_config(cfg, world, "fp32"))
    segment_made = os.path.exists(local_allreduce.segment_path(rank))
    routed = local_allreduce.install() if shm else False
    segment_left = os.path.exists(local_allreduce.segment_path(rank))
    clock = PhaseClock()
    activate(clock)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    for _ in range(3):
        with clock.phase("backward"):
            engine.backward(engine(x, beta=1.0, free_bits=0.0)["loss"])
        engine.step()
    activate(None)
    from deepspeed.comm import comm

    flag = torch.tensor([float(rank)])
    comm.all_reduce(flag, op=comm.ReduceOp.MAX)  # not SUM: must go to gloo and still be right
    ints = torch.tensor([rank + 1], dtype=torch.int64)
    comm.all_reduce(ints)  # a dtype the kernel would silently skip
    gathered, int_gathered = torch.full((12,), float("nan")), torch.empty(4, dtype=torch.int64)
    comm.all_gather_into_tensor(gathered, torch.arange(6.0) + 10 * rank)  # not a view of its slot
    comm.all_gather_into_tensor(int_gathered, torch.tensor([rank, -rank]))  # gloo's
    routed_gather = comm.cdb.all_gather_into_tensor.__qualname__.startswith("gather_route")
    timed_gather = hasattr(comm.cdb.all_gather_function, "__wrapped__")  # the gloo one, under the clock
    from pipeline.train.collectives import any_rank

    to_gloo, gloo_all_reduce = [], torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: to_gloo.append(1) or gloo_all_reduce(*a, **k)
    anys = [any_rank(rank == 1, torch.device("cpu")), any_rank(False, torch.device("cpu"))]
    torch.distributed.all_reduce = gloo_all_reduce
    from pipeline.train.export import gathered_state_dict

    return {"anys": anys, "any_on_gloo": len(to_gloo), "routed": routed, "segment_made": segment_made, "segment_left": segment_left,
            "local_size": os.environ.get("LOCAL_SIZE"), "weights": gathered_state_dict(engine.module), "max": float(flag), "ints": int(ints),
            "comm_s": clock.comm_in["backward"] + clock.comm_in["optimizer"],
            "gathered": gathered.tolist(), "int_gathered": int_gathered.tolist(), "routed_gather": routed_gather,
            "timed_gather": timed_gather}


def _no_room() -> bool:
    from pipeline.train.local_allreduce import shm_room

    return not shm_room(2)


def _gloo_rank(rank: int, world: int) -> dict:
    """Every configuration that keeps gloo, in one pair of processes (a spawn costs seconds). First
    the one where rank 1 lacks room: it asks for the kernel before DeepSpeed creates its comm
    backend, as in a process of its own; both ranks refuse it and nothing process-wide is installed
    (its fake ``shm_room`` is put back after). Then the plain gloo runs under ZeRO 0 and 2 on that
    backend. Each builds its own model from ``manual_seed(0)``.

    The shared-memory runs cannot join them, nor each other: the kernel is set up when DeepSpeed
    creates its comm backend, once per process and only if ``LOCAL_SIZE`` was set before it (the
    gloo runs' backend has none); ``install`` then reroutes that backend's collectives and the
    loop's ``any_rank`` for the rest of the process, and unlinks the rank's /dev/shm segment, so
    a second shm run in the process could not see its segment made."""
    from pipeline.train import local_allreduce

    real_room = local_allreduce.shm_room
    try:
        runs = {"no_room_on_rank1": _train(rank, world, True, 0, False)}
    finally:
        local_allreduce.shm_room = real_room
    return {**runs, **{("gloo", stage): _train(rank, world, False, stage) for stage in (0, 2)}}


@pytest.fixture(scope="module")
def gloo_runs() -> list[dict]:
    return run_ranks(_gloo_rank)


@pytest.mark.skipif(_no_room(), reason="this machine's /dev/shm cannot hold two 67 MiB segments (training keeps gloo here)")
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_shm_allreduce_trains_to_the_same_weights_as_gloo(gloo_runs, zero_stage):
    gloo = [r[("gloo", zero_stage)] for r in gloo_runs]
    shm = run_ranks(_train, args=(True, zero_stage))  # its own processes: see _gloo_rank
    assert shm[0]["routed"] and not gloo[0]["routed"]
    for k, v in gloo[0]["weights"].items():
        torch.testing.assert_close(shm[0]["weights"][k], v, rtol=1e-5, atol=1e-6)  # sum order may differ
        torch.testing.assert_close(shm[1]["weights"][k], shm[0]["weights"][k], rtol=0, atol=0)
    assert shm[0]["max"] == shm[1]["max"] == 1.0 and shm[0]["ints"] == 3
    # ZeRO's parameter all-gather as a zero-padded SUM: exact, and what gloo gives
    assert shm[0]["routed_gather"] and not gloo[0]["routed_gather"]
    assert all(r["timed_gather"] for r in gloo + shm)
    for r in shm + gloo:
        assert r["gathered"] == [float(v) for v in range(6)] + [float(v) for v in range(10, 16)]
        assert r["int_gathered"] == [0, 0, 1, -1]
    # the loop's finite-loss agreement: right either way, and through the kernel where installed
    assert all(r["anys"] == [True, False] for r in shm + gloo)
    assert all(r["any_on_gloo"] == 0 for r in shm) and all(r["any_on_gloo"] == 2 for r in gloo)
    assert shm[0]["comm_s"] > 0  # the kernel's time is counted as communication
    # each rank's 66 MiB workspace existed in /dev/shm, and its name is gone once all ranks mapped it
    assert all(r["segment_made"] and not r["segment_left"] for r in shm)
    assert not any(r["segment_made"] for r in gloo)


def test_ranks_agree_on_gloo_when_one_rank_lacks_room_in_dev_shm(gloo_runs):
    """Rank 1's /dev/shm is 'full': both ranks keep gloo (had only rank 0 taken the kernel, it
    would wait forever for rank 1's segment), no segment is made, and training still runs."""
    runs = [r["no_room_on_rank1"] for r in gloo_runs]
    assert [r["routed"] for r in runs] == [False, False] and all(r["local_size"] is None for r in runs)
    assert not any(r["segment_made"] for r in runs)
    for k, v in runs[0]["weights"].items():
        torch.testing.assert_close(runs[1]["weights"][k], v, rtol=0, atol=0)


def test_shm_room_counts_every_local_rank(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from pipeline.train import local_allreduce as la

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(0, 0, 2 * la.SEGMENT_BYTES + la.MARGIN_BYTES))
    assert la.shm_room(2, str(tmp_path)) and not la.shm_room(3, str(tmp_path))
    monkeypatch.undo()
    assert not la.shm_room(1, str(tmp_path / "no-such-dir"))  # no /dev/shm at all: gloo


def test_wanted_only_for_cpu_ranks_on_one_node():
    from pipeline.train.local_allreduce import wanted

    assert wanted(True, use_cuda=False, world=2, local_world=2)
    assert not wanted(True, use_cuda=False, world=4, local_world=2)  # two nodes
    assert not wanted(True, use_cuda=True, world=2, local_world=2)
    assert not wanted(True, use_cuda=False, world=1, local_world=1)
    assert not wanted(False, use_cuda=False, world=2, local_world=2)


def test_deepspeed_shm_op_is_compiled_at_install_not_jit_loaded(tmp_path):
    """``make install`` compiles DeepSpeed's shm comm op ahead of time, so a process loads it
    with no JIT build and no lock file in the extensions folder (a lock left by a killed process
    would make every later DeepSpeed start wait forever)."""
    import os
    import subprocess
    import sys

    code = ("from deepspeed.git_version_info import installed_ops; from deepspeed.comm.torch import build_shm_op; "
            "m = build_shm_op(); print('installed', bool(installed_ops.get('deepspeed_shm_comm')), m.__name__)")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "installed True deepspeed.ops.comm.deepspeed_shm_comm_op" in out.stdout, out.stdout[-2000:]
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing locked

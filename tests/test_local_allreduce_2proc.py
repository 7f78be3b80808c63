"""DeepSpeed's all-reduces through the shared-memory kernel: same training result as gloo, only
eligible calls routed (2 real gloo ranks, no Ray)."""

from __future__ import annotations

import pytest

from dist_helpers import run_ranks


def _train(rank: int, world: int, shm: bool, zero_stage: int) -> dict:
    import torch

    from pipeline.train import local_allreduce
    from pipeline.train.timers import PhaseClock, activate

    if shm:
        local_allreduce.prepare(world)
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
    routed = local_allreduce.install() if shm else False
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
    from pipeline.train.export import gathered_state_dict

    return {"routed": routed, "weights": gathered_state_dict(engine.module), "max": float(flag), "ints": int(ints),
            "comm_s": clock.comm_in["backward"] + clock.comm_in["optimizer"]}


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_shm_allreduce_trains_to_the_same_weights_as_gloo(zero_stage):
    import torch

    gloo = run_ranks(_train, args=(False, zero_stage))
    shm = run_ranks(_train, args=(True, zero_stage))
    assert shm[0]["routed"] and not gloo[0]["routed"]
    for k, v in gloo[0]["weights"].items():
        torch.testing.assert_close(shm[0]["weights"][k], v, rtol=1e-5, atol=1e-6)  # sum order may differ
        torch.testing.assert_close(shm[1]["weights"][k], shm[0]["weights"][k], rtol=0, atol=0)
    assert shm[0]["max"] == shm[1]["max"] == 1.0 and shm[0]["ints"] == 3
    assert shm[0]["comm_s"] > 0  # the kernel's time is counted as communication


def test_wanted_only_for_cpu_ranks_on_one_node():
    from pipeline.train.local_allreduce import wanted

    assert wanted(True, use_cuda=False, world=2, local_world=2)
    assert not wanted(True, use_cuda=False, world=4, local_world=2)  # two nodes
    assert not wanted(True, use_cuda=True, world=2, local_world=2)
    assert not wanted(True, use_cuda=False, world=1, local_world=1)
    assert not wanted(False, use_cuda=False, world=2, local_world=2)

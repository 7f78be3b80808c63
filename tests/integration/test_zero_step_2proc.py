"""The lean ZeRO-1/2 step (``pipeline.train.zero_step``): the same weights as DeepSpeed's own step,
one collective fewer, and a NaN on one rank still skips the step on both (2 real gloo ranks, no Ray)."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks


def _train(rank: int, world: int, lean: bool, zero_stage: int, precision: str, summed: bool = False,
           sized_bucket: bool = False) -> dict:
    import deepspeed
    from deepspeed.comm import comm

    from models import build_model
    from pipeline.config import load_config
    from pipeline.train import zero_step
    from pipeline.train.engine import backward_scale, build_deepspeed_config, input_dtype, size_reduce_bucket
    from pipeline.train.export import gathered_state_dict

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "data.batch_size=4", "optim.grad_clip=0.05",
                             f"dist.zero_stage={zero_stage}", f"train.precision={precision}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ds_config = build_deepspeed_config(cfg, world, precision, sum_gradients=summed)
    if sized_bucket:
        ds_config = size_reduce_bucket(ds_config, list(model.parameters()))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config)
    installed = zero_step.install(engine) if lean else False
    ops = []
    real = comm.cdb.all_reduce
    comm.cdb.all_reduce = lambda t, op=comm.ReduceOp.SUM, *a, **k: ops.append(str(op)) or real(t, op, *a, **k)
    norms, snapshots = [], []
    for step in range(5):
        x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 * step + rank))
        if step == 3 and rank == 1 and zero_stage > 0:  # without ZeRO the loop drops it (step.py)
            x[0, 0, 0, 0] = float("nan")  # one rank's gradient is poisoned
        engine.backward(engine(x.to(input_dtype(precision)), beta=1.0, free_bits=0.0)["loss"] * backward_scale(engine))
        if step == 0 and zero_stage == 0:  # without ZeRO the reduced gradients sit in .grad
            grads0 = [q.grad.clone() for q in engine.module.parameters()]
        ops_before = len(ops)
        engine.step()
        norms.append(float(engine.get_global_grad_norm() or 0.0))
        snapshots.append(gathered_state_dict(engine.module))
        if step == 0:
            step_ops = ops[ops_before:]
    comm.cdb.all_reduce = real
    return {"bucket": getattr(engine.optimizer, "reduce_bucket_size", None),
            "numel": sum(p.numel() for p in model.parameters()), "installed": installed, "scale": backward_scale(engine), "grads0": grads0 if zero_stage == 0 else None, "step_ops": step_ops, "norms": norms, "skipped": engine.skipped_steps,
            "before_nan": snapshots[2], "after_nan": snapshots[3], "final": snapshots[4]}


# (lean, zero_stage, precision, summed, sized_bucket): every configuration a test below compares,
# each trained once (one that two tests use is the same deterministic run for both)
CONFIGS = list(dict.fromkeys([
    *((lean, stage, "fp32", False, False) for stage in (1, 2) for lean in (False, True)),
    (False, 2, "bf16", False, False), (True, 2, "bf16", False, False),
    *((True, stage, "fp32", summed, False) for stage in (0, 2) for summed in (False, True)),
    *((True, stage, "fp32", False, True) for stage in (1, 2))]))


def _every_config(rank: int, world: int) -> dict:
    """All of them in one pair of processes (a spawn costs seconds). Each builds its own model
    (``manual_seed(0)``) and engine; ``_train`` puts back the all-reduce it wraps, and
    ``zero_step.install`` patches only its own engine's optimizer."""
    return {config: _train(rank, world, *config) for config in CONFIGS}


@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return run_ranks(_every_config, timeout=600.0)


def _runs(trained: list[dict], lean: bool, zero_stage: int, precision: str, summed: bool = False,
          sized_bucket: bool = False) -> list[dict]:
    """Both ranks' results of what ``_train(rank, world, lean, zero_stage, ...)`` returned."""
    return [r[(lean, zero_stage, precision, summed, sized_bucket)] for r in trained]


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_lean_step_trains_like_deepspeeds_in_fp32(trained, zero_stage):
    ds = _runs(trained, False, zero_stage, "fp32")
    lean = _runs(trained, True, zero_stage, "fp32")
    assert all(r["installed"] for r in lean) and not any(r["installed"] for r in ds)
    for k, v in ds[0]["final"].items():
        torch.testing.assert_close(lean[0]["final"][k], v, rtol=1e-5, atol=1e-6)  # fp32 vs fp64 norm sums
    _assert_same_norms(ds, lean)
    # under fp32 DeepSpeed has no separate overflow scan: the same collectives, the norm's SUM among them
    assert lean[0]["step_ops"] == ds[0]["step_ops"] and not any("MAX" in op for op in ds[0]["step_ops"])
    _assert_nan_step_skipped_on_both(lean)
    _assert_nan_step_skipped_on_both(ds)


def test_lean_step_drops_the_bf16_overflow_collective_and_still_skips_a_poisoned_step(trained):
    ds = _runs(trained, False, 2, "bf16")
    lean = _runs(trained, True, 2, "bf16")
    assert all(r["installed"] for r in lean)
    # DeepSpeed's bf16 step all-reduces a MAX overflow flag besides the norm's SUM; the lean one only the SUM
    assert any("MAX" in op for op in ds[0]["step_ops"]) and not any("MAX" in op for op in lean[0]["step_ops"])
    assert len(lean[0]["step_ops"]) == len(ds[0]["step_ops"]) - 1
    _assert_same_norms(ds, lean, rel=1e-4)
    for k, v in ds[0]["final"].items():  # bf16 weights from fp32 masters that differ in the last digits
        torch.testing.assert_close(lean[0]["final"][k].float(), v.float(), rtol=1e-2, atol=1e-3)
    _assert_nan_step_skipped_on_both(lean)
    _assert_nan_step_skipped_on_both(ds)


def _assert_same_norms(ds: list[dict], lean: list[dict], rel: float = 1e-5) -> None:
    finite = [(a, b) for a, b in zip(ds[0]["norms"], lean[0]["norms"]) if a not in (0.0, float("inf"))]
    assert len(finite) == 4 and all(a == pytest.approx(b, rel=rel) for a, b in finite)
    assert finite[0][0] > 0.05  # above optim.grad_clip: the clip engaged, so the norm's value mattered


def _assert_nan_step_skipped_on_both(ranks: list[dict]) -> None:
    for r in ranks:
        assert r["skipped"] == 1
        for k, v in r["before_nan"].items():  # the poisoned step changed nothing, on either rank
            assert torch.equal(r["after_nan"][k], v), k
            assert torch.isfinite(r["final"][k].float()).all(), k
    for k, v in ranks[0]["final"].items():
        assert torch.equal(ranks[1]["final"][k], v), k


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_summed_gradients_of_prescaled_losses_train_like_deepspeeds_mean(trained, zero_stage):
    """The loop's engines sum gradients over ranks and divide each loss by the world size first:
    the same weights as DeepSpeed dividing the summed gradients, without its pass over them."""
    mean = _runs(trained, True, zero_stage, "fp32", False)
    summed = _runs(trained, True, zero_stage, "fp32", True)
    assert mean[0]["scale"] == 1.0 and summed[0]["scale"] == 0.5
    for k, v in mean[0]["final"].items():
        torch.testing.assert_close(summed[0]["final"][k], v, rtol=1e-5, atol=1e-6)
    if zero_stage == 0:  # Adam and the clip would hide a gradient off by the world size: compare them
        for a, b in zip(mean[0]["grads0"], summed[0]["grads0"]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    if zero_stage:  # a ZeRO optimizer: it reports the norm and skips a poisoned step
        _assert_same_norms(mean, summed)
        _assert_nan_step_skipped_on_both(summed)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_a_bucket_the_size_of_the_model_trains_to_the_same_weights(trained, zero_stage):
    default = _runs(trained, True, zero_stage, "fp32")
    sized = _runs(trained, True, zero_stage, "fp32", False, True)
    assert default[0]["bucket"] == 500_000_000 and sized[0]["bucket"] == sized[0]["numel"]  # 2 MB, not 2 GB
    for k, v in default[0]["final"].items():
        assert torch.equal(sized[0]["final"][k], v), k  # the same gradients, reduced in the same one call
    assert sized[0]["skipped"] == default[0]["skipped"] == 1  # the poisoned step is still skipped

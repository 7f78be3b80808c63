"""Collectives on two real processes (gloo, loopback): what a fake reducer or one process
cannot show. The VQ-VAE's codebook statistics are summed over ranks; a NaN on one rank skips
the step on both (nobody hangs in backward); ZeRO-3 really partitions the parameters."""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks

pytestmark = pytest.mark.integration


def _vq_rank(rank: int, world: int) -> dict:
    from models.vqvae import VectorQuantizer
    from pipeline.train.collectives import sum_over_ranks

    torch.manual_seed(0)
    q = VectorQuantizer(8, 4, ema_decay=0.5, dead_code_threshold=0.0)
    q.stat_reducer = sum_over_ranks
    flat = torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(1))[rank]  # each rank its own half
    q.train()(flat.view(1, 4, 10, 4).permute(0, 3, 1, 2).contiguous())
    return {"codebook": q.codebook.clone(), "size": q.ema_cluster_size.clone()}


def _every_case(rank: int, world: int) -> dict:
    """Every test's ranks in one pair of processes (a spawn costs seconds), in the order the tests
    run. Each case seeds torch itself and builds its own quantizer or engine."""
    return {"vq": _vq_rank(rank, world), "finite": _finite_agreement_rank(rank, world),
            "z0": _partition_rank(rank, world, 0), "z3": _partition_rank(rank, world, 3)}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_ranks(_every_case)


def test_vq_statistics_summed_over_two_ranks_equal_one_process_on_both_halves(runs):
    from models.vqvae import VectorQuantizer

    ranks = [r["vq"] for r in runs]
    torch.manual_seed(0)
    single = VectorQuantizer(8, 4, ema_decay=0.5, dead_code_threshold=0.0)
    both = torch.randn(2, 40, 4, generator=torch.Generator().manual_seed(1)).reshape(80, 4)
    single.train()(both.view(1, 8, 10, 4).permute(0, 3, 1, 2).contiguous())
    for r in ranks:
        torch.testing.assert_close(r["codebook"], single.codebook, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["size"], single.ema_cluster_size)
    assert not torch.equal(single.codebook, VectorQuantizer(8, 4).codebook)  # the update did move it


def _engine(zero_stage: int, world: int):
    import deepspeed

    from models import build_model
    from pipeline.config import load_config
    from pipeline.train.engine import build_deepspeed_config

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "data.batch_size=4",
                             f"dist.zero_stage={zero_stage}", f"dist.num_workers={world}", "train.precision=fp32"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                      config=build_deepspeed_config(cfg, world, "fp32"))
    return cfg, engine, total


def _finite_agreement_rank(rank: int, world: int) -> dict:
    from types import SimpleNamespace

    from pipeline.train.export import gathered_state_dict
    from pipeline.train.step import train_step
    from pipeline.train.worker import TrainState

    cfg, engine, _ = _engine(2, world)
    w = SimpleNamespace(cfg=cfg, engine=engine, state=TrainState(), device=torch.device("cpu"), precision="fp32",
                        aux=None, stream=SimpleNamespace(steps_per_epoch=10))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(rank))
    before = gathered_state_dict(engine.module)
    bad = x.clone()
    if rank == 1:
        bad[0, 0, 0, 0] = float("nan")  # only rank 1 sees a non-finite loss
    skipped = train_step(w, {"image": bad})
    after_skip = gathered_state_dict(engine.module)
    stepped = train_step(w, {"image": x})
    after_step = gathered_state_dict(engine.module)
    unchanged = all(torch.equal(before[k], after_skip[k]) for k in before)
    moved = any(not torch.equal(after_skip[k], after_step[k]) for k in before)
    return {"skipped": skipped["skipped"], "stepped": stepped["skipped"], "unchanged": unchanged, "moved": moved,
            "weights": after_step}


def test_nan_on_one_rank_skips_the_step_on_both_and_both_step_next(runs):
    r0, r1 = (r["finite"] for r in runs)
    assert r0["skipped"] == r1["skipped"] == 1.0  # rank 0's loss was finite, it skipped too
    assert r0["unchanged"] and r1["unchanged"]
    assert r0["stepped"] == r1["stepped"] == 0.0 and r0["moved"] and r1["moved"]
    for k in r0["weights"]:
        torch.testing.assert_close(r0["weights"][k], r1["weights"][k], rtol=0, atol=0)  # ranks stay identical


def _partition_rank(rank: int, world: int, zero_stage: int) -> dict:
    from pipeline.train.export import gathered_state_dict

    _, engine, total = _engine(zero_stage, world)
    params = list(engine.module.parameters())
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
    full = gathered_state_dict(engine.module)
    return {"held": held, "total": total, "full_numel": sum(v.numel() for k, v in full.items()
                                                           if k in dict(engine.module.named_parameters()))}


def test_zero3_holds_about_half_the_parameters_per_rank_and_gathers_them_all(runs):
    z0 = [r["z0"] for r in runs]
    z3 = [r["z3"] for r in runs]
    total = z0[0]["total"]
    assert all(r["held"] == total for r in z0)  # stage 0 replicates
    for r in z3:
        assert 0.45 * total <= r["held"] <= 0.55 * total + 64 * len(z3), (r["held"], total)
        assert r["full_numel"] == total  # gathered weights are the whole model
    assert sum(r["held"] for r in z3) >= total

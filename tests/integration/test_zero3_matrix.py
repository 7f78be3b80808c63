"""Every family under ZeRO-3 on two real ranks (gloo, loopback), through the real training path.

Image logging, sampling and export call ``module.reconstruct`` / ``module.sample`` outside
``engine.forward``, and some families read parameters outside the forward of the module that
owns them (MoG prior's logits/means/scales, the ladder's ``h_top``, conv skip gates, the VQ
codebook). ZeRO-3 gathers a parameter only inside its owner's forward, so such reads would see
an empty partition. Each case builds its model as the worker does, runs two real train steps,
validation and the image grids, exports, and records what every rank saw.

All cases run inside ONE pair of processes (a spawn costs seconds); each case has its own
engine and its failure is caught per case, so one broken family does not hide the others.
"""

from __future__ import annotations

import pytest
import torch

from dist_helpers import run_ranks

pytestmark = pytest.mark.integration

GRID = 2  # tracking.image_grid_size: GRID*GRID samples, GRID*GRID//2 reconstructions
BATCH = 4

CASES = {
    **{f"conv_vae-{prior}-skip{int(skip)}": ["model.name=conv_vae", f"model.prior={prior}",
                                            f"model.skip_connections={str(skip).lower()}"]
       for prior in ("normal", "made", "mog") for skip in (False, True)},
    "factor_vae": ["model.name=factor_vae"],
    "ladder_vae-precision": ["model.name=ladder_vae", "model.ladder.merge=precision"],
    "ladder_vae-residual": ["model.name=ladder_vae", "model.ladder.merge=residual"],
    "vqvae": ["model.name=vqvae"],
    "vqvae-grad_codebook": ["model.name=vqvae", "model.vq.update=grad"],  # codebook is a parameter
    "vq_prior": ["model.name=vq_prior"],
}


class FakeStream:
    """``iter_eval`` as ShardStream has it: this rank's own validation batches."""

    steps_per_epoch = 10

    def __init__(self, rank: int):
        self.rank = rank

    def iter_eval(self, split: str, max_batches: int):
        for i in range(max_batches):
            yield {"image": _images(100 + 10 * self.rank + i)}


class RecordingLogger:
    """RankZeroLogger's surface; records every call (on every rank, so rank 1 must stay empty)."""

    run_id = "fake-run"

    def __init__(self):
        self.calls: dict[str, list] = {"metrics": [], "tags": [], "image": [], "figure": []}

    def metrics(self, values, step):
        self.calls["metrics"].append((dict(values), step))

    def tags(self, values):
        self.calls["tags"].append(dict(values))

    def image(self, array, key, step):
        self.calls["image"].append((key, step, array.shape))

    def figure(self, fig, key, step):
        self.calls["figure"].append((key, step))

    def flush(self):
        pass


def _images(seed: int) -> torch.Tensor:
    return torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _config(overrides: list[str], world: int, parent_config: dict | None):
    from dataclasses import replace

    from pipeline.config import load_config

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", f"data.batch_size={BATCH}",
                             "dist.zero_stage=3", f"dist.num_workers={world}", "train.precision=fp32",
                             f"tracking.image_grid_size={GRID}", "data.val_batches=2", *overrides])
    if cfg.model.name == "vq_prior":  # what trainer.attach_parent fills in from model.ar.parent_uri
        cfg = replace(cfg, model=replace(cfg.model, ar=replace(cfg.model.ar, parent_config=parent_config)))
    return cfg


def _debug_vqvae_parent() -> tuple[dict, dict]:
    """A trained-elsewhere stand-in: a debug VQ-VAE's config and weights (identical on all ranks)."""
    from models import build_model
    from pipeline.config import load_config

    torch.manual_seed(123)
    parent = build_model(load_config(None, ["model.name=vqvae", "model.flavor=debug", "data.resolution=32"]).model)
    return {"name": "vqvae", **parent.config}, {k: v.clone() for k, v in parent.state_dict().items()}


def _record_outputs(module, seen: list) -> None:
    """Wrap reconstruct/sample on the instance so every rank's outputs are kept (rank 1 logs nothing)."""
    for name in ("reconstruct", "sample"):
        original = getattr(module, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            seen.append((_name, out.detach().float().cpu().clone()))
            return out

        setattr(module, name, wrapper)


def _full_weights(module, parent_state: dict | None) -> dict:
    """Full weights not through GatheredParameters: the optimizer's fp32 copy of each trainable
    parameter, the loaded parent weights for frozen ones, buffers as they are (never partitioned)."""
    from deepspeed.utils import safe_get_full_fp32_param

    full = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            full[name] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        else:
            full[name] = parent_state[name.removeprefix("parent.")].float()
    persistent = set(module.state_dict().keys())  # non-persistent buffers (MADE/PixelCNN masks) are not exported
    for name, b in module.named_buffers():
        if name not in persistent:
            continue
        full[name] = b.detach().cpu().clone() if not b.is_floating_point() else b.detach().float().cpu().clone()
    return full


def _build_worker(rank: int, world: int, overrides: list[str], parent: tuple[dict, dict]):
    """What build_worker does, minus Ray and the shard stream: (worker, initial weights, parent state)."""
    from types import SimpleNamespace

    import deepspeed

    from models import objective_name
    from pipeline.train.engine import build_deepspeed_config
    from pipeline.train.worker import TrainState, build_rank_modules

    cfg = _config(overrides, world, parent[0])
    parent_state = parent[1] if cfg.model.name == "vq_prior" else None
    device = torch.device("cpu")
    # build_model_for_rank + AuxiliaryTrainer.for_model + seed_rank, as build_worker does: the
    # ranks' RNGs differ from here, so equal samples below come from log_images's fixed seed
    model, aux = build_rank_modules(cfg, {"parent_state": parent_state}, rank, device)
    built = _partition_facts(model)
    init = _gathered_trainable(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable,
                                      config=build_deepspeed_config(cfg, world, "fp32"))
    w = SimpleNamespace(cfg=cfg, engine=engine, stream=FakeStream(rank), state=TrainState(), log=RecordingLogger(),
                        device=device, rank=rank, world_size=world, precision="fp32", aux=aux,
                        objective=objective_name(cfg.model), last_kl_dims=None, last_val={})
    return w, init, parent_state, built


def _partition_facts(model) -> dict:
    """What this rank holds right after build_rank_modules (built under zero.Init: a partition)."""
    from pipeline.train.zero_init import is_partitioned, rank_parameter_elements

    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    return {"partitioned": is_partitioned(model), "held": rank_parameter_elements(model), "total": total,
            "tensors": len(list(model.parameters()))}


def _gathered_trainable(model) -> dict:
    """The initial trainable weights, gathered from their ZeRO-3 partitions (same on every rank)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def _run_case(rank: int, world: int, overrides: list[str], parent: tuple[dict, dict]) -> dict:
    from pipeline.train.export import gathered_state_dict
    from pipeline.train.observe import log_images, validate
    from pipeline.train.step import train_step

    w, init, parent_state, built = _build_worker(rank, world, overrides, parent)
    seen: list = []
    _record_outputs(w.engine.module, seen)
    outs = []
    for step in (1, 2):  # as loop.after_step: images right after a step, then validation + images
        outs.append(train_step(w, {"image": _images(10 * rank + step)}))
        w.state.step, w.last_kl_dims = step, outs[-1]["kl_per_dim"]
        if step == 2:
            validate(w)
        log_images(w, {"image": _images(7)})  # the same batch on every rank: reconstructions must agree
    exported = gathered_state_dict(w.engine.module)
    full = _full_weights(w.engine.module, parent_state)
    return {
        "losses": [o.get("loss", float("nan")) for o in outs], "skipped": [o["skipped"] for o in outs],
        "val": w.log.calls["metrics"][-1][0], "images": w.log.calls["image"], "seen": seen,
        "exported": exported, "full": full, "built": built, "init": init,
        "unmoved": [k for k, v in init.items() if torch.equal(v, full[k])],
    }


def _matrix_rank(rank: int, world: int) -> dict:
    import traceback
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    parent = _debug_vqvae_parent()
    results = {}
    from pipeline.train.collectives import any_rank

    for name, overrides in CASES.items():
        try:
            results[name] = _run_case(rank, world, overrides, parent)
        except Exception:  # reported per case
            results[name] = {"error": traceback.format_exc()}
        # a rank that failed (e.g. in rank-0-only logging) must not start the next case while the
        # other one is still in this one: agree after every case, stop together on any error
        if any_rank("error" in results[name], torch.device("cpu")):
            break
    return results


@pytest.fixture(scope="module")
def matrix():
    return run_ranks(_matrix_rank, timeout=600.0)


@pytest.mark.parametrize("case", list(CASES))
def test_family_trains_observes_and_exports_under_zero3(matrix, case):
    r0, r1 = matrix[0][case], matrix[1][case]
    for rank, r in enumerate((r0, r1)):
        assert "error" not in r, f"rank {rank}:\n{r['error']}"
    for r in (r0, r1):
        assert r["skipped"] == [0.0, 0.0]
        assert all(torch.isfinite(torch.tensor(r["losses"]))), r["losses"]
    # validation: finite and identical on both ranks (all-reduced)
    assert r0["val"].keys() == r1["val"].keys() and "val_loss" in r0["val"]
    for k, v in r0["val"].items():
        assert torch.isfinite(torch.tensor(v)), (k, v)
        assert v == r1["val"][k], (k, v, r1["val"][k])
    # images (after step 1 straight from training, after step 2 after validation): rank 0 logs
    # two grids of GRID x GRID tiles of 32 px (1 px padding) each time, rank 1 none
    side = GRID * 33 + 1
    grids = [(key, step, shape) for key, step, shape in r0["images"] if key in ("reconstructions", "samples")]
    assert grids == [(key, step, (side, side, 3)) for step in (1, 2) for key in ("reconstructions", "samples")]
    assert all(step in (1, 2) for _, step, _ in r0["images"])  # traversals too, where the family has them
    assert r1["images"] == []
    expected = {"reconstruct": (GRID * GRID // 2, 3, 32, 32), "sample": (GRID * GRID, 3, 32, 32)}
    for r in (r0, r1):  # every rank computes (the gather is collective), only rank 0 writes
        assert [name for name, _ in r["seen"]] == ["reconstruct", "sample"] * 2
    for (name, mine), (_, theirs) in zip(r0["seen"], r1["seen"]):
        assert mine.shape == expected[name]
        assert torch.isfinite(mine).all(), name
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
    # export: the gathered state dict is the whole model, equal to the weights read another way
    for r in (r0, r1):
        assert r["exported"].keys() == r["full"].keys()
        for k in r["full"]:
            torch.testing.assert_close(r["exported"][k], r["full"][k], rtol=0, atol=0, msg=k)
            torch.testing.assert_close(r["exported"][k], r0["exported"][k], rtol=0, atol=0, msg=k)
        assert r["unmoved"] == [], f"trainable parameters that never moved: {r['unmoved']}"
    # built under zero.Init: no rank ever held the whole model, the halves add up to it, and
    # both ranks started from the same weights (the shared seed, then rank 0's broadcast)
    for r in (r0, r1):
        assert r["built"]["partitioned"]
        assert r["built"]["held"] <= r["built"]["total"] // 2 + r["built"]["tensors"]  # + padding to even sizes
    assert r0["built"]["held"] + r1["built"]["held"] >= r0["built"]["total"]
    assert r0["init"].keys() == r1["init"].keys()
    for k in r0["init"]:
        torch.testing.assert_close(r0["init"][k], r1["init"][k], rtol=0, atol=0, msg=k)

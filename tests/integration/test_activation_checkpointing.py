"""Activation checkpointing: every conv block is recomputed, and nothing but memory changes.

vaepipe ships torch's *non-reentrant* checkpoint (``pipeline.train.activation``), not
DeepSpeed's ``deepspeed.checkpointing.checkpoint`` nor torch's reentrant one. Where the others
and frozen parameters interact badly (documented in ``pipeline/train/activation.py``):

- reentrant checkpointing (torch's ``use_reentrant=True`` and DeepSpeed's, an autograd Function
  of the same kind) gives a block's output ``requires_grad`` only when an *input* requires it:
  behind a frozen block (progressive growing freezes earlier blocks) the next block's weights get
  no gradient at all, silently. Shown below.
- non-reentrant checkpointing under ZeRO-3 with frozen parameters *inside* a checkpointed block
  crashed in DeepSpeed < 0.19.8's releases (the recompute re-partitioned the frozen weights that
  torch's checkpoint still referenced: "Recomputed values ... have different metadata",
  deepspeedai/DeepSpeed#8148). The 2-rank test runs exactly that case on the pinned DeepSpeed.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from dist_helpers import run_ranks

CONV_FAMILIES = ["conv_vae", "factor_vae", "ladder_vae", "vqvae"]


def _model(name: str, resolution: int, **over):
    from models import build_model
    from pipeline.config import load_config

    extra = [f"{k}={v}" for k, v in over.items()]
    cfg = load_config(None, [f"model.name={name}", "model.flavor=debug", f"data.resolution={resolution}", *extra])
    torch.manual_seed(0)
    return build_model(cfg.model)


@pytest.mark.parametrize("resolution", [32, 64])
@pytest.mark.parametrize("name", CONV_FAMILIES)
def test_every_conv_layer_sits_in_a_checkpointed_block(name, resolution):
    """64 px adds the BatchNorm blocks; each conv of the encoder and decoder is recomputed."""
    from pipeline.train.activation import apply_activation_checkpointing

    model = _model(name, resolution)
    inside = {id(m) for blocks in model.checkpoint_blocks() for block in blocks for m in block.modules()}
    convs = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    outside = [n for n, m in model.named_modules() if n in convs and id(m) not in inside]
    assert convs and outside == []
    assert apply_activation_checkpointing(model) == sum(len(b) for b in model.checkpoint_blocks())


def test_reentrant_checkpointing_drops_the_gradients_behind_a_frozen_block():
    """Why vaepipe ships non-reentrant checkpointing: block 0 frozen, block 1 checkpointed."""
    from pipeline.train.activation import apply_activation_checkpointing

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grads = {}
    for how in ("plain", "reentrant", "shipped"):
        model = _model("conv_vae", 32)
        model.encoder_blocks[0].requires_grad_(False)
        if how == "reentrant":
            block = model.encoder_blocks[1]
            block.forward = functools.partial(checkpoint, block.forward, use_reentrant=True)
        elif how == "shipped":
            apply_activation_checkpointing(model)
        torch.manual_seed(2)
        model(x)["loss"].backward()
        grads[how] = [p.grad for p in model.encoder_blocks[1].parameters()]
    assert all(g is None for g in grads["reentrant"])  # silently untrained
    for mine, ref in zip(grads["shipped"], grads["plain"]):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


CASES = {  # name -> (family, resolution, freeze the first encoder and decoder blocks)
    "conv_vae-64": ("conv_vae", 64, False),
    "ladder_vae": ("ladder_vae", 32, False),
    "vqvae": ("vqvae", 32, False),
    "conv_vae-frozen": ("conv_vae", 32, True),
}


def _loss_and_grads(rank: int, world: int, family: str, resolution: int, frozen: bool, ckpt: bool) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from pipeline.config import load_config
    from pipeline.train.engine import build_deepspeed_config
    from pipeline.train.worker import build_model_for_rank

    cfg = load_config(None, [f"model.name={family}", "model.flavor=debug", f"data.resolution={resolution}",
                             "data.batch_size=2", "dist.zero_stage=3", f"dist.num_workers={world}",
                             "train.precision=fp32", f"train.activation_checkpointing={str(ckpt).lower()}"])
    ds_config = build_deepspeed_config(cfg, world, "fp32")
    model = build_model_for_rank(cfg, {}, ds_config)
    if frozen:
        model.encoder_blocks[0].requires_grad_(False)
        model.decoder_blocks[0].requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    x = torch.rand(2, 3, resolution, resolution, generator=torch.Generator().manual_seed(10 + rank))
    torch.manual_seed(20 + rank)  # the reparameterisation noise, equal in both runs
    loss = engine(x)["loss"]
    engine.backward(loss)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    return {"loss": loss.item(), "grads": grads}


def _all_cases(rank: int, world: int) -> dict:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    return {name: [_loss_and_grads(rank, world, *case, ckpt) for ckpt in (False, True)]
            for name, case in CASES.items()}


@pytest.fixture(scope="module")
def zero3_runs():
    return run_ranks(_all_cases, timeout=600.0)


@pytest.mark.integration
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointing_under_zero3_changes_neither_loss_nor_gradients(zero3_runs, case):
    """Two ranks, ZeRO-3 (model built under zero.Init), fp32: loss and every (all-reduced, gathered)
    gradient with checkpointing equal the run without it to 1e-5."""
    for rank in (0, 1):
        plain, ckpt = zero3_runs[rank][case]
        assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5)
        assert plain["grads"].keys() == ckpt["grads"].keys() and plain["grads"]
        for name, ref in plain["grads"].items():
            torch.testing.assert_close(ckpt["grads"][name], ref, rtol=1e-5, atol=1e-6, msg=name)
            assert ref.abs().sum() > 0 or "skip" in name, f"{name} got no gradient"
    if CASES[case][2]:
        assert not any(n.startswith(("encoder_blocks.0.", "decoder_blocks.0.")) for n in zero3_runs[0][case][0]["grads"])

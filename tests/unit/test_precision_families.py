"""Models run with bf16 weights (what precision=auto gives on AMX CPUs and Ampere+ GPUs):
sampling and reconstruction used to draw float32 latents into a bf16 decoder and fail. Every
family's debug flavor is checked in tests/unit/test_family_contract.py; here the conv VAE's options
and the BatchNorm blocks at 64 px."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from model_helpers import like_deepspeed_bf16
from pipeline.config import load_config



# Every family's plain debug flavor is cast the same way in tests/unit/test_family_contract.py; these
# are the conv VAE's options that change its sampling and loss paths.
CASES = [
    ["model.name=conv_vae", "model.prior=made"], ["model.name=conv_vae", "model.prior=mog"],
    ["model.name=conv_vae", "model.skip_connections=true"],
]


@pytest.mark.parametrize("extra", CASES, ids=lambda e: "-".join(v.split("=")[1] for v in e))
def test_bf16_model_samples_reconstructs_and_trains(extra):
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", *extra])
    torch.manual_seed(0)
    model = like_deepspeed_bf16(build_model(cfg.model))
    x = torch.rand(4, 3, 32, 32).to(torch.bfloat16)
    out = model(x)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) > len(list(model.parameters())) // 2  # gradients reach most of the model
    assert all(torch.isfinite(g.float()).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    model.eval()
    samples, recon = model.sample(3), model.reconstruct(x)
    assert samples.shape == (3, 3, 32, 32) and recon.shape == x.shape
    assert samples.dtype == torch.bfloat16 and torch.isfinite(samples.float()).all()
    assert float(samples.float().min()) >= 0.0 and float(samples.float().max()) <= 1.0


@pytest.mark.parametrize("name", ["conv_vae", "ladder_vae"])
def test_batchnorm_blocks_train_in_bf16_once_their_statistics_follow(name):
    """At 64 px the families add BatchNorm blocks; their fp32 running statistics beside bf16
    weights stopped the quickstart job on this AMX CPU until the worker cast them too."""
    from pipeline.train.engine import match_norm_buffers

    cfg = load_config(None, [f"model.name={name}", "model.flavor=debug", "data.resolution=64"])
    x = torch.rand(2, 3, 64, 64).to(torch.bfloat16)
    broken = like_deepspeed_bf16(build_model(cfg.model))
    with pytest.raises(RuntimeError, match="expected scalar type BFloat16|same dtype|should be the same"):
        broken(x)
    model = like_deepspeed_bf16(build_model(cfg.model))
    assert match_norm_buffers(model, "bf16") > 0
    out = model(x)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    model.eval()
    assert model.sample(2).shape == (2, 3, 64, 64) and model.reconstruct(x).shape == x.shape

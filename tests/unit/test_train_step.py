"""The train step's decisions, without Ray: a non-finite loss is skipped before backward,
a non-finite gradient is dropped without ZeRO, and activation checkpointing leaves the
model's results and parameter names unchanged."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from models import build_model
from pipeline.config import load_config
from pipeline.train.activation import apply_activation_checkpointing
from pipeline.train.step import drop_nonfinite_grads, train_step
from pipeline.train.worker import TrainState


class RecordingEngine:
    """The slice of a DeepSpeed engine that train_step touches, recording the calls."""

    def __init__(self, model, loss_value=None):
        self.module, self.loss_value, self.calls = model, loss_value, []

    def __call__(self, x, **kw):
        out = self.module(x, **kw)
        if self.loss_value is not None:
            out["loss"] = out["loss"] * 0 + self.loss_value
        return out

    def backward(self, loss):
        self.calls.append("backward")
        loss.backward()

    def step(self):
        self.calls.append("step")

    def is_gradient_accumulation_boundary(self):
        return True


def _worker(loss_value=None, zero_stage=2):
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", f"dist.zero_stage={zero_stage}"])
    torch.manual_seed(0)
    engine = RecordingEngine(build_model(cfg.model), loss_value)
    return SimpleNamespace(cfg=cfg, engine=engine, state=TrainState(), device=torch.device("cpu"), precision="fp32",
                           aux=None, stream=SimpleNamespace(steps_per_epoch=10))


def test_nonfinite_loss_skips_backward_and_step():
    w = _worker(loss_value=float("nan"))
    out = train_step(w, {"image": torch.rand(4, 3, 32, 32)})
    assert out["skipped"] == 1.0 and w.engine.calls == []


def test_finite_loss_runs_backward_then_step():
    w = _worker()
    out = train_step(w, {"image": torch.rand(4, 3, 32, 32)})
    assert out["skipped"] == 0.0 and w.engine.calls == ["backward", "step"]
    assert torch.isfinite(out["loss"]) and out["kl_per_dim"].shape == (8,)


def test_nonfinite_gradient_is_dropped_without_zero():
    w = _worker(zero_stage=0)
    w.engine.module(torch.rand(2, 3, 32, 32))["loss"].backward()
    next(w.engine.module.parameters()).grad[0] = float("inf")
    drop_nonfinite_grads(w)
    assert all(p.grad is None for p in w.engine.module.parameters())
    assert w.state.skipped_steps == 1


def test_activation_checkpointing_same_loss_grads_and_names():
    cfg = load_config(None, ["model.flavor=debug", "data.resolution=64"])
    x = torch.rand(4, 3, 64, 64)
    results = []
    for wrap in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model)
        if wrap:
            assert apply_activation_checkpointing(model) == sum(len(b) for b in model.checkpoint_blocks())
        torch.manual_seed(1)
        loss = model(x)["loss"]
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, list(model.state_dict())))
    (l0, g0, k0), (l1, g1, k1) = results
    assert l0 == l1 and k0 == k1
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-5, atol=1e-6)

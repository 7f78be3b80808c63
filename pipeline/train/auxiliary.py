"""Second optimizers that a model family declares (Factor-VAE's TC discriminator).

One DeepSpeed engine trains the VAE; the auxiliary network gets a plain torch Adam with its
gradients all-reduced here. Why not a second engine: the discriminator is a small MLP on the
latent codes, so ZeRO partitioning saves nothing, while a second engine would double the
ZeRO bookkeeping, the checkpoint format and the mixed-precision handling for no gain. It
stays in fp32 whatever the VAE's precision.

Order per micro-batch (the family documents it): VAE forward with ``aux`` -> VAE backward
and step -> zero the auxiliary grads (the VAE backward left some in it) -> auxiliary loss
on detached codes -> all-reduce -> auxiliary step.
"""

from __future__ import annotations

from typing import Optional

import torch

from pipeline.train.collectives import any_rank


class AuxiliaryTrainer:
    def __init__(self, module: torch.nn.Module, optim_args: dict, device: torch.device):
        self.module = module.to(device)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=optim_args["lr"], betas=tuple(optim_args["betas"]))
        self._broadcast_from_rank0()

    @classmethod
    def for_model(cls, model: torch.nn.Module, device: torch.device) -> Optional["AuxiliaryTrainer"]:
        """The family's auxiliary trainer, or None when it declares no ``build_auxiliary``."""
        if not hasattr(model, "build_auxiliary"):
            return None
        return cls(model.build_auxiliary(), model.auxiliary_optim(), device)

    def _broadcast_from_rank0(self) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            for p in self.module.parameters():
                dist.broadcast(p.data, src=0)

    def step(self, model: torch.nn.Module, out: dict) -> dict[str, float]:
        """One auxiliary update from the VAE's forward output; returns its metrics.

        ``disc_skipped`` is 1.0 when the update was skipped: a non-finite loss on any rank, or a
        non-finite all-reduced gradient. The loss check is agreed over ranks *before* the
        gradient all-reduce, as the main step does, or one rank's NaN would leave the others
        waiting in that all-reduce forever. Skipped steps report no loss/accuracy (they would
        be NaN), so a log window averages the updates that happened.
        """
        self.optimizer.zero_grad(set_to_none=True)
        loss, metrics = model.auxiliary_loss(self.module, out)
        device = next(self.module.parameters()).device
        if any_rank(not torch.isfinite(loss).item(), device):
            return {"disc_skipped": 1.0}
        loss.backward()
        if not self._all_reduce_grads():
            self.optimizer.zero_grad(set_to_none=True)
            return {"disc_skipped": 1.0}
        self.optimizer.step()
        return {**{k: float(v) for k, v in metrics.items()}, "disc_skipped": 0.0}

    def _all_reduce_grads(self) -> bool:
        """Average the gradients over ranks; False when the average is not finite.

        After the all-reduce every rank holds the same gradient, so every rank decides alike.
        """
        import torch.distributed as dist

        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
        for g, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(synced)
        return bool(torch.isfinite(flat).all())

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])

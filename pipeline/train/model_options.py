"""What the config applies to a built model from outside, before its engine is made: activation
checkpointing (``train/activation.py``) and channels-last convolutions (``train/memory_format.py``).
A rank's model (``worker.build_model_for_rank``) and each progressive stage's model
(``growth.build_stage_model``) both go through here, so an option is added in one place."""

from __future__ import annotations

import torch

from pipeline.train.activation import apply_activation_checkpointing
from pipeline.train.memory_format import apply_channels_last


def apply_model_options(model: torch.nn.Module, train) -> None:
    """``train``: the config's ``TrainConfig``."""
    if train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if train.channels_last:
        apply_channels_last(model)

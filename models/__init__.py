"""Model families and their math (torch only).

Importing this package registers every family, so ``build_model(cfg)`` works right after
``import models``.
"""

from models.registry import build_model, list_models, register_model
from models.likelihoods import build_likelihood
from models.kl import gaussian_kl, standard_normal_kl
from models.conv_vae import ConvVAE  # importing a family module registers it
from models.ladder_vae import LadderVAE
from models.vqvae import VQVAE
from models.vq_prior import VQPrior

__all__ = [
    "ConvVAE",
    "LadderVAE",
    "VQPrior",
    "VQVAE",
    "build_likelihood",
    "build_model",
    "gaussian_kl",
    "list_models",
    "register_model",
    "standard_normal_kl",
]

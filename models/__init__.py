"""Model families and their math (torch only).

Importing this package registers every family, so ``build_model(cfg)`` works right after
``import models``.
"""

from models.registry import build_model, family_default, list_models, objective_name, register_model, resolve_model_config
from models.likelihoods import LIKELIHOODS, bits_per_dim, build_likelihood
from models.kl import gaussian_kl, standard_normal_kl
from models.priors import PRIORS, build_prior
from models.conv_vae import ConvVAE  # importing a family module registers it
from models.factor_vae import FactorVAE, permute_dims
from models.ladder_vae import LadderVAE
from models.progressive_vae import ProgressiveVAE
from models.progressive_ladder_vae import ProgressiveLadderVAE
from models.vqvae import VQVAE
from models.vq_prior import VQPrior
from models.vdvae import VDVAE

__all__ = [
    "ConvVAE",
    "FactorVAE",
    "LIKELIHOODS",
    "PRIORS",
    "ProgressiveLadderVAE",
    "ProgressiveVAE",
    "LadderVAE",
    "VDVAE",
    "VQPrior",
    "VQVAE",
    "bits_per_dim",
    "build_likelihood",
    "build_model",
    "build_prior",
    "family_default",
    "gaussian_kl",
    "list_models",
    "permute_dims",
    "objective_name",
    "register_model",
    "resolve_model_config",
    "standard_normal_kl",
]

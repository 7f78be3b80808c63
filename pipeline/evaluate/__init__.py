"""Evaluation metrics for vaepipe models: the IWAE bound (an NLL where the likelihood is a
probability of the stored data), ELBO diagnostics and active units, disentanglement (MIG,
SAP), FID, and latent-space pictures.

No Ray, MLflow or DeepSpeed here: every function works on a model and tensors/iterables, and
the accumulators expose mergeable float64 state so the caller can combine workers.
"""

from pipeline.evaluate.diagnostics import (
    ELBOAccumulator,
    active_units_cov,
    active_units_kl,
    collapse_verdict,
    evaluate_elbo,
)
from pipeline.evaluate.disentanglement import collect_codes, mig, sap
from pipeline.evaluate.fid import (
    FeatureMoments,
    FIDInceptionV3,
    cached_statistics,
    compute_statistics,
    fid_available,
    frechet_distance,
    load_fid_inception,
)
from pipeline.evaluate.likelihood import bits_per_dim, iwae_log_likelihood, likelihood_is_density
from pipeline.evaluate.visualize import interpolate, kl_bar_plot, latent_traversals, make_grid, save_png

__all__ = [
    "ELBOAccumulator", "active_units_cov", "active_units_kl", "collapse_verdict", "evaluate_elbo",
    "collect_codes", "mig", "sap",
    "FeatureMoments", "FIDInceptionV3", "cached_statistics", "compute_statistics", "fid_available",
    "frechet_distance", "load_fid_inception",
    "bits_per_dim", "iwae_log_likelihood", "likelihood_is_density",
    "interpolate", "kl_bar_plot", "latent_traversals", "make_grid", "save_png",
]

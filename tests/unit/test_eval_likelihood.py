"""IWAE log-likelihood on a linear-Gaussian VAE whose exact log p(x) is known in closed form.

p(z) = N(0, I), p(x|z) = N(Wz + b, σ²I)  ⇒  p(x) = N(b, WWᵀ + σ²I). W has orthogonal columns,
so the exact posterior N(Σ Wᵀ(x − b)/σ², Σ = (I + WᵀW/σ²)⁻¹) is diagonal and a diagonal q
can be made exact (zero-variance weights) or deliberately wrong (shifted, widened).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.kl import diag_gaussian_log_prob
from pipeline.evaluate.likelihood import bits_per_dim, iwae_log_likelihood

DZ, DX, SIGMA = 3, 5, 0.5


class LinearGaussianVAE(nn.Module):
    """Protocol subset used by the IWAE code: encode, log_likelihood_terms (float64 math)."""

    def __init__(self, mean_shift: float = 0.0, std_scale: float = 1.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DX, DX, generator=g, dtype=torch.float64))
        self.W = q[:, :DZ] * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # orthogonal columns
        self.b = torch.randn(DX, generator=g, dtype=torch.float64)
        self.post_var = 1.0 / (1.0 + (self.W ** 2).sum(0) / SIGMA ** 2)  # diagonal of Σ
        self.mean_shift, self.std_scale = mean_shift, std_scale
        self.encode_calls = 0

    def encode(self, x):
        self.encode_calls += 1
        x = x.double()
        mu = self.post_var * ((x - self.b) @ self.W) / SIGMA ** 2
        mu = mu + self.mean_shift * self.post_var.sqrt()
        logvar = torch.log(self.post_var * self.std_scale ** 2).expand_as(mu)
        return mu, logvar

    def log_likelihood_terms(self, x, z):
        x, z = x.double(), z.double()
        mu, logvar = self.encode(x)
        mean_x = z @ self.W.T + self.b
        return {
            "log_px_z": diag_gaussian_log_prob(x, mean_x, math.log(SIGMA ** 2)),
            "log_pz": diag_gaussian_log_prob(z),
            "log_qz_x": diag_gaussian_log_prob(z, mu, logvar),
        }

    def exact_log_px(self, x):
        cov = self.W @ self.W.T + SIGMA ** 2 * torch.eye(DX, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x.double())


def _data(model: LinearGaussianVAE, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, DZ, generator=g, dtype=torch.float64)
    return z @ model.W.T + model.b + SIGMA * torch.randn(n, DX, generator=g, dtype=torch.float64)


def test_exact_posterior_gives_exact_log_px_for_any_chunking():
    model = LinearGaussianVAE()
    x = _data(model, 16)
    exact = model.exact_log_px(x)
    for k, batch_k in [(1, 1), (7, 3), (50, 50)]:
        est = iwae_log_likelihood(model, x, k=k, batch_k=batch_k)
        assert est.dtype == torch.float64 and est.shape == (16,)
        torch.testing.assert_close(est, exact, atol=1e-9, rtol=0)


def test_imperfect_posterior_converges_to_exact_log_px_at_large_k():
    model = LinearGaussianVAE(mean_shift=0.5, std_scale=1.3)
    x = _data(model, 32)
    gen = torch.Generator().manual_seed(0)
    est = iwae_log_likelihood(model, x, k=5000, batch_k=1000, generator=gen)
    exact = model.exact_log_px(x)
    assert (est - exact).abs().max() < 0.05
    assert (est <= exact + 0.05).all()  # a lower bound up to Monte-Carlo noise
    assert model.encode_calls == 5 + 5 * 1  # generic path: one encode per chunk (+ one in the terms)


def test_bound_tightens_with_k():
    model = LinearGaussianVAE(mean_shift=1.0, std_scale=1.5)
    x = _data(model, 256, seed=2)
    gen = torch.Generator().manual_seed(3)
    means = [iwae_log_likelihood(model, x, k=k, batch_k=500, generator=gen).mean().item() for k in (1, 10, 1000)]
    exact = model.exact_log_px(x).mean().item()
    assert means[0] < means[1] < means[2] <= exact + 0.02
    assert exact - means[0] > 0.2  # the k=1 ELBO gap is real, so the ordering is not noise


def test_sample_posterior_path_is_used_when_offered():
    class Hierarchical(LinearGaussianVAE):
        def __init__(self):
            super().__init__(mean_shift=0.3, std_scale=1.2)
            self.sampled = 0

        def sample_posterior(self, x):
            self.sampled += x.shape[0]
            mu, logvar = self.encode(x)
            return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)

    torch.manual_seed(0)
    model = Hierarchical()
    x = _data(model, 8)
    est = iwae_log_likelihood(model, x, k=3000, batch_k=1000)
    assert model.sampled == 3000 * 8
    assert (est - model.exact_log_px(x)).abs().max() < 0.05


def test_eval_mode_is_restored_and_bad_args_rejected():
    model = LinearGaussianVAE()
    model.train()
    iwae_log_likelihood(model, _data(model, 2), k=2)
    assert model.training
    with pytest.raises(ValueError, match="k >= 1"):
        iwae_log_likelihood(model, _data(model, 2), k=0)


def test_bits_per_dim():
    assert bits_per_dim(-math.log(2) * 3072, 3072) == pytest.approx(1.0)
    lp = torch.tensor([-100.0, -200.0], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(lp, 10), -lp / (10 * math.log(2)))
    # continuous density on [0, 1] data → 8-bit scale: log p − D ln 256
    assert bits_per_dim(0.0, 4, data_range=256) == pytest.approx(8.0)


def test_runs_on_the_reference_conv_vae():
    from models.conv_vae import ConvVAE

    torch.manual_seed(0)
    model = ConvVAE(in_channels=1, resolution=32, latent_dim=4, base_channels=4, hidden_dim=16, likelihood="bernoulli")
    x = torch.rand(3, 1, 32, 32).round()
    est = iwae_log_likelihood(model, x, k=64, batch_k=16)
    assert est.shape == (3,) and est.dtype == torch.float64 and torch.isfinite(est).all()
    bpd = bits_per_dim(est, 32 * 32)
    assert ((bpd > 0.5) & (bpd < 2.0)).all()  # an untrained Bernoulli decoder is near 1 bit per pixel


# --- which likelihoods give a true NLL -----------------------------------------------------
@pytest.mark.parametrize("likelihood, binarize, is_density", [
    ("logistic_mixture", None, True),
    ("logistic_mixture", "none", True),
    ("bernoulli", "static", True),
    ("bernoulli", "dynamic", True),
    ("bernoulli", None, False),  # absent key = continuous pixels
    ("bernoulli", "none", False),
    ("gaussian", "static", False),
    ("gaussian_learned", None, False),
    ("mse", None, False),
])
def test_likelihood_is_density(likelihood, binarize, is_density):
    from pipeline.evaluate.likelihood import likelihood_is_density

    data = {} if binarize is None else {"binarize": binarize}
    ok, reason = likelihood_is_density({"likelihood": likelihood}, data)
    assert ok is is_density
    assert likelihood in reason
    if not ok:
        assert reason.startswith("nll not shown") and "logistic_mixture" in reason


def test_likelihood_is_density_reads_a_second_stage_models_parent_and_rejects_bad_modes():
    from pipeline.evaluate.likelihood import likelihood_is_density

    prior = {"name": "vq_prior", "ar": {"parent_config": {"likelihood": "logistic_mixture"}}}
    assert likelihood_is_density(prior, None)[0] is True
    assert likelihood_is_density({}, {})[0] is False  # the config default: bernoulli, continuous
    with pytest.raises(ValueError, match="'sometimes'"):
        likelihood_is_density({"likelihood": "bernoulli"}, {"binarize": "sometimes"})


# --- float64 per-pixel sums --------------------------------------------------------------
def _reference_log_weights(model64, x64, eps):
    """log w in float64 with every per-pixel term summed exactly (math.fsum)."""
    import torch.nn.functional as F

    mu, logvar = model64.encode(x64)
    z = mu.unsqueeze(0) + torch.exp(0.5 * logvar).unsqueeze(0) * eps  # [K, B, D]
    out = torch.empty(eps.shape[:2], dtype=torch.float64)
    for k in range(eps.shape[0]):
        params = model64.decode_logits(z[k])
        bce = F.binary_cross_entropy_with_logits(params, x64, reduction="none").flatten(1)
        log_pz = diag_gaussian_log_prob(z[k])
        log_qz = diag_gaussian_log_prob(z[k], mu, logvar)
        for b in range(eps.shape[1]):
            out[k, b] = -math.fsum(bce[b].tolist()) + float(log_pz[b]) - float(log_qz[b])
    return out


def test_iwae_sums_per_pixel_terms_in_float64_on_the_evaluation_path():
    from models.conv_vae import ConvVAE
    from pipeline.evaluate.likelihood import float64_copy

    torch.manual_seed(0)
    model = ConvVAE(in_channels=3, resolution=32, latent_dim=4, base_channels=4, hidden_dim=16, likelihood="bernoulli").eval()
    x = torch.rand(4, 3, 32, 32).round()  # 3072 bits per image
    k = 8
    model64 = float64_copy(model)
    assert next(model.parameters()).dtype == torch.float32  # the trained model is left alone
    ours = iwae_log_likelihood(model64, x.double(), k=k, batch_k=3, generator=torch.Generator().manual_seed(5))
    # the same draws: the generic path takes eps [k, B, D] from the generator, batch_k at a time
    g = torch.Generator().manual_seed(5)
    eps = torch.cat([torch.randn((n, 4, 4), generator=g, dtype=torch.float64) for n in (3, 3, 2)])
    with torch.no_grad():
        ref_w = _reference_log_weights(model64, x.double(), eps)
        reference = torch.logsumexp(ref_w, 0) - math.log(k)
        torch.testing.assert_close(ours, reference, rtol=1e-9, atol=0)
        # the float32 model on the same z: per-pixel sums in float32 miss the reference by far more
        mu, logvar = model64.encode(x.double())
        z = (mu + torch.exp(0.5 * logvar) * eps).float()
        terms = model.log_likelihood_terms(x.repeat(k, 1, 1, 1), z.reshape(k * 4, 4))
        w32 = (terms["log_px_z"].double() + terms["log_pz"].double() - terms["log_qz_x"].double()).reshape(k, 4)
        float32 = torch.logsumexp(w32, 0) - math.log(k)
    assert ((float32 - reference).abs() / reference.abs()).max() > 1e-9


def test_the_model_in_its_own_precision_with_float64_sums_scores_as_its_float64_copy():
    """The evaluation path (network in float32, every sum and the log-sum-exp in float64) against
    the float64 copy on the same images and noise: within 1e-3 nats (the aim is < 0.01), where
    plain float32 sums of the same terms already differ by more than float64 rounding."""
    from models.conv_vae import ConvVAE
    from models.sums import float64_sums
    from pipeline.evaluate.likelihood import float64_copy

    torch.manual_seed(0)
    model = ConvVAE(in_channels=3, resolution=32, latent_dim=4, base_channels=4, hidden_dim=16, likelihood="bernoulli").eval()
    x = torch.rand(4, 3, 32, 32).round()
    kwargs = {"k": 16, "batch_k": 8}
    reference = iwae_log_likelihood(float64_copy(model), x.double(), generator=torch.Generator().manual_seed(5), **kwargs)
    ours = iwae_log_likelihood(model, x, generator=torch.Generator().manual_seed(5), **kwargs)
    assert ours.dtype == torch.float64
    assert (ours - reference).abs().max() < 1e-3
    with torch.no_grad():  # what float64_sums changes: the per-sample sums' dtype
        params = model.decode_logits(model.encode(x)[0])
        plain = model.likelihood.log_prob(params, x)
        with float64_sums():
            wide = model.likelihood.log_prob(params, x)
    assert plain.dtype == torch.float32 and wide.dtype == torch.float64
    torch.testing.assert_close(wide, plain.double(), rtol=1e-5, atol=0)

"""Observation models p(x|z): turn decoder outputs into per-sample NLLs and mean images.

Every likelihood reduces over all non-batch dims, so it works for any image shape. Each one
declares ``params_per_channel``: the decoder emits that many channels per image channel.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from models.sums import sum_per_sample

_LOG_2PI = math.log(2.0 * math.pi)


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` upcast from half precision to float32; float64 stays float64 (evaluation scores in float64)."""
    return t if t.dtype == torch.float64 else t.float()


_sum_per_sample = sum_per_sample  # float64 inside models.sums.float64_sums() (evaluation)


class BernoulliLikelihood:
    """Bernoulli per pixel; decoder outputs logits. Targets may be continuous in [0, 1]."""

    name = "bernoulli"
    params_per_channel = 1

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample BCE-with-logits summed over pixels, shape [B]."""
        return _sum_per_sample(F.binary_cross_entropy_with_logits(params, x, reduction="none"))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, shape [B]; exactly -nll (BCE is already normalised)."""
        return -self.nll(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Pixel means in [0, 1]."""
        return torch.sigmoid(params)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        """Binary pixels drawn from the Bernoulli means."""
        return torch.bernoulli(torch.sigmoid(params))


class GaussianLikelihood:
    """Gaussian per pixel with a fixed σ; decoder outputs the means."""

    name = "gaussian"
    params_per_channel = 1

    def __init__(self, obs_std: float) -> None:
        if not obs_std > 0:
            raise ValueError(f"model.obs_std must be > 0 for the gaussian likelihood, got {obs_std}")
        self.obs_std = float(obs_std)
        self._log_std = math.log(self.obs_std)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample -log N(x; params, σ²) summed over pixels, constant included, shape [B]."""
        z = (x - params) / self.obs_std
        return _sum_per_sample(0.5 * z.pow(2) + self._log_std + 0.5 * _LOG_2PI)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, shape [B]."""
        return -self.nll(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Means clamped to the valid pixel range [0, 1]."""
        return params.clamp(0.0, 1.0)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        """A draw from N(params, σ²), clamped to [0, 1]."""
        return (params + self.obs_std * torch.randn_like(params)).clamp(0.0, 1.0)


class MSELikelihood:
    """Sum of squared errors; the decoder outputs the means.

    SSE is not a normalised density, but it equals -log N(x; params, σ²=1/2) minus a constant,
    so ``log_prob`` reports that Gaussian's density to keep likelihood bounds in true nats.
    """

    name = "mse"
    params_per_channel = 1
    _HALF_LOG_PI = 0.5 * math.log(math.pi)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample sum of squared errors, shape [B] (the training loss, not normalised)."""
        return _sum_per_sample((x - params).pow(2))

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log N(x; params, 1/2) per sample, shape [B] = -(SSE + D/2·log π)."""
        num_pixels = x[0].numel()
        return -(self.nll(params, x) + num_pixels * self._HALF_LOG_PI)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Means clamped to the valid pixel range [0, 1]."""
        return params.clamp(0.0, 1.0)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        """A draw from N(params, 1/2), clamped to [0, 1]."""
        return (params + math.sqrt(0.5) * torch.randn_like(params)).clamp(0.0, 1.0)


class LearnedGaussianLikelihood:
    """Gaussian per pixel with a per-pixel σ predicted by the decoder (2 channels per image channel).

    Layout: ``params[:, :C]`` are the means, ``params[:, C:]`` the raw scales, with
    σ = ``min_std`` + softplus(raw). Softplus rather than exp keeps the gradient bounded when the
    decoder pushes σ up, and the floor stops the density of continuous data from diverging as
    σ → 0 while a batch is being memorised.
    """

    name = "gaussian_learned"
    params_per_channel = 2
    min_std = 1e-3

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, σ), each [B, C, H, W], from decoder outputs [B, 2C, H, W]."""
        means, raw = params.chunk(2, dim=1)
        return means, self.min_std + F.softplus(raw)

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample -log N(x; μ, σ²) summed over pixels, constant included, shape [B]."""
        means, std = self.split(params)
        z = (x - means) / std
        return _sum_per_sample(0.5 * z.pow(2) + torch.log(std) + 0.5 * _LOG_2PI)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per sample, shape [B]."""
        return -self.nll(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Means clamped to [0, 1], [B, C, H, W]."""
        return self.split(params)[0].clamp(0.0, 1.0)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        """A draw from N(μ, σ²), clamped to [0, 1]."""
        means, std = self.split(params)
        return (means + std * torch.randn_like(means)).clamp(0.0, 1.0)


class DiscretizedLogisticMixtureLikelihood:
    """Discretised mixture of logistics for ``bits``-bit images (Salimans et al. 2017, PixelCNN++).

    Each pixel *channel* has its own K-component mixture; channels are independent given z
    (PixelCNN++ couples R→G→B linearly because its decoder is autoregressive over channels; a
    VAE decoder predicts all channels at once, so the coupling adds little and would tie
    ``params_per_channel`` to RGB). Layout: decoder outputs [B, 3K·C, H, W] viewed as
    [B, 3, K, C, H, W] = (mixture logits, means, log-scales), means on the [-1, 1] scale.

    With T = 2**bits - 1 (255 for the default 8 bits), targets in [0, 1] are rounded to the
    nearest of the T + 1 levels k/T and rescaled to v = 2k/T - 1; the bin of v is
    [v - 1/T, v + 1/T], except that k = 0 takes all mass below -1 + 1/T and k = T all mass
    above 1 - 1/T, so the bins cover the real line and ``-log_prob / (#dims · ln 2)`` is
    bits/dim. Fewer bits (VDVAE trains FFHQ-256 at 5) give wider bins: the model is not asked
    to spend capacity on the low-order bits of each pixel. Data and likelihood must agree.
    """

    name = "logistic_mixture"
    _LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor: a scale of e^-7 already puts ~all mass in one bin

    def __init__(self, components: int = 5, bits: int = 8) -> None:
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(
                f"model.logistic_components must be a positive integer, got {components!r}"
            )
        check_bits(bits)
        self.components = components
        self.params_per_channel = 3 * components
        self.bits = int(bits)
        # Kept as floats so that bits=8 runs exactly the former ops (x·255, 2k/255 - 1, ±1/255).
        self._top = float(2 ** self.bits - 1)
        self._half_bin = 1.0 / self._top

    def split(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log mixture weights, means, log-scales), each [B, K, C, H, W]."""
        b, ch, h, w = params.shape
        if ch % self.params_per_channel:
            raise ValueError(
                f"logistic_mixture with {self.components} components needs a multiple of "
                f"{self.params_per_channel} decoder channels, got {ch}"
            )
        view = params.reshape(b, 3, self.components, ch // self.params_per_channel, h, w)  # NHWC too
        logits, means, log_scales = view.unbind(dim=1)
        return (
            F.log_softmax(logits, dim=1),
            means,
            log_scales.clamp(min=self._LOG_SCALE_MIN),
        )

    def log_prob_pixels(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P(x) per pixel channel, [B, C, H, W], for x in [0, 1] (rounded to ``bits`` bits)."""
        log_weights, means, log_scales = self.split(params)
        top, half_bin = self._top, self._half_bin
        levels = torch.round(x.clamp(0.0, 1.0) * top)
        v = (2.0 * levels / top - 1.0).unsqueeze(1)  # [B, 1, C, H, W]
        inv_s = torch.exp(-log_scales)
        plus_in = inv_s * (v - means + half_bin)
        min_in = inv_s * (v - means - half_bin)
        # log(σ(a) - σ(b)) = log σ(a) + log σ(-b) + log(1 - e^{-(a-b)}) is exact and never
        # subtracts two nearly equal CDFs, so no PixelCNN++-style pdf fallback is needed.
        log_mid = (
            F.logsigmoid(plus_in) + F.logsigmoid(-min_in)
            + torch.log(-torch.expm1(-(2.0 * half_bin) * inv_s))
        )
        log_low = F.logsigmoid(plus_in)  # k = 0: CDF(-1 + 1/T)
        log_high = F.logsigmoid(-min_in)  # k = T: 1 - CDF(1 - 1/T)
        levels = levels.unsqueeze(1)
        log_bin = torch.where(levels <= 0, log_low, torch.where(levels >= top, log_high, log_mid))
        return torch.logsumexp(log_weights + log_bin, dim=1)

    def log_prob(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log P(x|z) per sample in nats, shape [B] (a probability, not a density)."""
        return _sum_per_sample(self.log_prob_pixels(params, x))

    def nll(self, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-sample -log P(x|z) in nats, shape [B]."""
        return -self.log_prob(params, x)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """Mixture mean Σ_k π_k μ_k mapped to [0, 1], [B, C, H, W].

        This is the mean of the continuous mixture clamped to the pixel range, not the exact mean
        of the discretised distribution (which would need all 2**bits bin masses per pixel); the two
        differ only where a component has real mass beyond [-1, 1].
        """
        log_weights, means, _ = self.split(params)
        m = (log_weights.exp() * means).sum(dim=1)
        return ((m.clamp(-1.0, 1.0) + 1.0) / 2.0)

    def sample(self, params: torch.Tensor) -> torch.Tensor:
        """A ``bits``-bit draw (k/T in [0, 1]): pick a component, sample its logistic, quantise."""
        log_weights, means, log_scales = self.split(params)
        gumbel = -torch.log(-torch.log(torch.rand_like(log_weights).clamp(1e-10, 1.0 - 1e-10)))
        pick = F.one_hot((log_weights + gumbel).argmax(dim=1), self.components)
        pick = pick.movedim(-1, 1).to(means.dtype)
        mu, log_s = (pick * means).sum(1), (pick * log_scales).sum(1)
        u = torch.rand_like(mu).clamp(1e-5, 1.0 - 1e-5)
        v = (mu + torch.exp(log_s) * (torch.log(u) - torch.log1p(-u))).clamp(-1.0, 1.0)
        return torch.round((v + 1.0) * (self._top / 2.0)) / self._top


def bits_per_dim(log_prob: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) / (#dims · ln 2): per-sample log-likelihoods [B] in nats -> bits/dim [B]."""
    return -log_prob / (x[0].numel() * math.log(2.0))


LIKELIHOODS = ("bernoulli", "gaussian", "mse", "gaussian_learned", "logistic_mixture")


def check_bits(bits: int) -> None:
    """Raise naming ``data.bits`` unless ``bits`` is an int in 1..8 (the pixel depth of the data)."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 8:
        raise ValueError(f"data.bits must be an integer in 1..8, got {bits!r}")


def build_likelihood(name: str, obs_std: float = 0.1, components: int = 5, bits: int = 8):
    """Return the likelihood object for ``name`` (one of ``LIKELIHOODS``).

    ``obs_std`` is only used by ``gaussian``, ``components`` (model.logistic_components) and
    ``bits`` (data.bits, the number of pixel levels 2**bits) only by ``logistic_mixture``; the
    other likelihoods ignore ``bits`` but it is still validated, so a bad value fails the same
    way for every likelihood. The decoder must emit ``likelihood.params_per_channel`` channels
    per image channel. Unknown names raise ValueError.
    """
    check_bits(bits)
    if name == "bernoulli":
        return BernoulliLikelihood()
    if name == "gaussian":
        return GaussianLikelihood(obs_std)
    if name == "mse":
        return MSELikelihood()
    if name == "gaussian_learned":
        return LearnedGaussianLikelihood()
    if name == "logistic_mixture":
        return DiscretizedLogisticMixtureLikelihood(components, bits=int(bits))
    raise ValueError(
        f"unknown likelihood {name!r} (model.likelihood); choose one of: {', '.join(LIKELIHOODS)}"
    )

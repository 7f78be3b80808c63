"""Latent priors p(z) for the Gaussian-posterior families (``model.prior``).

* ``normal``: N(0, I); KL[q(z|x) || p(z)] in closed form.
* ``made``: autoregressive p(z) = ∏_i N(z_i; μ_i(z_<i), σ_i(z_<i)²) from a MADE network
  (Germain et al. 2015) with ``prior_hidden`` units in two masked hidden layers.
* ``mog``: a learnable mixture of ``prior_components`` diagonal Gaussians.

Every prior answers ``kl_terms(mu, logvar, z) -> (kl_elem [B, D], kl_rest [B] | None)``: the
per-sample KL is ``kl_elem.sum(1) + kl_rest``. ``kl_elem`` is the per-dimension split that free
bits clamp and ``kl_per_dim`` reports; ``kl_rest`` is whatever part of the KL has no
per-dimension meaning (only the MoG has one). Priors without a closed-form KL use the
single-sample Monte-Carlo estimate log q(z|x) − log p(z) at the reparameterised z the decoder
also sees: unbiased, and its gradient flows through z into both the encoder and the prior.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.kl import standard_normal_kl

_LOG_2PI = math.log(2.0 * math.pi)
PRIORS = ("normal", "made", "mog")


def _normal_log_prob_elem(z: torch.Tensor, mu, log_scale) -> torch.Tensor:
    """Elementwise log N(z; mu, e^{2·log_scale}) with the 2π constant."""
    return -0.5 * _LOG_2PI - log_scale - 0.5 * ((z - mu) * torch.exp(-log_scale)).pow(2)


def _soft_clamp(raw: torch.Tensor, bound: float) -> torch.Tensor:
    # A hard clamp would stop gradients at the bound; tanh keeps them while bounding log σ.
    return bound * torch.tanh(raw / bound)


class Prior(nn.Module):
    """Base class: subclasses give ``log_prob_elem`` (or override ``log_prob``/``kl_terms``)."""

    closed_form = False

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"model.latent_dim must be a positive integer, got {latent_dim!r}")
        self.latent_dim = latent_dim

    def log_prob_elem(self, z: torch.Tensor) -> torch.Tensor:
        """Terms [B, D] that sum to log p(z): log p(z_i | z_<i) for factorised/AR priors."""
        raise NotImplementedError

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) per sample, shape [B], constants included."""
        return self.log_prob_elem(z).sum(dim=1)

    def mc_kl_terms(
        self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Single-sample Monte-Carlo KL: log q_i(z_i|x) − log p(z_i|z_<i) per dim, at the given z."""
        log_q = _normal_log_prob_elem(z, mu, 0.5 * logvar)
        return log_q - self.log_prob_elem(z), None

    def kl_terms(
        self, mu: torch.Tensor, logvar: torch.Tensor, z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(kl_elem [B, D], kl_rest [B] or None); see the module docstring."""
        return self.mc_kl_terms(mu, logvar, z)

    def sample(self, n: int, device: torch.device | str | None = None) -> torch.Tensor:
        """n draws [n, D] from p(z)."""
        raise NotImplementedError

    def _device(self, device):
        if device is not None:
            return torch.device(device)
        param = next(self.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    def _dtype(self) -> torch.dtype:
        """The dtype of the prior's own parameters (bf16 under a bf16 engine), else float32."""
        param = next(self.parameters(), None)
        return param.dtype if param is not None else torch.float32


class StandardNormalPrior(Prior):
    """N(0, I). ``kl_terms`` is the closed form; ``mc_kl_terms`` is the generic estimate."""

    closed_form = True

    def log_prob_elem(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (_LOG_2PI + z.pow(2))

    def kl_terms(self, mu, logvar, z):
        return standard_normal_kl(mu, logvar), None

    def sample(self, n: int, device=None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=self._device(device))


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed 0/1 mask (a buffer, so it checkpoints)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor, init_scale: float = 1.0) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.to(self.weight.dtype))
        if init_scale != 1.0:
            # Scaled here, inside the owner's __init__: a parent touching the weight afterwards
            # would find it already partitioned (empty) when DeepSpeed's zero.Init builds the model.
            with torch.no_grad():
                self.weight.mul_(init_scale)
                self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Parameters follow the input's dtype so the prior stays fp32 inside a bf16/fp16 model.
        return F.linear(x, (self.weight * self.mask).to(x.dtype), self.bias.to(x.dtype))


class MADEPrior(Prior):
    """Autoregressive Gaussian prior from a MADE with natural ordering z_1, ..., z_D.

    Input degrees are 1..D, hidden degrees cycle through 1..D-1, and output i (mean and
    log-scale of z_i) sees only hidden units of degree < i, so it depends on z_<i alone: z_1's
    conditional is a learned Gaussian that ignores the input. The output layer starts at 1% of
    the usual scale, so the prior starts close to N(0, I) and every layer still gets gradient.
    """

    _LOG_SCALE_BOUND = 7.0

    def __init__(self, latent_dim: int, hidden: int = 256) -> None:
        super().__init__(latent_dim)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"model.prior_hidden must be a positive integer, got {hidden!r}")
        d = latent_dim
        in_deg = torch.arange(1, d + 1)
        hid_deg = torch.arange(hidden) % max(1, d - 1) + 1
        mask_in = (hid_deg[:, None] >= in_deg[None, :]).float()
        mask_hid = (hid_deg[:, None] >= hid_deg[None, :]).float()
        out_deg = torch.cat([in_deg, in_deg])  # means, then log-scales
        mask_out = (out_deg[:, None] > hid_deg[None, :]).float()
        self.net = nn.Sequential(
            MaskedLinear(d, hidden, mask_in), nn.ELU(),
            MaskedLinear(hidden, hidden, mask_hid), nn.ELU(),
            MaskedLinear(hidden, 2 * d, mask_out, init_scale=0.01),
        )

    def conditionals(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(means, log-scales) [B, D] of p(z_i | z_<i) for every i, in one pass."""
        mean, raw = self.net(z).chunk(2, dim=-1)
        return mean, _soft_clamp(raw, self._LOG_SCALE_BOUND)

    def log_prob_elem(self, z: torch.Tensor) -> torch.Tensor:
        mean, log_scale = self.conditionals(z)
        return _normal_log_prob_elem(z, mean, log_scale)

    def sample(self, n: int, device=None) -> torch.Tensor:
        """Sequential ancestral sampling: D passes, pass i fixes z_i."""
        device = self._device(device)
        eps = torch.randn(n, self.latent_dim, device=device, dtype=self._dtype())
        z = torch.zeros(n, self.latent_dim, device=device, dtype=self._dtype())
        for i in range(self.latent_dim):
            mean, log_scale = self.conditionals(z)
            z = z.clone()
            z[:, i] = mean[:, i] + torch.exp(log_scale[:, i]) * eps[:, i]
        return z


class MixtureOfGaussiansPrior(Prior):
    """p(z) = Σ_k π_k N(z; μ_k, diag σ_k²) with learnable π (softmax logits), μ_k and log σ_k.

    Means start as N(0, 1) draws and scales at 1 so the components overlap and all get gradient.

    Per-dimension KL: a mixture's KL does not split over dimensions, so ``kl_elem`` uses the
    mixture's 1-D marginals m_i(z_i) = Σ_k π_k N(z_i; μ_ki, σ_ki²): kl_elem_i = log q_i(z_i|x) −
    log m_i(z_i), and ``kl_rest`` = Σ_i log m_i(z_i) − log p(z) carries the dependence between
    dimensions that the mixture induces. Free bits clamp only the marginal parts; ``kl`` stays the
    full single-sample estimate log q(z|x) − log p(z).
    """

    _LOG_SCALE_BOUND = 7.0

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__(latent_dim)
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"model.prior_components must be a positive integer, got {components!r}")
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))

    def _component_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log π [K], elementwise log N(z_i; μ_ki, σ_ki) [B, K, D])."""
        log_pi = F.log_softmax(self.logits.to(z.dtype), dim=0)
        log_scales = _soft_clamp(self.log_scales.to(z.dtype), self._LOG_SCALE_BOUND)
        elem = _normal_log_prob_elem(z.unsqueeze(1), self.means.to(z.dtype), log_scales)
        return log_pi, elem

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        log_pi, elem = self._component_terms(z)
        return torch.logsumexp(log_pi + elem.sum(dim=2), dim=1)

    def log_marginals(self, z: torch.Tensor) -> torch.Tensor:
        """log m_i(z_i) [B, D]: the 1-D marginals of the mixture."""
        log_pi, elem = self._component_terms(z)
        return torch.logsumexp(log_pi[None, :, None] + elem, dim=1)

    def mc_kl_terms(self, mu, logvar, z):
        log_q = _normal_log_prob_elem(z, mu, 0.5 * logvar)
        log_m = self.log_marginals(z)
        return log_q - log_m, log_m.sum(dim=1) - self.log_prob(z)

    def sample(self, n: int, device=None) -> torch.Tensor:
        device = self._device(device)
        k = torch.multinomial(F.softmax(self.logits.detach().float(), 0), n, replacement=True).to(device)
        scales = torch.exp(_soft_clamp(self.log_scales, self._LOG_SCALE_BOUND))
        return self.means[k] + scales[k] * torch.randn(n, self.latent_dim, device=device, dtype=self._dtype())


def build_prior(name: str, latent_dim: int, components: int = 10, hidden: int = 256) -> Prior:
    """The prior ``name`` (normal | made | mog) over ``latent_dim`` dims.

    ``components`` is model.prior_components (mog), ``hidden`` model.prior_hidden (made).
    """
    if name == "normal":
        return StandardNormalPrior(latent_dim)
    if name == "made":
        return MADEPrior(latent_dim, hidden)
    if name == "mog":
        return MixtureOfGaussiansPrior(latent_dim, components)
    raise ValueError(f"unknown model.prior {name!r}; choose one of: {', '.join(PRIORS)}")

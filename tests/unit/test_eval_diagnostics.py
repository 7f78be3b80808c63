"""ELBO / KL accumulation, active units (KL and Burda covariance definitions), collapse verdict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.kl import standard_normal_kl
from pipeline.evaluate.diagnostics import (
    ELBOAccumulator,
    active_units_cov,
    active_units_kl,
    collapse_verdict,
    evaluate_elbo,
)

D = 8


class HalfIgnoringVAE(nn.Module):
    """Stub: mu of dims 0-3 follows the input; dims 4-7 have mu = const, logvar = 0."""

    def __init__(self, const: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(16, D // 2)
        self.const = const

    def encode(self, x):
        h = x.flatten(1)
        mu = torch.cat([self.proj(h) * 3.0, torch.full((x.shape[0], D // 2), self.const)], 1)
        logvar = torch.cat([torch.full((x.shape[0], D // 2), -1.0), torch.zeros(x.shape[0], D // 2)], 1)
        return mu, logvar

    def forward(self, x):
        mu, logvar = self.encode(x)
        recon = (x.flatten(1) ** 2).sum(1)  # any per-sample number
        kl_elem = standard_normal_kl(mu, logvar)
        kl = kl_elem.sum(1)
        return {"loss": (recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean(), "kl_per_dim": kl_elem.mean(0),
                "elbo": -(recon + kl).mean(), "mu": mu, "logvar": logvar, "x_hat": x, "z": mu}


def _batches(n_batches=5, size=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.rand(size, 1, 4, 4, generator=g)} for _ in range(n_batches)]


def test_half_ignored_dims_give_half_active_units_both_ways():
    torch.manual_seed(0)
    model = HalfIgnoringVAE().train()
    batches = _batches()
    result = evaluate_elbo(model, batches)
    assert model.training  # mode restored
    assert result["active_units_kl"] == D // 2
    assert result["active_units_cov"] == D // 2
    assert result["num_samples"] == 65
    mu_all = torch.cat([model.encode(b["image"])[0] for b in batches]).detach()
    assert active_units_cov(mu_all) == D // 2
    assert active_units_kl(result["kl_per_dim"]) == D // 2
    torch.testing.assert_close(result["mu_variance"], mu_all.double().var(0, unbiased=False))


def test_the_two_definitions_differ_on_a_constant_but_shifted_posterior():
    # mu = 1 for every input: KL = 0.5 nats per dim (KL-active) but no variance over data (Burda-inactive)
    result = evaluate_elbo(HalfIgnoringVAE(const=1.0), _batches())
    assert result["active_units_kl"] == D and result["active_units_cov"] == D // 2


def test_accumulator_gives_exact_data_averages_and_merges_like_one_pass():
    torch.manual_seed(1)
    model = HalfIgnoringVAE().eval()
    batches = [{"image": b["image"][: 3 + i]} for i, b in enumerate(_batches())]  # unequal sizes
    x = torch.cat([b["image"] for b in batches])
    with torch.no_grad():
        full = model(x)
    one = ELBOAccumulator(model=model)
    for b in batches:
        one.update(b)
    r = one.compute()
    assert r["elbo"] == pytest.approx(float(full["elbo"]), rel=1e-6)
    assert r["recon"] == pytest.approx(float(full["recon"]), rel=1e-6)
    assert r["kl"] == pytest.approx(float(full["kl"]), rel=1e-6)
    assert r["elbo"] == pytest.approx(-(r["recon"] + r["kl"]), rel=1e-6)  # float32 model math
    torch.testing.assert_close(r["kl_per_dim"], full["kl_per_dim"].double(), rtol=1e-6, atol=1e-7)
    # two "workers": each state dict rebuilds an accumulator; merging gives the one-pass numbers
    a, b = ELBOAccumulator(latent_dim=D), ELBOAccumulator(latent_dim=D)
    for i, batch in enumerate(batches):
        with torch.no_grad():
            (a if i % 2 else b).update(model(batch["image"]))  # forward outputs are accepted too
    assert all(v.dtype == torch.float64 for v in a.state_dict().values())
    rebuilt = ELBOAccumulator.from_state(a.state_dict()).merge(b.state_dict()).compute()
    merged = a.merge(b).compute()
    for res in (rebuilt, merged):
        assert res["elbo"] == pytest.approx(r["elbo"], rel=1e-12)
        torch.testing.assert_close(res["kl_per_dim"], r["kl_per_dim"])
        torch.testing.assert_close(res["mu_variance"], r["mu_variance"])


def _mu_output(mu: torch.Tensor) -> dict:
    """A forward-output dict carrying only what the accumulator reads, with float64 ``mu``."""
    zero = torch.zeros((), dtype=torch.float64)
    return {"elbo": zero, "recon": zero, "kl": zero, "kl_per_dim": torch.zeros(mu.shape[1]), "mu": mu}


def test_mu_variance_survives_a_large_offset_where_the_naive_form_cancels():
    g = torch.Generator().manual_seed(0)
    mu = 1e4 + 1e-3 * torch.randn(3000, 4, generator=g, dtype=torch.float64)  # variance 1e-6 around 1e4
    mu[:, 3] = 1e4 + 0.2 * torch.randn(3000, generator=g, dtype=torch.float64)  # one active unit (variance 0.04)
    exact = mu.var(0, unbiased=False)  # two-pass reference
    naive = (mu.pow(2).sum(0) / len(mu) - (mu.sum(0) / len(mu)).pow(2))  # what E[x²] − E[x]² gives
    assert ((naive - exact).abs() / exact)[:3].max() > 1e-2  # the data really defeats the naive form
    sizes = [1, 7, 500, 992, 1500]  # uneven batches, one of a single row
    one, workers = ELBOAccumulator(), [ELBOAccumulator(), ELBOAccumulator()]
    for i, rows in enumerate(torch.split(mu, sizes)):
        one.update(_mu_output(rows))
        workers[i % 2].update(_mu_output(rows))
    merged = ELBOAccumulator.from_state(workers[0].state_dict()).merge(workers[1].state_dict())
    for acc in (one, merged):
        result = acc.compute()
        torch.testing.assert_close(result["mu_variance"], exact, rtol=1e-9, atol=0)
        assert result["active_units_cov"] == 1


def test_state_with_partial_mu_moments_is_refused():
    state = ELBOAccumulator(latent_dim=2).state_dict()
    del state["mu_m2"]
    with pytest.raises(KeyError, match="mu_m2"):
        ELBOAccumulator.from_state(state)


def test_accumulator_errors_are_explicit():
    with pytest.raises(ValueError, match="no model"):
        ELBOAccumulator().update(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="no samples"):
        ELBOAccumulator().compute()


def test_collapse_verdict_thresholds():
    collapsed = collapse_verdict(torch.zeros(16))
    assert collapsed["collapsed"] and collapsed["inactive_fraction"] == 1.0
    assert "collapse" in collapsed["message"] and "0.1" in collapsed["message"]
    healthy = collapse_verdict(torch.full((16,), 0.5))
    assert not healthy["collapsed"] and healthy["active_units"] == 16 and healthy["total_kl"] == pytest.approx(8.0)
    # one strong unit of 20: total KL is large but 95% of the units are inactive
    one_unit = torch.zeros(20)
    one_unit[0] = 30.0
    v = collapse_verdict(one_unit)
    assert v["collapsed"] and v["inactive_fraction"] == pytest.approx(0.95) and "19/20" in v["message"]
    # exactly 90% inactive is not "more than 90%"
    assert not collapse_verdict(torch.tensor([1.0] + [0.0] * 9))["collapsed"]
    # an explicit total KL overrides the sum
    assert collapse_verdict(torch.full((4,), 1.0), total_kl=0.05)["collapsed"]


def test_evaluate_elbo_on_the_reference_conv_vae():
    from models.conv_vae import ConvVAE

    torch.manual_seed(0)
    model = ConvVAE(in_channels=1, resolution=32, latent_dim=6, base_channels=4, hidden_dim=16)
    batches = [{"image": torch.rand(4, 1, 32, 32)} for _ in range(2)]
    result = evaluate_elbo(model, batches, max_batches=1)
    assert result["num_samples"] == 4 and result["kl_per_dim"].shape == (6,)
    assert result["elbo"] < 0 and result["kl"] >= 0
    assert result["elbo"] == pytest.approx(-(result["recon"] + result["kl"]), rel=1e-5)
    # the verdict is the one collapse_verdict gives for the per-dim KL the model reported
    expected = collapse_verdict(result["kl_per_dim"], result["kl"])
    assert result["collapse"]["collapsed"] is expected["collapsed"]
    assert result["collapse"]["active_units"] == active_units_kl(result["kl_per_dim"])


def test_collapse_verdict_of_a_model_that_ignores_its_latent_and_of_one_that_uses_it():
    # every unit constant (mu = 0, logvar = 0) -> KL 0: the decoder cannot be using z
    collapsed = evaluate_elbo(_ConstantPosterior(torch.zeros(D)), _batches())
    assert collapsed["collapse"]["collapsed"] is True and collapsed["active_units_kl"] == 0
    assert "posterior collapse" in collapsed["collapse"]["message"]
    # half the units carry the input (KL well above 0.01 nats each): not collapsed
    healthy = evaluate_elbo(HalfIgnoringVAE(), _batches())
    assert healthy["collapse"]["collapsed"] is False and healthy["collapse"]["active_units"] == D // 2
    assert healthy["collapse"]["message"].startswith("ok:")


class _ConstantPosterior(HalfIgnoringVAE):
    """q(z|x) = N(const, I) for every x."""

    def __init__(self, const: torch.Tensor):
        super().__init__()
        self.value = const

    def encode(self, x):
        return self.value.expand(x.shape[0], -1).clone(), torch.zeros(x.shape[0], D)

"""MIG and SAP against disentanglement_lib's definitions, on codes with known structure and
against straightforward loop reimplementations and direct sklearn computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn import svm
from sklearn.metrics import mutual_info_score

from pipeline.evaluate.disentanglement import (
    collect_codes,
    discrete_entropy,
    histogram_discretize,
    mig,
    mutual_info_discrete,
    sap,
    sap_score_matrix,
)


def _factors(rng, n, values=(5, 8, 10)):
    return np.stack([rng.integers(0, v, n) for v in values], axis=1)


def _copied_codes(rng, factors, noise_dims=3, jitter=0.0):
    f = factors.astype(np.float64)
    copies = f + jitter * rng.standard_normal(f.shape)
    return np.concatenate([copies, rng.standard_normal((len(f), noise_dims))], axis=1)


# --- reference implementations: explicit loops, float64 ------------------------------------
def _mi_loops(a, b):
    n = len(a)
    joint, pa, pb = {}, {}, {}
    for u, v in zip(a.tolist(), b.tolist()):
        joint[(u, v)] = joint.get((u, v), 0) + 1
        pa[u] = pa.get(u, 0) + 1
        pb[v] = pb.get(v, 0) + 1
    return sum(c / n * math.log((c / n) / ((pa[u] / n) * (pb[v] / n))) for (u, v), c in joint.items())


def _mig_loops(codes, factors, n_bins=20):
    d, k = codes.shape[1], factors.shape[1]
    disc = np.zeros_like(codes)
    for j in range(d):  # disentanglement_lib's _histogram_discretize, column by column
        disc[:, j] = np.digitize(codes[:, j], np.histogram(codes[:, j], n_bins)[1][:-1])
    gaps = []
    for f in range(k):
        mis = sorted((_mi_loops(disc[:, j], factors[:, f]) for j in range(d)), reverse=True)
        gaps.append((mis[0] - mis[1]) / _mi_loops(factors[:, f], factors[:, f]))
    return float(np.mean(gaps))


def _sap_loops(ct, ft, cs, fs, continuous):
    d, k = ct.shape[1], ft.shape[1]
    s = np.zeros((d, k))
    for j in range(d):
        for f in range(k):
            if continuous:
                x, y = ct[:, j], ft[:, f].astype(np.float64)
                cxy = np.sum((x - x.mean()) * (y - y.mean())) / (len(x) - 1)
                vx, vy = x.var(ddof=1), y.var(ddof=1)
                s[j, f] = cxy ** 2 / (vx * vy) if vx > 1e-12 else 0.0
            else:
                classes = sorted(set(ft[:, f].tolist()))
                means = [ct[ft[:, f] == c, j].mean() for c in classes]
                correct = 0
                for x, y in zip(cs[:, j], fs[:, f]):
                    dist = [abs(x - m) for m in means]
                    correct += classes[dist.index(min(dist))] == y
                s[j, f] = correct / len(cs)
    top = np.sort(s, axis=0)
    return float(np.mean(top[-1] - top[-2])), s


# --- mutual information / entropy -----------------------------------------------------------
def test_mutual_info_matches_loops_and_sklearn():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 6, 3000)
    b = (a + rng.integers(0, 3, 3000)) % 7  # dependent
    assert mutual_info_discrete(a, b) == pytest.approx(_mi_loops(a, b), abs=1e-12)
    assert discrete_entropy(a) == pytest.approx(_mi_loops(a, a), abs=1e-12)
    assert mutual_info_discrete(a, np.zeros_like(a)) == 0.0
    assert mutual_info_discrete(a, b) == pytest.approx(mutual_info_score(a, b), abs=1e-12)
    assert mutual_info_discrete(b, a) == pytest.approx(mutual_info_score(b, a), abs=1e-12)


def test_histogram_discretize_is_disentanglement_lib_binning():
    rng = np.random.default_rng(1)
    c = rng.standard_normal((500, 2))
    disc = histogram_discretize(c, 20)
    assert disc.min() >= 1 and disc.max() <= 20
    np.testing.assert_array_equal(disc[:, 1], np.digitize(c[:, 1], np.histogram(c[:, 1], 20)[1][:-1]))


# --- MIG --------------------------------------------------------------------------------------
def test_mig_is_one_for_copied_factors_and_zero_for_independent_codes():
    rng = np.random.default_rng(2)
    factors = _factors(rng, 5000)
    score, details = mig(_copied_codes(rng, factors), factors, return_details=True)
    assert score > 0.97
    np.testing.assert_array_equal(details["top_dims"], [0, 1, 2])
    assert details["mi"].shape == (6, 3) and details["per_factor"].shape == (3,)
    independent = mig(rng.standard_normal((5000, 6)), factors)
    assert abs(independent) < 0.03
    # factor 0 split over two code dims: no gap for it; factor 1 still has its own dim
    split = np.concatenate([factors[:, [0, 0, 1]].astype(float), rng.standard_normal((5000, 2))], 1)
    score, details = mig(split, factors[:, :2], return_details=True)
    assert details["per_factor"][0] == pytest.approx(0.0, abs=1e-12) and details["per_factor"][1] > 0.97


def test_mig_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(3)
    factors = _factors(rng, 2000, values=(4, 6))
    codes = rng.standard_normal((2000, 5)) + 0.7 * factors[:, [0, 1, 0, 1, 0]]
    assert mig(codes, factors) == pytest.approx(_mig_loops(codes, factors), abs=1e-10)
    # torch inputs work the same
    assert mig(torch.from_numpy(codes), torch.from_numpy(factors)) == pytest.approx(_mig_loops(codes, factors), abs=1e-10)


def test_mig_ignores_constant_factors_and_rejects_bad_shapes():
    rng = np.random.default_rng(4)
    factors = np.stack([rng.integers(0, 5, 1000), np.zeros(1000, dtype=int)], 1)
    score, details = mig(_copied_codes(rng, factors[:, :1], 2), factors, return_details=True)
    assert score > 0.95 and np.isnan(details["per_factor"][1])
    with pytest.raises(ValueError, match="same N"):
        mig(rng.standard_normal((10, 3)), factors)


# --- SAP --------------------------------------------------------------------------------------
def test_sap_centroid_high_for_copied_factors_and_zero_for_independent_codes():
    rng = np.random.default_rng(5)
    ft, fs = _factors(rng, 3000, (2, 5, 10)), _factors(rng, 1000, (2, 5, 10))
    ct, cs = _copied_codes(rng, ft, jitter=0.1), _copied_codes(rng, fs, jitter=0.1)
    score, details = sap(ct, ft, cs, fs, classifier="centroid", return_details=True)
    s = details["score_matrix"]
    assert s.shape == (6, 3)
    np.testing.assert_allclose(np.diag(s[:3]), 1.0)
    # gap = 1 − best chance-level accuracy of another dim (majority class at most ~1/2, 1/5, 1/10)
    assert score > 0.6
    np.testing.assert_array_less([0.4, 0.7, 0.8], details["per_factor"])
    indep = sap(rng.standard_normal((3000, 6)), ft, rng.standard_normal((1000, 6)), fs, classifier="centroid")
    assert abs(indep) < 0.05


def test_sap_continuous_is_r2_gap():
    rng = np.random.default_rng(6)
    ft = _factors(rng, 3000)
    assert sap(_copied_codes(rng, ft, jitter=0.01), ft, continuous_factors=True) > 0.99
    assert abs(sap(rng.standard_normal((3000, 6)), ft, continuous_factors=True)) < 0.01


@pytest.mark.parametrize("continuous", [False, True])
def test_sap_matches_loop_reference_on_random_data(continuous):
    rng = np.random.default_rng(7)
    ft, fs = _factors(rng, 1500, (3, 4)), _factors(rng, 500, (3, 4))
    mix = lambda f: rng.standard_normal((len(f), 4)) + 0.8 * f[:, [0, 1, 0, 1]]  # noqa: E731
    ct, cs = mix(ft), mix(fs)
    expected, expected_matrix = _sap_loops(ct, ft, cs, fs, continuous)
    score, details = sap(ct, ft, cs, fs, continuous_factors=continuous, classifier="centroid", return_details=True)
    assert score == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(details["score_matrix"], expected_matrix, atol=1e-12)


def _sap_sklearn(ct, ft, cs, fs):
    """disentanglement_lib's sap_score written out: one LinearSVC per (code dim, factor)."""
    s = np.zeros((ct.shape[1], ft.shape[1]))
    for j in range(ct.shape[1]):
        for f in range(ft.shape[1]):
            clf = svm.LinearSVC(C=0.01, class_weight="balanced")
            clf.fit(ct[:, j][:, None], ft[:, f])
            s[j, f] = np.mean(clf.predict(cs[:, j][:, None]) == fs[:, f])
    top = np.sort(s, axis=0)
    return float(np.mean(top[-1] - top[-2])), s


def test_sap_default_is_disentanglement_libs_linear_svc_exactly():
    rng = np.random.default_rng(8)
    ft, fs = _factors(rng, 2000, (2, 3, 5)), _factors(rng, 1000, (2, 3, 5))
    noisy = lambda f: np.concatenate([f + 0.4 * rng.standard_normal(f.shape), rng.standard_normal((len(f), 2))], 1)  # noqa: E731
    ct, cs = noisy(ft), noisy(fs)
    expected, expected_matrix = _sap_sklearn(ct, ft, cs, fs)
    score, details = sap(ct, ft, cs, fs, return_details=True)  # no classifier argument: the default
    np.testing.assert_array_equal(details["score_matrix"], expected_matrix)
    assert score == expected
    # on many-valued factors the centroid classifier really gives other numbers
    assert not np.array_equal(sap_score_matrix(ct, ft, cs, fs, classifier="centroid"), expected_matrix)


def test_sap_requires_test_set_for_discrete_factors():
    with pytest.raises(ValueError, match="codes_test"):
        sap(np.zeros((4, 2)), np.zeros((4, 1), dtype=int))


def test_collect_codes_reads_posterior_means_and_factors():
    class Enc(torch.nn.Module):
        def encode(self, x):
            return x.flatten(1)[:, :3] * 2, torch.zeros(x.shape[0], 3)

    model = Enc().train()
    x = torch.rand(10, 1, 2, 2)
    batches = [{"image": x[:6], "factors": torch.arange(6)[:, None]}, {"image": x[6:], "factors": torch.arange(6, 10)[:, None]}]
    codes, factors = collect_codes(model, batches, max_samples=8)
    np.testing.assert_allclose(codes, (x.flatten(1)[:8, :3] * 2).double().numpy())
    np.testing.assert_array_equal(factors[:, 0], np.arange(8))
    assert model.training

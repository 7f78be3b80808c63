"""Disentanglement scores MIG and SAP, following disentanglement_lib (Locatello et al. 2019).

Codes are [N, D] (one row per input, usually the posterior means) and factors [N, K]; the
library's own arrays are transposed ([D, N]), the arithmetic is the same. The discrete mutual
information is computed from contingency tables with exactly sklearn's ``mutual_info_score``
formula (natural log, nats); SAP's default classifier is sklearn's LinearSVC.

MIG (Chen et al. 2018), ``disentanglement_lib.evaluation.metrics.mig``:
  each code dim is discretised into ``n_bins`` equal-width bins,
  ``np.digitize(c, np.histogram(c, n_bins)[1][:-1])``; I[c_j; v_k] for all pairs; for each
  factor the gap between the two largest MIs divided by H(v_k); mean over factors.

SAP (Kumar et al. 2018), ``disentanglement_lib.evaluation.metrics.sap_score``:
  score matrix S[j, k] = how well code dim j alone predicts factor k; SAP = mean over factors
  of the gap between the two largest S[:, k].
  * continuous factors: R² = cov(c_j, v_k)² / (var c_j · var v_k) on the *training* data
    (np.cov, ddof=1; 0 when var c_j <= 1e-12), as in the library;
  * discrete factors: test-set accuracy of a 1-D linear classifier fitted on the train set.
    The default, ``classifier="linear_svc"``, is the library's
    ``sklearn.svm.LinearSVC(C=0.01, class_weight="balanced")`` (one-vs-rest), so the numbers
    are the published metric's. In 1-D a one-vs-rest linear classifier can only carve the
    line into intervals along its upper envelope, so middle values of a many-valued factor
    may never be predicted: that is part of the metric as defined. ``classifier="centroid"``
    is the closed-form balanced nearest-class-mean classifier, argmax_k (μ_k·c − μ_k²/2)
    (decision boundaries at the midpoints of adjacent class means): deterministic and
    sklearn-free, but not the published number.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal, Optional

import numpy as np
import torch

__all__ = [
    "mig",
    "sap",
    "mutual_info_discrete",
    "discrete_entropy",
    "histogram_discretize",
    "sap_score_matrix",
    "collect_codes",
]


def _as_2d(name: str, array: Any, dtype=np.float64) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    out = np.asarray(array, dtype=dtype)
    if out.ndim == 1:
        out = out[:, None]
    if out.ndim != 2:
        raise ValueError(f"{name} must be [N, D] (one row per sample), got shape {out.shape}")
    return out


def histogram_discretize(codes: Any, n_bins: int = 20) -> np.ndarray:
    """Per code dim, the bin index (1..n_bins) of each value in ``n_bins`` equal-width bins: [N, D] int."""
    c = _as_2d("codes", codes)
    out = np.zeros(c.shape, dtype=np.int64)
    for j in range(c.shape[1]):
        out[:, j] = np.digitize(c[:, j], np.histogram(c[:, j], n_bins)[1][:-1])
    return out


def mutual_info_discrete(a: Any, b: Any) -> float:
    """I(a; b) in nats for two label vectors (sklearn.metrics.mutual_info_score semantics)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label vectors differ in length: {a.shape} vs {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    na, nb = ia.max() + 1, ib.max() + 1
    if na == 1 or nb == 1:
        return 0.0
    counts = np.bincount(ia * nb + ib, minlength=na * nb).reshape(na, nb).astype(np.float64)
    total = counts.sum()
    pi, pj = counts.sum(1), counts.sum(0)
    r, c = np.nonzero(counts)
    nz = counts[r, c]
    mi = (nz / total) * (np.log(nz) - np.log(total) - np.log(pi[r] * pj[c]) + np.log(pi.sum()) + np.log(pj.sum()))
    mi = np.where(np.abs(mi) < np.finfo(np.float64).eps, 0.0, mi)
    return float(max(mi.sum(), 0.0))


def discrete_entropy(labels: Any) -> float:
    """H(v) in nats of a label vector (= I(v; v), as disentanglement_lib computes it)."""
    _, counts = np.unique(np.asarray(labels).ravel(), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def mig(codes: Any, factors: Any, n_bins: int = 20, return_details: bool = False):
    """Mutual Information Gap of codes [N, D] w.r.t. integer factors [N, K]; float in [0, 1].

    Factors that are constant (H = 0) have no defined gap and are left out of the mean (the
    library would return nan); ``details["per_factor"]`` holds nan for them. With
    ``return_details`` returns (score, dict(per_factor [K], mi [D, K], entropy [K],
    top_dims [K] (the code dim with the largest MI per factor))).
    """
    c = histogram_discretize(codes, n_bins)
    v = _as_2d("factors", factors, dtype=np.int64)
    if c.shape[0] != v.shape[0]:
        raise ValueError(f"codes and factors need the same N, got {c.shape[0]} and {v.shape[0]}")
    if c.shape[1] < 2:
        raise ValueError(f"MIG needs at least 2 code dims (a gap between the top two), got {c.shape[1]}")
    m = np.array([[mutual_info_discrete(c[:, j], v[:, k]) for k in range(v.shape[1])] for j in range(c.shape[1])])
    entropy = np.array([discrete_entropy(v[:, k]) for k in range(v.shape[1])])
    sorted_m = np.sort(m, axis=0)[::-1]
    per_factor = np.full(v.shape[1], np.nan)
    defined = entropy > 0
    if not defined.any():
        raise ValueError("MIG is undefined: every factor is constant (zero entropy)")
    per_factor[defined] = (sorted_m[0, defined] - sorted_m[1, defined]) / entropy[defined]
    score = float(np.mean(per_factor[defined]))
    if return_details:
        return score, {"per_factor": per_factor, "mi": m, "entropy": entropy, "top_dims": np.argmax(m, axis=0)}
    return score


def _centroid_accuracy(c_train: np.ndarray, y_train: np.ndarray, c_test: np.ndarray, y_test: np.ndarray) -> float:
    classes = np.unique(y_train)
    if classes.size == 1:
        return float(np.mean(y_test == classes[0]))
    means = np.array([c_train[y_train == k].mean() for k in classes])
    # argmax_k (mu_k c - mu_k^2 / 2) == argmin_k |c - mu_k|; ties go to the first class
    scores = c_test[:, None] * means[None, :] - 0.5 * means[None, :] ** 2
    pred = classes[np.argmax(scores, axis=1)]
    return float(np.mean(pred == y_test))


def _svc_accuracy(c_train: np.ndarray, y_train: np.ndarray, c_test: np.ndarray, y_test: np.ndarray) -> float:
    from sklearn import svm

    if np.unique(y_train).size == 1:
        return float(np.mean(y_test == y_train[0]))
    # disentanglement_lib's settings; with one feature dual="auto" picks the deterministic primal solver
    clf = svm.LinearSVC(C=0.01, class_weight="balanced")
    clf.fit(c_train[:, None], y_train)
    return float(np.mean(clf.predict(c_test[:, None]) == y_test))


def sap_score_matrix(codes_train: Any, factors_train: Any, codes_test: Any, factors_test: Any,
                     continuous_factors: bool = False,
                     classifier: Literal["centroid", "linear_svc"] = "linear_svc") -> np.ndarray:
    """S[j, k] = predictiveness of code dim j for factor k ([D, K]); see the module docstring."""
    ct, vt = _as_2d("codes_train", codes_train), _as_2d("factors_train", factors_train)
    if ct.shape[0] != vt.shape[0]:
        raise ValueError(f"codes_train and factors_train need the same N, got {ct.shape[0]} and {vt.shape[0]}")
    d, k = ct.shape[1], vt.shape[1]
    score = np.zeros((d, k))
    if continuous_factors:
        for j in range(d):
            for f in range(k):
                cov = np.cov(ct[:, j], vt[:, f], ddof=1)
                score[j, f] = cov[0, 1] ** 2 / (cov[0, 0] * cov[1, 1]) if cov[0, 0] > 1e-12 else 0.0
        return score
    if classifier not in ("centroid", "linear_svc"):
        raise ValueError(f"classifier must be 'centroid' or 'linear_svc', got {classifier!r}")
    fit = _centroid_accuracy if classifier == "centroid" else _svc_accuracy
    cs, vs = _as_2d("codes_test", codes_test), _as_2d("factors_test", factors_test)
    if cs.shape[1] != d or vs.shape[1] != k or cs.shape[0] != vs.shape[0]:
        raise ValueError(f"test arrays {cs.shape}, {vs.shape} do not match train arrays {ct.shape}, {vt.shape}")
    for j in range(d):
        for f in range(k):
            score[j, f] = fit(ct[:, j], vt[:, f], cs[:, j], vs[:, f])
    return score


def sap(codes_train: Any, factors_train: Any, codes_test: Any = None, factors_test: Any = None,
        continuous_factors: bool = False, classifier: Literal["centroid", "linear_svc"] = "linear_svc",
        return_details: bool = False):
    """Separated Attribute Predictability: mean over factors of the top-two gap of S[:, k].

    Test arrays are needed for discrete factors only (continuous R² uses the train set, as the
    library does). With ``return_details`` returns (score, dict(per_factor [K], score_matrix [D, K])).
    """
    if not continuous_factors and (codes_test is None or factors_test is None):
        raise ValueError("sap with discrete factors needs codes_test and factors_test (classifier accuracy is measured on them)")
    s = sap_score_matrix(codes_train, factors_train, codes_test, factors_test, continuous_factors, classifier)
    if s.shape[0] < 2:
        raise ValueError(f"SAP needs at least 2 code dims (a gap between the top two), got {s.shape[0]}")
    ordered = np.sort(s, axis=0)
    per_factor = ordered[-1] - ordered[-2]
    score = float(np.mean(per_factor))
    if return_details:
        return score, {"per_factor": per_factor, "score_matrix": s}
    return score


@torch.no_grad()
def collect_codes(model: Any, batches: Iterable[Any], max_samples: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and ground-truth factors over ``batches`` of ``{"image", "factors"}`` dicts.

    Returns (codes [N, D] float64, factors [N, K] int64) for :func:`mig` / :func:`sap`; the
    model runs in eval mode (restored afterwards).
    """
    was_training = getattr(model, "training", False)
    model.eval()
    codes, factors, n = [], [], 0
    try:
        device = next(model.parameters()).device
    except (AttributeError, StopIteration):
        device = None
    try:
        for batch in batches:
            if "factors" not in batch:
                raise KeyError("collect_codes needs batches with ground-truth 'factors' (a shard set written with factors)")
            x = batch["image"] if device is None else batch["image"].to(device)
            mu, _ = model.encode(x)
            codes.append(mu.detach().to("cpu", torch.float64).numpy())
            factors.append(torch.as_tensor(batch["factors"]).cpu().numpy().astype(np.int64))
            n += len(codes[-1])
            if max_samples is not None and n >= max_samples:
                break
    finally:
        model.train(was_training)
    if not codes:
        raise ValueError("collect_codes got no batches")
    c, f = np.concatenate(codes), np.concatenate(factors)
    if max_samples is not None:
        c, f = c[:max_samples], f[:max_samples]
    return c, f

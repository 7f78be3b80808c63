"""FID: Fréchet distance against independent computations, the pure-torch FID Inception's
architecture and parameter names (pytorch-fid's state-dict layout), weights loading, statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

from pipeline.evaluate.fid import (
    FID_WEIGHTS_ENV,
    FID_WEIGHTS_FILE,
    FeatureMoments,
    FIDInceptionE,
    FIDInceptionV3,
    cached_statistics,
    compute_statistics,
    fid_available,
    frechet_distance,
    load_fid_inception,
)


def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


# --- Fréchet distance -------------------------------------------------------------------
def test_frechet_distance_zero_for_identical_stats():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), _spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_direct_computations():
    rng = np.random.default_rng(1)
    mu1, mu2, s1, s2 = rng.standard_normal(24), rng.standard_normal(24), _spd(rng, 24), _spd(rng, 24)
    ours = frechet_distance(mu1, s1, mu2, s2)
    direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert ours == pytest.approx(direct, rel=1e-10)
    # symmetric form Tr((S1^½ S2 S1^½)^½) via eigendecompositions, no sqrtm of a product
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1)
    symmetric = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert ours == pytest.approx(symmetric, rel=1e-8)
    # 1-D closed form: (m1 − m2)² + (s1 − s2)²
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4.0 + 1.0)
    with pytest.raises(ValueError, match="different"):
        frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


# --- the network --------------------------------------------------------------------------
def test_state_dict_has_pytorch_fid_layout():
    model = FIDInceptionV3()
    sd = model.state_dict()
    # 94 BasicConv2d (conv.weight + 5 BatchNorm tensors each) + fc.weight + fc.bias
    assert len(sd) == 94 * 6 + 2
    assert sum(k.endswith(".conv.weight") for k in sd) == 94
    # torchvision inception_v3: 27,161,264 parameters; minus AuxLogits (3,326,696), plus the
    # 8 extra fc classes (8·2048 + 8) of the TF graph's 1008-way head
    assert sum(p.numel() for p in model.parameters()) == 27_161_264 - 3_326_696 + 8 * 2048 + 8
    expected_shapes = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_4a_3x3.bn.running_var": (192,),
        "Mixed_5b.branch5x5_1.bn.running_mean": (48,),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "fc.weight": (1008, 2048),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                        "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                        "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"}
    assert not any("AuxLogits" in k for k in sd)


def _pool_probe(pool):
    """InceptionE whose pool branch copies input channel 0 to its output channel 0 (BN ~identity)."""
    block = FIDInceptionE(4, pool=pool).eval()
    with torch.no_grad():
        block.branch_pool.conv.weight.zero_()
        block.branch_pool.conv.weight[0, 0] = 1.0
    return block


def test_mixed_7b_average_pools_without_padding_and_mixed_7c_max_pools():
    model = FIDInceptionV3()
    assert model.Mixed_7b.pool == "avg" and model.Mixed_7c.pool == "max"
    x = torch.rand(1, 4, 5, 5)
    pool_channel = 320 + 768 + 768  # after branch1x1, branch3x3 (2×384), branch3x3dbl (2×384)
    scale = 1.0 / np.sqrt(1.0 + 1e-3)  # eval-mode BatchNorm with running stats (0, 1), eps 1e-3
    out_max = _pool_probe("max")(x)[0, pool_channel]
    torch.testing.assert_close(out_max, F.max_pool2d(x, 3, 1, 1)[0, 0] * scale)
    out_avg = _pool_probe("avg")(x)[0, pool_channel]
    tf_avg = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)[0, 0]
    torch.testing.assert_close(out_avg, tf_avg * scale)
    assert not torch.allclose(tf_avg, F.avg_pool2d(x, 3, 1, 1)[0, 0])  # the corners differ


def test_random_init_network_gives_2048_features_and_weights_round_trip(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = FIDInceptionV3().eval()
    path = tmp_path / FID_WEIGHTS_FILE
    torch.save(model.state_dict(), path)
    loaded = load_fid_inception(path)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        feats = loaded(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert (feats >= 0).all()  # pool3 of ReLU maps
    # the environment variable, naming either the file or its folder
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(tmp_path))
    assert fid_available() == (True, str(path))
    assert isinstance(load_fid_inception(), FIDInceptionV3)
    # strict: a state dict missing a real weight is refused; a missing BN step counter is not
    state = model.state_dict()
    del state["Conv2d_1a_3x3.bn.num_batches_tracked"]
    torch.save(state, path)
    load_fid_inception(path)
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="Mixed_7c.branch_pool.conv.weight"):
        load_fid_inception(path)


def test_missing_weights_message_names_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_ENV) as err:
        load_fid_inception()
    assert FID_WEIGHTS_FILE in str(err.value)
    ok, message = fid_available()
    assert not ok and FID_WEIGHTS_ENV in message
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_fid_inception()


# --- statistics -----------------------------------------------------------------------------
class _Flatten(torch.nn.Module):
    def forward(self, x):
        return x.flatten(1) * 3.0


def test_compute_statistics_matches_numpy_over_uneven_batches():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (23, 1, 2, 3), dtype=np.uint8)
    batches = [torch.from_numpy(images[:5]), {"image": torch.from_numpy(images[5:17])}, torch.from_numpy(images[17:])]
    mu, sigma = compute_statistics(batches, _Flatten(), batch_size=4)
    feats = images.reshape(23, -1).astype(np.float32) / 255.0 * 3.0
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-7)
    mu8, _ = compute_statistics(batches, _Flatten(), batch_size=4, max_images=8)
    np.testing.assert_allclose(mu8, feats[:8].mean(0), rtol=1e-6)


def test_feature_moments_merge_equals_one_pass():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((50, 4)) + 1e4  # large offset: the merge must not cancel catastrophically
    a, b = FeatureMoments().update(f[:17]), FeatureMoments().update(f[17:])
    mu, sigma = a.merge(b).compute()
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-8)


def test_cached_statistics_writes_once_next_to_manifest(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return np.arange(3.0), np.eye(3)

    mu, sigma = cached_statistics(tmp_path, "valid", 64, compute)
    assert (tmp_path / "fid_stats_valid_64.npz").is_file()
    mu2, sigma2 = cached_statistics(tmp_path / "manifest.json", "valid", 64, compute)
    assert len(calls) == 1
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    cached_statistics(f"file://{tmp_path}", "test", 32, compute)
    assert (tmp_path / "fid_stats_test_32.npz").is_file() and len(calls) == 2
    cached_statistics("s3://bucket/shards", "valid", 64, compute)
    cached_statistics("s3://bucket/shards", "valid", 64, compute)
    assert len(calls) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fid_stats_test_32.npz", "fid_stats_valid_64.npz"]

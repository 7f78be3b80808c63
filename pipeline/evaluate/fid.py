"""Fréchet Inception Distance with the FID InceptionV3, in plain torch (no torchvision).

The network is pytorch-fid's ``fid_inception_v3()``: torchvision's Inception3 layout
(``num_classes=1008``, no aux head) with the blocks patched the way the TensorFlow FID graph
computes them — FIDInceptionA/C/E_1 average-pool without counting the zero padding and
FIDInceptionE_2 (Mixed_7c) max-pools in its pool branch. Module names equal torchvision's,
so the standard ``pt_inception-2015-12-05-6726825d.pth`` state dict loads with ``strict=True``.
Features are the 2048-d pool3 activations after a bilinear resize to 299×299 and the
[0, 1] → [-1, 1] scaling pytorch-fid applies.

Weights are never downloaded: pass a path or set ``VAEPIPE_FID_WEIGHTS``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

__all__ = [
    "FID_WEIGHTS_ENV",
    "FID_WEIGHTS_FILE",
    "FIDInceptionV3",
    "FeatureMoments",
    "frechet_distance",
    "resolve_fid_weights",
    "load_fid_inception",
    "fid_available",
    "compute_statistics",
    "cached_statistics",
    "model_sample_images",
]

FID_WEIGHTS_ENV = "VAEPIPE_FID_WEIGHTS"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


# ---------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------
def _sqrtm(a: np.ndarray) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on singular input; we check finiteness ourselves
        return linalg.sqrtm(a)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """d² = |mu1 − mu2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½), as pytorch-fid's calculate_frechet_distance.

    When the product is singular (sqrtm not finite) ``eps`` is added to both diagonals; an
    imaginary part of the square root larger than 1e-3 on the diagonal is an error (it means the
    covariances are not valid), a smaller one is numerical noise and dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different lengths: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"covariances have different shapes: {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))} in sqrtm(sigma1·sigma2): "
                             "the covariance estimates are not valid (too few images?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------
# FID InceptionV3 (module names = torchvision.models.inception, blocks = pytorch-fid's)
# ---------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, **kwargs: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow's average pool does not count the zero padding
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class FIDInceptionE(nn.Module):
    """InceptionE; ``pool="avg"`` is pytorch-fid's FIDInceptionE_1, ``pool="max"`` its FIDInceptionE_2."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:
            # The FID graph max-pools here (likely a bug in that graph, kept for comparability)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception network; ``forward(images in [0, 1], [N, 3, H, W]) -> pool3 [N, 2048]``.

    ``fc`` (2048 → 1008) is kept only so the reference state dict loads strictly; it is not
    used for the features.
    """

    FEATURE_DIM = 2048

    def __init__(self, resize_input: bool = True, normalize_input: bool = True) -> None:
        super().__init__()
        self.resize_input, self.normalize_input = resize_input, normalize_input
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, 1008)

    _TRUNK = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
              "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
              "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FID Inception expects images [N, 3, H, W] (or 1 channel) in [0, 1], got {list(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.resize_input:
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        if self.normalize_input:
            x = 2 * x - 1
        for name in self._TRUNK:
            x = getattr(self, name)(x)
        return torch.flatten(x, 1)


def resolve_fid_weights(path: Optional[str | os.PathLike] = None) -> Path:
    """The weights file: ``path`` or $VAEPIPE_FID_WEIGHTS (a file, or a folder holding the standard file)."""
    source = "argument" if path is not None else FID_WEIGHTS_ENV
    raw = path if path is not None else os.environ.get(FID_WEIGHTS_ENV)
    if not raw:
        raise FileNotFoundError(
            f"FID needs the Inception weights file {FID_WEIGHTS_FILE} (pytorch-fid's FID_WEIGHTS_URL); "
            f"nothing is downloaded: copy it to this machine and set {FID_WEIGHTS_ENV}=/path/to/{FID_WEIGHTS_FILE} "
            "or pass its path")
    p = Path(raw).expanduser()
    if p.is_dir():
        p = p / FID_WEIGHTS_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"FID Inception weights not found at {p} (from {source}); expected the file {FID_WEIGHTS_FILE}: "
            f"set {FID_WEIGHTS_ENV} to its path (or a folder containing it)")
    return p


def load_fid_inception(path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """FIDInceptionV3 with weights from ``path`` / $VAEPIPE_FID_WEIGHTS (strict), eval mode, no grad."""
    weights = resolve_fid_weights(path)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = FIDInceptionV3()
    # BatchNorm's step counter is bookkeeping, not a weight: files saved before it existed lack it
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    model.load_state_dict(state, strict=True)
    model.requires_grad_(False)
    return model.eval().to(device)


def fid_available(path: Optional[str | os.PathLike] = None) -> tuple[bool, str]:
    """(True, the weights path) when FID can run, else (False, what is missing and how to fix it)."""
    try:
        return True, str(resolve_fid_weights(path))
    except FileNotFoundError as err:
        return False, str(err)


# ---------------------------------------------------------------------------------------
# Feature statistics
# ---------------------------------------------------------------------------------------
class FeatureMoments:
    """Streaming mean and covariance of feature rows in float64 (Chan et al.'s pairwise merge).

    Exact and numerically stable (no E[xxᵀ] − E[x]E[x]ᵀ cancellation); ``merge`` combines two
    partial results, e.g. from different workers.
    """

    def __init__(self, dim: Optional[int] = None) -> None:
        self.n = 0
        self.mean = None if dim is None else np.zeros(dim)
        self.m2 = None if dim is None else np.zeros((dim, dim))

    def update(self, feats: Any) -> "FeatureMoments":
        f = feats.detach().to("cpu", torch.float64).numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, np.float64)
        f = f.reshape(f.shape[0], -1)
        if f.shape[0] == 0:
            return self
        other = FeatureMoments()
        other.n, other.mean = f.shape[0], f.mean(0)
        centred = f - other.mean
        other.m2 = centred.T @ centred
        return self.merge(other)

    def merge(self, other: "FeatureMoments") -> "FeatureMoments":
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.copy(), other.m2.copy()
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean = self.mean + delta * (other.n / n)
        self.n = n
        return self

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [F], sigma [F, F]) with sigma = np.cov(features, rowvar=False) (ddof=1), as pytorch-fid."""
        if self.n < 2:
            raise ValueError(f"FID statistics need at least 2 images, got {self.n}")
        return self.mean.copy(), self.m2 / (self.n - 1)


def _to_unit_float(images: Any) -> torch.Tensor:
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.float()


@torch.no_grad()
def compute_statistics(images_iter: Iterable[Any], model: Callable[[torch.Tensor], torch.Tensor],
                       batch_size: int = 50, device: Optional[str | torch.device] = None,
                       max_images: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64) of ``model`` features over all images of ``images_iter``.

    Items may be image tensors [B, C, H, W] (float in [0, 1] or uint8) or batch dicts with an
    ``"image"`` key; they are re-chunked to ``batch_size`` for the feature network.
    """
    if device is None:
        try:
            device = next(model.parameters()).device  # type: ignore[union-attr]
        except (AttributeError, StopIteration):
            device = "cpu"
    moments, seen = FeatureMoments(), 0
    for item in images_iter:
        images = _to_unit_float(item["image"] if isinstance(item, dict) else item)
        if max_images is not None:
            images = images[: max_images - seen]
        for start in range(0, images.shape[0], batch_size):
            chunk = images[start:start + batch_size].to(device)
            moments.update(model(chunk))
        seen += images.shape[0]
        if max_images is not None and seen >= max_images:
            break
    return moments.compute()


def _is_remote(url: str) -> bool:
    return "://" in str(url) and not str(url).startswith("file://")


def cached_statistics(manifest_dir: str | os.PathLike, split: str, key: Any,
                      compute_fn: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics of a shard set, cached as ``fid_stats_<split>_<key>.npz`` beside its manifest.

    ``key`` is the resolution the images were scored at (any short token works). Local folders
    and ``file://`` URLs are cached (written atomically); remote stores (``s3://``) are never
    written to: the statistics are just computed.
    """
    if _is_remote(str(manifest_dir)):
        return compute_fn()
    folder = Path(str(manifest_dir).removeprefix("file://"))
    if folder.name == "manifest.json":
        folder = folder.parent
    path = folder / f"fid_stats_{split}_{key}.npz"
    if path.is_file():
        with np.load(path) as data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    mu, sigma = compute_fn()
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, mu=mu, sigma=sigma)
    os.replace(tmp, path)
    return mu, sigma


def model_sample_images(vae: Any, num_samples: int, batch_size: int = 50) -> Iterable[torch.Tensor]:
    """Yield ``num_samples`` images from ``vae.sample`` in batches: feed to :func:`compute_statistics`."""
    done = 0
    while done < num_samples:
        n = min(batch_size, num_samples - done)
        yield vae.sample(n).clamp(0, 1)
        done += n

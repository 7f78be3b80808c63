"""A synthetic, CelebA-format face data set with known ground-truth factors.

Real CelebA cannot be downloaded here, and even where it can, it has no ground truth for
disentanglement metrics. These procedurally drawn faces stand in for it: they are written in
exactly CelebA's on-disk layout (so the real reader, shard writer and streamer are exercised
end to end) and carry a ``factors.csv`` of independent discrete generative factors, which
MIG / DCI / FactorVAE scores need.

Every image is drawn from its own RNG seeded by ``(seed, index)``, so the output does not
depend on how the work is split over processes.
"""

from __future__ import annotations

import logging
import os
import random
from multiprocessing import get_context
from pathlib import Path

from PIL import Image, ImageDraw

from pipeline.data import progress_bar

log = logging.getLogger(__name__)

WIDTH, HEIGHT = 178, 218  # CelebA's aligned-and-cropped size
_SUPERSAMPLE = 2  # draw at 2x and downsample: cheap antialiasing for PIL's aliased shapes

CELEBA_ATTR_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
    "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
    "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
    "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
    "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
).split()

# Ground-truth factors: name -> number of levels. All independent and uniform.
FACTORS = {
    "face_hue": 4,  # pale, light, tan, dark skin
    "hair_color": 4,  # black, blond, brown, gray
    "background": 4,
    "pos_x": 3,  # face shifted left / centred / right
    "scale": 3,  # face size
    "smile": 2,
    "eyeglasses": 2,
}
_SKIN = [(245, 225, 215), (230, 190, 160), (200, 150, 110), (130, 90, 60)]
_HAIR = [(25, 20, 20), (230, 200, 110), (110, 70, 35), (160, 160, 165)]
_HAIR_ATTR = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"]
_BACKGROUND = [(70, 110, 180), (200, 200, 195), (90, 150, 90), (180, 80, 80)]
_POS_X = [-14, 0, 14]
_SCALE = [0.82, 1.0, 1.18]
# Marginals of a few real CelebA attributes, so random ones look like CelebA's imbalance.
_PREVALENCE = {"No_Beard": 0.83, "Young": 0.77, "Attractive": 0.51, "Mouth_Slightly_Open": 0.48,
               "High_Cheekbones": 0.45, "Male": 0.42, "Heavy_Makeup": 0.39, "Wavy_Hair": 0.32}


def sample_factors(rng: random.Random) -> dict[str, int]:
    """Draw every factor independently and uniformly over its levels."""
    return {name: rng.randrange(levels) for name, levels in FACTORS.items()}


def attrs_from_factors(factors: dict[str, int], rng: random.Random) -> dict[str, int]:
    """CelebA attributes (+1/-1): those a factor decides follow it, the rest are random.

    Random attributes carry no visual signal; they exist so attribute-conditioned code sees
    all 40 columns with CelebA-like imbalance.
    """
    attrs = {name: 1 if rng.random() < _PREVALENCE.get(name, 0.15) else -1 for name in CELEBA_ATTR_NAMES}
    for i, name in enumerate(_HAIR_ATTR):
        attrs[name] = 1 if factors["hair_color"] == i else -1
    attrs["Smiling"] = 1 if factors["smile"] else -1
    attrs["Eyeglasses"] = 1 if factors["eyeglasses"] else -1
    attrs["Pale_Skin"] = 1 if factors["face_hue"] == 0 else -1
    attrs["Bald"] = -1  # every face has hair
    return attrs


def _jitter(color: tuple, rng: random.Random, amount: int = 10) -> tuple:
    """Small within-level colour noise so a factor level is a cluster, not a single point."""
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def render_face(factors: dict[str, int], rng: random.Random) -> Image.Image:
    """Draw one 178x218 face: background, hair, face, eyes, nose, mouth, optional glasses."""
    k = _SUPERSAMPLE
    img = Image.new("RGB", (WIDTH * k, HEIGHT * k), _jitter(_BACKGROUND[factors["background"]], rng))
    draw = ImageDraw.Draw(img)
    s = _SCALE[factors["scale"]] * k
    cx, cy = (WIDTH / 2 + _POS_X[factors["pos_x"]]) * k, (HEIGHT / 2 + 8) * k
    hair = _jitter(_HAIR[factors["hair_color"]], rng)
    draw.ellipse([cx - 54 * s, cy - 78 * s, cx + 54 * s, cy + 30 * s], fill=hair)  # hair behind face
    draw.ellipse([cx - 44 * s, cy - 56 * s, cx + 44 * s, cy + 58 * s], fill=_jitter(_SKIN[factors["face_hue"]], rng))
    draw.chord([cx - 46 * s, cy - 80 * s, cx + 46 * s, cy - 10 * s], 180, 360, fill=hair)  # fringe
    for side in (-1, 1):
        ex, ey = cx + side * 17 * s, cy - 4 * s
        draw.ellipse([ex - 8 * s, ey - 5 * s, ex + 8 * s, ey + 5 * s], fill=(250, 250, 250))
        draw.ellipse([ex - 3.5 * s, ey - 3.5 * s, ex + 3.5 * s, ey + 3.5 * s], fill=(40, 30, 30))
        if factors["eyeglasses"]:
            draw.ellipse([ex - 13 * s, ey - 11 * s, ex + 13 * s, ey + 11 * s], outline=(20, 20, 20), width=int(3 * k))
    if factors["eyeglasses"]:
        draw.line([cx - 4 * s, cy - 4 * s, cx + 4 * s, cy - 4 * s], fill=(20, 20, 20), width=int(3 * k))
    draw.line([cx, cy + 2 * s, cx - 4 * s, cy + 18 * s, cx + 2 * s, cy + 19 * s], fill=(120, 70, 60), width=int(2 * k))
    lips = (170, 60, 70)
    if factors["smile"]:
        draw.arc([cx - 18 * s, cy + 14 * s, cx + 18 * s, cy + 38 * s], 15, 165, fill=lips, width=int(4 * k))
    else:
        draw.line([cx - 13 * s, cy + 32 * s, cx + 13 * s, cy + 32 * s], fill=lips, width=int(4 * k))
    return img.reduce(k)  # box-average k x k blocks: exact antialiasing for an integer factor


def split_of(index: int, n: int) -> int:
    """CelebA-style contiguous partition: first 80% train (0), next 10% valid (1), rest test (2)."""
    if index < round(0.8 * n):
        return 0
    return 1 if index < round(0.9 * n) else 2


def _render_chunk(args: tuple) -> list[tuple[str, dict, dict]]:
    """Pool task: draw and save images ``start..stop-1``; return their (id, factors, attrs)."""
    img_dir, seed, start, stop = args
    rows = []
    for i in range(start, stop):
        rng = random.Random(f"vaepipe-synth-{seed}-{i}")
        factors = sample_factors(rng)
        attrs = attrs_from_factors(factors, rng)
        image_id = f"{i + 1:06d}.jpg"
        render_face(factors, rng).save(os.path.join(img_dir, image_id), quality=95)
        rows.append((image_id, factors, attrs))
    return rows


def _write_annotations(out: Path, rows: list, n: int) -> None:
    """Write list_attr_celeba.txt, list_eval_partition.txt and factors.csv in CelebA's formats."""
    attr_lines = [str(n), " ".join(CELEBA_ATTR_NAMES)]
    attr_lines += [image_id + "".join(f" {attrs[a]:2d}" for a in CELEBA_ATTR_NAMES) for image_id, _, attrs in rows]
    (out / "list_attr_celeba.txt").write_text("\n".join(attr_lines) + "\n")
    parts = [f"{image_id} {split_of(i, n)}" for i, (image_id, _, _) in enumerate(rows)]
    (out / "list_eval_partition.txt").write_text("\n".join(parts) + "\n")
    factor_lines = ["image_id," + ",".join(FACTORS)]
    factor_lines += [image_id + "," + ",".join(str(f[name]) for name in FACTORS) for image_id, f, _ in rows]
    (out / "factors.csv").write_text("\n".join(factor_lines) + "\n")


def generate_synthetic_celeba(out_dir, n: int, seed: int = 0, workers: int | None = None,
                              progress: bool = True) -> Path:
    """Write ``n`` synthetic faces to ``out_dir`` in CelebA's layout and return the folder.

    Layout: ``img_align_celeba/000001.jpg...`` (178x218 JPEG), ``list_attr_celeba.txt``,
    ``list_eval_partition.txt`` and ``factors.csv`` (``image_id,<factor names>``). The same
    ``seed`` gives byte-identical output for any ``workers``.
    """
    if n < 1:
        raise ValueError(f"n={n}: the synthetic data set needs at least 1 image")
    out = Path(out_dir)
    img_dir = out / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    chunk = max(1, min(250, -(-n // (workers * 4))))
    tasks = [(str(img_dir), seed, start, min(n, start + chunk)) for start in range(0, n, chunk)]
    rows: list = []
    pool = get_context().Pool(workers) if workers > 1 else None  # before the bar: never fork its thread
    try:
        parts = pool.imap(_render_chunk, tasks) if pool else map(_render_chunk, tasks)  # both keep order
        with progress_bar(progress, n, "synth faces") as advance:
            for part in parts:
                rows += part
                advance(len(part))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    _write_annotations(out, rows, n)
    log.info("wrote %d synthetic CelebA images to %s", n, out)
    return out

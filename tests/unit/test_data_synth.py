"""Synthetic CelebA generation and the CelebA reader (folder, zip and HQ-style layouts)."""

from __future__ import annotations

import csv
import pickle
import zipfile
from collections import defaultdict

import pytest
from PIL import Image

from pipeline.data.celeba import center_crop_resize, open_celeba
from pipeline.data.splits import ratio_splits
from pipeline.data.synth import CELEBA_ATTR_NAMES, FACTORS, generate_synthetic_celeba

try:
    from tests.data_fixtures import N_IMAGES, copy_tree, synth_dir  # noqa: F401  (fixture)
except ImportError:  # tests/ itself on sys.path
    from data_fixtures import N_IMAGES, copy_tree, synth_dir  # noqa: F401

EXPECTED_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
    "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
    "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
    "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
    "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young"
)


def _factors(folder):
    with open(folder / "factors.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_synth_writes_celeba_layout(synth_dir):
    lines = (synth_dir / "list_attr_celeba.txt").read_text().splitlines()
    assert lines[0] == str(N_IMAGES)
    assert lines[1] == EXPECTED_NAMES and len(lines[1].split()) == 40
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == [f"{i:06d}.jpg" for i in range(1, N_IMAGES + 1)]
    assert all(len(r) == 41 and set(r[1:]) <= {"1", "-1"} for r in rows)

    images = sorted((synth_dir / "img_align_celeba").iterdir())
    assert len(images) == N_IMAGES
    with Image.open(images[0]) as img:
        assert img.format == "JPEG" and img.size == (178, 218) and img.mode == "RGB"

    parts = [line.split() for line in (synth_dir / "list_eval_partition.txt").read_text().splitlines()]
    counts = defaultdict(int)
    for _, split in parts:
        counts[split] += 1
    assert dict(counts) == {"0": 96, "1": 12, "2": 12}


def test_factors_cover_every_level_and_drive_attributes(synth_dir):
    rows = _factors(synth_dir)
    assert list(rows[0]) == ["image_id", *FACTORS] and len(FACTORS) >= 6
    for name, levels in FACTORS.items():
        assert {int(r[name]) for r in rows} == set(range(levels)), name
    attrs = {line.split()[0]: dict(zip(CELEBA_ATTR_NAMES, map(int, line.split()[1:])))
             for line in (synth_dir / "list_attr_celeba.txt").read_text().splitlines()[2:]}
    hair_attr = ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"]
    for r in rows:
        a = attrs[r["image_id"]]
        assert a["Smiling"] == (1 if r["smile"] == "1" else -1)
        assert a["Eyeglasses"] == (1 if r["eyeglasses"] == "1" else -1)
        assert a["Pale_Skin"] == (1 if r["face_hue"] == "0" else -1)
        assert [a[h] for h in hair_attr].count(1) == 1 and a[hair_attr[int(r["hair_color"])]] == 1


def test_synth_is_deterministic_for_any_worker_count(tmp_path):
    one = generate_synthetic_celeba(tmp_path / "a", 12, seed=3, workers=1, progress=False)
    two = generate_synthetic_celeba(tmp_path / "b", 12, seed=3, workers=2, progress=False)
    other = generate_synthetic_celeba(tmp_path / "c", 12, seed=4, workers=1, progress=False)
    for name in ("list_attr_celeba.txt", "factors.csv", "img_align_celeba/000007.jpg"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert (one / "factors.csv").read_text() != (other / "factors.csv").read_text()


def test_open_celeba_folder(synth_dir):
    src = open_celeba(synth_dir)
    assert len(src) == N_IMAGES and src.attr_names == EXPECTED_NAMES.split()
    assert src.factor_names == list(FACTORS)
    records = list(src.records())
    assert records[0].image_id == "000001.jpg" and records[0].split == "train" and records[-1].split == "test"
    assert set(records[0].attrs.values()) <= {0, 1} and len(records[0].attrs) == 40
    assert records[0].factors == {k: int(v) for k, v in _factors(synth_dir)[0].items() if k != "image_id"}
    img = src.load_image("000001.jpg")
    assert img.mode == "RGB" and img.size == (178, 218)


def test_open_celeba_zip_matches_folder_and_pickles(synth_dir, tmp_path):
    zipped = tmp_path / "zipped"
    zipped.mkdir()
    for name in ("list_attr_celeba.txt", "list_eval_partition.txt"):
        (zipped / name).write_bytes((synth_dir / name).read_bytes())
    with zipfile.ZipFile(zipped / "img_align_celeba.zip", "w") as zf:
        for p in sorted((synth_dir / "img_align_celeba").iterdir()):
            zf.write(p, f"img_align_celeba/{p.name}")  # nested, like the official zip
    src, ref = open_celeba(zipped), open_celeba(synth_dir)
    assert src.layout == "zip" and len(src) == len(ref) and src.factor_names == []
    assert [r.split for r in src.records()] == [r.split for r in ref.records()]
    assert src.load_image("000005.jpg").tobytes() == ref.load_image("000005.jpg").tobytes()
    clone = pickle.loads(pickle.dumps(src))  # handle dropped, reopened lazily
    assert clone.load_image("000006.jpg").size == (178, 218)


def test_open_celeba_hq_style_folder(tmp_path):
    hq = tmp_path / "hq"
    hq.mkdir()
    for i in range(30):
        Image.new("RGB", (48, 48), (i * 8, 100, 50)).save(hq / f"{i}.png")
    src = open_celeba(hq)
    assert src.layout == "hq" and len(src) == 30 and src.attr_names == []
    # no partition file: the default rule is ratios 0.8/0.1/0.1 by image-id hash, 24/3/3 here
    assert src.split_rule.kind == "ratios" and src.split_rule.chosen_by == "default"
    expected = ratio_splits([f"{i}.png" for i in range(30)], (0.8, 0.1, 0.1))
    assert {r.image_id: r.split for r in src.records()} == expected
    assert sorted(expected.values()).count("train") == 24
    assert src.load_image("3.png").size == (48, 48)
    # Attributes are picked up when an attribute file sits beside the images.
    (hq / "list_attr_celeba.txt").write_text("30\nSmiling Young\n" + "".join(f"{i}.png 1 -1\n" for i in range(30)))
    rec = next(open_celeba(hq).records())
    assert rec.attrs == {"Smiling": 1, "Young": 0}


def test_open_celeba_names_missing_file(synth_dir, tmp_path):
    broken = copy_tree(synth_dir, tmp_path / "broken")
    (broken / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"):
        open_celeba(broken)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no img_align_celeba/, img_align_celeba.zip or image files"):
        open_celeba(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        open_celeba(tmp_path / "nowhere")


def test_center_crop_resize_takes_the_middle_square():
    img = Image.new("RGB", (178, 218), (255, 0, 0))
    img.paste((0, 0, 255), (0, 20, 178, 198))  # the central 178x178 square is blue
    out = center_crop_resize(img, 64)
    assert out.size == (64, 64)
    assert set(out.getdata()) == {(0, 0, 255)}

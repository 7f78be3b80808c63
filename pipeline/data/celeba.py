"""Reader for CelebA as distributed, and for CelebA-HQ-style folders of square images.

Three layouts are recognised under one local folder:

* ``img_align_celeba/`` + ``list_attr_celeba.txt`` + ``list_eval_partition.txt``
  (the official download, unzipped; also what ``synth.generate_synthetic_celeba`` writes);
* the same with ``img_align_celeba.zip`` left zipped (200k small files are slow to unpack on
  network filesystems, so reading members straight from the zip is worth supporting);
* a CelebA-HQ-style folder: image files directly in the folder, attributes from
  ``list_attr_celeba.txt`` / ``CelebAMask-HQ-attribute-anno.txt`` if present.

Which image lands in which split is a ``pipeline.data.splits`` rule: the one passed in, else
the source's own ``list_eval_partition.txt``, else (plain folders) ratios 0.8/0.1/0.1 by a
hash of the file name.

An optional ``factors.csv`` (synthetic data) adds ground-truth factors to each record.
``CelebASource`` pickles (the zip handle is reopened lazily in each process) so the shard
writer can hand it to a multiprocessing Pool.
"""

from __future__ import annotations

import csv
import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from pipeline.data import storage
from pipeline.data.splits import PARTITION_FILE, SplitRule, assign_splits, default_rule, portable_location

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
_ATTR_FILES = ("list_attr_celeba.txt", "CelebAMask-HQ-attribute-anno.txt")
_HINT = ("download it from the CelebA page (Anno/ and Eval/ folders) or generate a synthetic "
         "set with `vaepipe data synth`")


@dataclass(frozen=True)
class Record:
    """One image of the source: id (file name), split, 0/1 attributes, ground-truth factors."""

    image_id: str
    split: str
    attrs: dict
    factors: Optional[dict]


def center_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Centre square crop to the shorter side, then resize to ``resolution`` (Lanczos).

    For aligned CelebA (178x218) this is the usual 178x178 centre crop.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != resolution:
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img


def read_attr_table(path: Path) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Parse CelebA's attribute file (count line, names line, ``id v1 v2...`` with +-1) to 0/1."""
    lines = path.read_text().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path} is not a CelebA attribute file: expected a count line and a names line")
    names = lines[1].split()
    table = {}
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != len(names) + 1:
            raise ValueError(f"{path}:{lineno}: expected an id and {len(names)} values, got {len(parts)} fields")
        table[parts[0]] = {n: int(int(v) > 0) for n, v in zip(names, parts[1:])}
    return names, table


def read_factors(path: Path) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Parse ``factors.csv`` (``image_id,<factor names>``, integer levels)."""
    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header or header[0] != "image_id":
            raise ValueError(f"{path}: first column must be 'image_id', got header {header}")
        names = header[1:]
        table = {row[0]: {n: int(v) for n, v in zip(names, row[1:])} for row in reader if row}
    return names, table


class CelebASource:
    """An opened CelebA-layout source: annotations in memory, images read on demand."""

    def __init__(self, root: Path, layout: str, records: list[Record], attr_names: list[str],
                 factor_names: list[str], zip_members: Optional[dict[str, str]] = None,
                 split_rule: Optional[SplitRule] = None):
        self.root, self.layout, self.split_rule = root, layout, split_rule
        self.attr_names, self.factor_names = attr_names, factor_names
        self._records = records
        self._zip_members = zip_members
        self._zip: Optional[zipfile.ZipFile] = None
        self._zip_pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"CelebASource({self.describe()}, {len(self)} images)"

    def describe(self) -> str:
        """Where the images come from, for the shard manifest: the layout and the folder named
        relative to the working directory (or by its base name), never by a machine's absolute path."""
        return f"{self.layout}:{portable_location(self.root)}"

    def records(self) -> Iterator[Record]:
        """All records in id order."""
        return iter(self._records)

    def __getstate__(self):
        # An open ZipFile neither pickles nor survives a fork safely (shared file offset).
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state

    def _read_member(self, image_id: str) -> bytes:
        """Bytes of one image from the zip, opening the zip once per process."""
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.root / "img_align_celeba.zip")
            self._zip_pid = os.getpid()
        member = self._zip_members.get(image_id)
        if member is None:
            raise FileNotFoundError(f"{image_id} is not in {self.root / 'img_align_celeba.zip'}")
        return self._zip.read(member)

    def load_image(self, image_id: str) -> Image.Image:
        """Decode one image to RGB. Raises OSError / PIL errors for missing or corrupt files."""
        if self.layout == "zip":
            data = self._read_member(image_id)
            img = Image.open(io.BytesIO(data))
        else:
            folder = self.root / "img_align_celeba" if self.layout == "folder" else self.root
            img = Image.open(folder / image_id)
        with img:
            return img.convert("RGB")  # convert() forces the full decode, so corruption shows here


def _require(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}: {_HINT}")
    return path


def _zip_members(zip_path: Path) -> dict[str, str]:
    """Map image file name -> member path (the official zip nests them in img_align_celeba/)."""
    with zipfile.ZipFile(zip_path) as zf:
        return {os.path.basename(m): m for m in zf.namelist() if m.lower().endswith(IMAGE_EXTS)}


def _build_records(ids: list[str], rule: SplitRule, attrs: dict, factors: Optional[dict]) -> list[Record]:
    splits = assign_splits(ids, rule)
    return [Record(i, splits[i], attrs.get(i, {}), factors.get(i) if factors is not None else None) for i in ids]


def _open_celeba_layout(root: Path, rule: Optional[SplitRule], factor_names: list, factors) -> CelebASource:
    """img_align_celeba/ or .zip: every image of the attribute table; CelebA's partition by default."""
    layout = "folder" if (root / "img_align_celeba").is_dir() else "zip"
    attr_names, attrs = read_attr_table(_require(root / "list_attr_celeba.txt"))
    if rule is None:
        _require(root / PARTITION_FILE)
        rule = default_rule(root)
    members = _zip_members(root / "img_align_celeba.zip") if layout == "zip" else None
    records = _build_records(sorted(attrs), rule, attrs, factors)
    return CelebASource(root, layout, records, attr_names, factor_names, members, rule)


def _open_image_folder(root: Path, rule: Optional[SplitRule], factor_names: list, factors) -> CelebASource:
    """A folder of image files (CelebA-HQ, FFHQ, digits); attributes if an attribute file is there."""
    ids = sorted(p.name for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not ids:
        raise FileNotFoundError(f"no img_align_celeba/, img_align_celeba.zip or image files in {root}: {_HINT}")
    attr_names, attrs = [], {}
    for name in _ATTR_FILES:
        if (root / name).is_file():
            attr_names, attrs = read_attr_table(root / name)
            break
    rule = rule or default_rule(root)
    return CelebASource(root, "hq", _build_records(ids, rule, attrs, factors), attr_names, factor_names, None, rule)


def open_celeba(source, split_rule: Optional[SplitRule] = None) -> CelebASource:
    """Open a CelebA, zipped-CelebA or CelebA-HQ-style folder (local path or ``file://``).

    ``split_rule`` (``pipeline.data.splits``) overrides the default: the folder's own
    ``list_eval_partition.txt``, else (plain image folders only) ratios 0.8/0.1/0.1.
    """
    root = Path(storage.local_path(os.fspath(source)))
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA source {source} is not a folder: pass the folder holding "
                                "img_align_celeba/ (or .zip) and the list_*.txt files")
    factor_names, factors = ([], None)
    if (root / "factors.csv").is_file():
        factor_names, factors = read_factors(root / "factors.csv")
    if (root / "img_align_celeba").is_dir() or (root / "img_align_celeba.zip").is_file():
        return _open_celeba_layout(root, split_rule, factor_names, factors)
    return _open_image_folder(root, split_rule, factor_names, factors)

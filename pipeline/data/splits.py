"""Which image goes to train, valid or test: the split rules of ``vaepipe data shard``.

A rule is one of

* ``partition``: a file in CelebA's ``list_eval_partition.txt`` format (``<image id> 0|1|2``);
  every image of the source must be listed (ids in the file but not in the source are ignored);
* ``ratios``: train/valid/test fractions. Images are ordered by a hash of their id and cut
  into consecutive runs, so the counts are exact (valid and test are rounded, train takes
  the rest) and re-runs agree; adding images moves only a few across a boundary;
* ``all``: the whole source is one split (e.g. a held-out set sharded on its own).

Defaults (``default_rule``): the source's own ``list_eval_partition.txt`` when it has one
(always for CelebA), otherwise ratios 0.8/0.1/0.1.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SPLITS = ("train", "valid", "test")
DEFAULT_RATIOS = (0.8, 0.1, 0.1)
PARTITION_FILE = "list_eval_partition.txt"
_LISTED_MISSING = 5


@dataclass(frozen=True)
class SplitRule:
    """One split rule; ``chosen_by`` says whether the user asked for it or it is the default."""

    kind: str  # "partition" | "ratios" | "all"
    path: Optional[str] = None  # partition: the file
    ratios: Optional[tuple[float, float, float]] = None
    split: Optional[str] = None  # all: the one split
    chosen_by: str = "user"

    def to_manifest(self) -> dict:
        """JSON for the manifest; a partition file is named without the machine's absolute path."""
        out: dict = {"kind": self.kind, "chosen_by": self.chosen_by}
        if self.kind == "partition":
            out["file"] = portable_location(self.path)
        elif self.kind == "ratios":
            out["ratios"] = list(self.ratios)
        else:
            out["split"] = self.split
        return out


def describe_rule(rule: Optional[dict]) -> str:
    """One line for people, from a manifest's ``split_rule``."""
    if not rule:
        return "not recorded (shard set written before split rules were recorded)"
    by = " (default)" if rule.get("chosen_by") == "default" else ""
    if rule["kind"] == "partition":
        return f"partition file {rule['file']}{by}"
    if rule["kind"] == "ratios":
        return f"ratios train/valid/test {'/'.join(f'{r:g}' for r in rule['ratios'])} by image-id hash{by}"
    return f"all images -> {rule['split']}{by}"


def portable_location(path) -> str:
    """``path`` without this machine's absolute prefix: relative to the working directory when
    inside it, else the base name; ``s3://`` URLs as given."""
    text = os.fspath(path)
    if text.startswith("s3://"):
        return text
    local = Path(text[len("file://"):] if text.startswith("file://") else text).resolve()
    try:
        rel = local.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return local.name
    return rel if rel != "." else local.name


def parse_ratios(text: str, flag: str = "--split-ratios") -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1): three non-negative numbers summing to 1."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    ok = len(values) == 3 and all(math.isfinite(v) and v >= 0 for v in values) and abs(sum(values) - 1) < 1e-6
    if not ok:
        raise ValueError(f"{flag} {text!r}: give three non-negative numbers train,valid,test that sum to 1, "
                         "e.g. 0.8,0.1,0.1")
    return values


def parse_all(text: str, flag: str = "--split") -> str:
    """``"all=test"`` -> ``"test"``."""
    name, _, split = text.partition("=")
    if name != "all" or split not in SPLITS:
        raise ValueError(f"{flag} {text!r}: give all=train, all=valid or all=test")
    return split


def rule_from_flags(split: Optional[str], ratios: Optional[str], partition: Optional[str]) -> Optional[SplitRule]:
    """The rule the shard command's flags ask for (at most one flag), or None for the default."""
    given = [f for f, v in (("--split", split), ("--split-ratios", ratios), ("--partition", partition)) if v]
    if len(given) > 1:
        raise ValueError(f"{' and '.join(given)} were both given: choose one split rule")
    if split:
        return SplitRule("all", split=parse_all(split))
    if ratios:
        return SplitRule("ratios", ratios=parse_ratios(ratios))
    if partition:
        if not Path(partition).is_file():
            raise FileNotFoundError(f"--partition {partition}: no such file")
        return SplitRule("partition", path=os.fspath(partition))
    return None


def default_rule(root: Path) -> SplitRule:
    """The source's own partition file if it has one, else ratios 0.8/0.1/0.1."""
    if (root / PARTITION_FILE).is_file():
        return SplitRule("partition", path=os.fspath(root / PARTITION_FILE), chosen_by="default")
    return SplitRule("ratios", ratios=DEFAULT_RATIOS, chosen_by="default")


def read_partition(path) -> dict[str, str]:
    """Parse ``list_eval_partition.txt`` (``000001.jpg 0``) to ``{id: "train"|"valid"|"test"}``."""
    out = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise ValueError(f"{path}:{lineno}: expected '<image id> 0|1|2', got {line!r}")
        out[parts[0]] = SPLITS[int(parts[1])]
    return out


def ratio_splits(ids: list[str], ratios) -> dict[str, str]:
    """Order ids by hash and cut: valid*n and test*n images rounded half up, the rest train."""
    n = len(ids)
    n_valid, n_test = (math.floor(r * n + 0.5) for r in ratios[1:])
    n_train = n - n_valid - n_test
    if n_train < 0:  # both rounded up past n (tiny n)
        n_test += n_train
        n_train = 0
    ordered = sorted(ids, key=lambda i: (hashlib.sha1(i.encode()).hexdigest(), i))
    return {i: "train" if k < n_train else ("valid" if k < n_train + n_valid else "test")
            for k, i in enumerate(ordered)}


def assign_splits(ids: list[str], rule: SplitRule) -> dict[str, str]:
    """``{id: split}`` for every id under ``rule``; a partition missing ids is an error naming them."""
    if rule.kind == "all":
        return {i: rule.split for i in ids}
    if rule.kind == "ratios":
        return ratio_splits(ids, rule.ratios)
    table = read_partition(rule.path)
    missing = [i for i in ids if i not in table]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of the source are not in the partition file "
                         f"{portable_location(rule.path)}, e.g. {', '.join(missing[:_LISTED_MISSING])}: "
                         "list every image, or use --split-ratios / --split all=<split>")
    return {i: table[i] for i in ids}


def split_counts(splits: dict[str, str]) -> dict[str, int]:
    """Images per split, in train/valid/test order."""
    return {s: sum(1 for v in splits.values() if v == s) for s in SPLITS}

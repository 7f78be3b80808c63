"""Split rules of `vaepipe data shard`: all=<split>, ratios, partition files, defaults, manifest."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.data.celeba import open_celeba
from pipeline.data.shards import write_shards
from pipeline.data.splits import SplitRule, parse_ratios, rule_from_flags

try:
    from tests.data_fixtures import synth_dir  # noqa: F401
except ImportError:
    from data_fixtures import synth_dir  # noqa: F401

N = 50


@pytest.fixture()
def folder(tmp_path):
    """A plain folder of N small square images (CelebA-HQ / FFHQ style), no partition file."""
    out = tmp_path / "faces"
    out.mkdir()
    for i in range(N):
        Image.new("RGB", (16, 16), (i * 5, 0, 0)).save(out / f"{i:03d}.png")
    return out


def _splits(source) -> dict:
    return {r.image_id: r.split for r in source.records()}


def _count(splits: dict) -> tuple:
    return tuple(list(splits.values()).count(s) for s in ("train", "valid", "test"))


def test_all_test_puts_every_image_in_test(folder, tmp_path):
    manifest = write_shards(folder, str(tmp_path / "s"), 16, workers=1, progress=False,
                            split_rule=rule_from_flags("all=test", None, None))
    assert list(manifest["splits"]) == ["test"] and manifest["splits"]["test"]["num_samples"] == N
    assert manifest["split_rule"] == {"kind": "all", "split": "test", "chosen_by": "user"}


@pytest.mark.parametrize("text, counts", [("0.8,0.1,0.1", (40, 5, 5)), ("0.5,0.3,0.2", (25, 15, 10)),
                                          ("0.7,0.15,0.15", (34, 8, 8)), ("0,0,1", (0, 0, 50))])
def test_ratios_give_expected_counts_and_are_stable(folder, text, counts):
    rule = rule_from_flags(None, text, None)
    first = _splits(open_celeba(folder, rule))
    assert _count(first) == counts  # valid and test rounded half up, train takes the rest
    assert all(abs(c - r * N) <= 1 for c, r in zip(counts, parse_ratios(text)))
    assert _splits(open_celeba(folder, rule)) == first
    # adding images moves only a few of the old ones across a boundary
    for i in range(N, N + 5):
        Image.new("RGB", (16, 16)).save(folder / f"{i:03d}.png")
    grown = _splits(open_celeba(folder, rule))
    assert sum(grown[k] != v for k, v in first.items()) <= 5


def test_plain_folder_default_is_ratios_and_is_recorded(folder, tmp_path):
    manifest = write_shards(folder, str(tmp_path / "s"), 16, workers=1, progress=False)
    assert manifest["split_rule"] == {"kind": "ratios", "ratios": [0.8, 0.1, 0.1], "chosen_by": "default"}
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "valid", "test")] == [40, 5, 5]


def test_partition_file_is_honoured(folder, tmp_path):
    part = tmp_path / "my_partition.txt"
    part.write_text("".join(f"{i:03d}.png {i % 3}\n" for i in range(N)) + "extra.png 0\n")
    splits = _splits(open_celeba(folder, rule_from_flags(None, None, str(part))))
    assert all(splits[f"{i:03d}.png"] == ("train", "valid", "test")[i % 3] for i in range(N))
    # a folder's own list_eval_partition.txt is its default
    (folder / "list_eval_partition.txt").write_text(part.read_text())
    src = open_celeba(folder)
    assert _splits(src) == splits and src.split_rule.chosen_by == "default"


def test_partition_missing_images_names_them(folder, tmp_path):
    part = tmp_path / "partial.txt"
    part.write_text("".join(f"{i:03d}.png 0\n" for i in range(3, N)))
    with pytest.raises(ValueError, match=r"3 image\(s\).*partial.txt, e.g. 000.png, 001.png, 002.png"):
        open_celeba(folder, SplitRule("partition", path=str(part)))


def test_celeba_keeps_its_partition_unless_told(synth_dir):
    official = {line.split()[0]: line.split()[1] for line in (synth_dir / "list_eval_partition.txt").read_text().splitlines()}
    src = open_celeba(synth_dir)
    assert {k: ("train", "valid", "test").index(v) for k, v in _splits(src).items()} == {k: int(v) for k, v in official.items()}
    assert src.split_rule.kind == "partition" and src.split_rule.chosen_by == "default"
    assert set(_splits(open_celeba(synth_dir, SplitRule("all", split="valid"))).values()) == {"valid"}


@pytest.mark.parametrize("text", ["0.8,0.1", "0.8,0.1,0.2", "a,b,c", "1.2,-0.1,-0.1", "0.8;0.1;0.1", "nan,0,1"])
def test_bad_ratio_string_names_the_flag(text):
    with pytest.raises(ValueError, match=f"--split-ratios '{text}'"):
        parse_ratios(text)


def test_cli_errors_name_the_flag(folder, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["data", "shard", "--source", str(folder), "--out", str(tmp_path / "s"),
                              "--split-ratios", "0.9,0.2,0.1"])
    assert res.exit_code == 2 and "--split-ratios" in res.output and "0.9,0.2,0.1" in res.output
    res = runner.invoke(app, ["data", "shard", "--source", str(folder), "--out", str(tmp_path / "s"),
                              "--split", "all=tset"])
    assert res.exit_code == 2 and "--split 'all=tset'" in res.output
    res = runner.invoke(app, ["data", "shard", "--source", str(folder), "--out", str(tmp_path / "s"),
                              "--split", "all=test", "--split-ratios", "0.8,0.1,0.1"])
    assert res.exit_code == 2 and "choose one split rule" in res.output


def test_manifest_has_no_absolute_path_and_inspect_shows_rule(folder, tmp_path, monkeypatch):
    part = tmp_path / "part.txt"
    part.write_text("".join(f"{i:03d}.png {int(i >= 45) + int(i >= 48)}\n" for i in range(N)))
    out = tmp_path / "s"
    runner = CliRunner()
    res = runner.invoke(app, ["data", "shard", "--source", str(folder), "--out", str(out), "--resolution", "16",
                              "--workers", "1", "--partition", str(part)])
    assert res.exit_code == 0, res.output
    text = (out / "manifest.json").read_text()
    manifest = json.loads(text)
    assert str(tmp_path) not in text
    assert manifest["source"] == "hq:faces" and manifest["split_rule"]["file"] == "part.txt"
    res = runner.invoke(app, ["data", "inspect", str(out)])
    assert res.exit_code == 0 and "split rule: partition file part.txt" in " ".join(res.output.split())
    assert [manifest["splits"][s]["num_samples"] for s in ("train", "valid", "test")] == [45, 3, 2]
    monkeypatch.chdir(tmp_path)  # inside the working directory: the relative path
    assert open_celeba(folder).describe() == "hq:faces"
    monkeypatch.chdir(folder.parent.parent)
    assert open_celeba(folder).describe() == f"hq:{folder.relative_to(folder.parent.parent).as_posix()}"


def test_evaluate_prints_the_size_of_its_split(folder, tmp_path, monkeypatch):
    import pipeline.evaluate.job as job

    write_shards(folder, str(tmp_path / "s"), 16, workers=1, progress=False,
                 split_rule=SplitRule("ratios", ratios=(0.6, 0.2, 0.2)))
    monkeypatch.setattr(job, "run_evaluation", lambda *a, **k: ("run1", {"num_samples": 3, "nll": 1.0}))
    res = CliRunner().invoke(app, ["evaluate", "--model", "runs:/x/model", "--data", str(tmp_path / "s"),
                                   "--split", "valid", "--metrics", "nll", "--max-samples", "3"])
    assert res.exit_code == 0, res.output
    assert "split valid: 10 samples" in res.output

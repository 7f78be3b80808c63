"""``vaepipe bench memory`` at tiny size: its fields, and ZeRO-3 holding half the parameters."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from pipeline.bench.memory import MemoryCase, default_cases
from pipeline.config import load_config


def test_cases_cover_every_stage_with_and_without_checkpointing_then_offload():
    cases = default_cases([0, 1, 2, 3], offload=True)
    assert [(c.zero_stage, c.activation_checkpointing) for c in cases[:8]] == [
        (s, ckpt) for s in (0, 1, 2, 3) for ckpt in (False, True)]
    assert [(c.zero_stage, c.offload_optimizer, c.offload_params) for c in cases[8:]] == [
        (1, True, False), (2, True, False), (3, True, True)]
    assert cases[-1].label == "ZeRO-3 offload opt+param"
    assert default_cases([3], offload=False) == [MemoryCase(3, False), MemoryCase(3, True)]


@pytest.mark.integration
def test_memory_report_fields_and_zero3_halves_the_parameters_with_and_without_offload(tmp_path):
    from pipeline.bench.memory import memory_report
    from pipeline.bench.report import publish

    cfg = load_config(None, ["model.flavor=debug", "data.resolution=32", "data.batch_size=2", "train.precision=fp32"])
    cases = [MemoryCase(0, False), MemoryCase(3, False), MemoryCase(3, False, True, True)]
    report = memory_report(cfg, cases, steps=1, warmup=1, workers=2)
    z0, z3, z3_offload = report.rows
    assert [r["configuration"] for r in report.rows] == ["ZeRO-0", "ZeRO-3", "ZeRO-3 offload opt+param"]
    for row in report.rows:
        assert row["peak_MiB"] > row["above_imports_MiB"] > 0  # peak RSS above the imports, per worker
        assert row["step_s"] > 0
        assert row["model_state_MiB"] == pytest.approx(row["params_MiB"] + row["grads_MiB"] + row["optim_MiB"])
        assert len(row["peak_MiB_per_rank"].split("/")) == 2
    # fp32 without ZeRO: 4 bytes of weights, 4 of gradient, 8 of Adam moments per parameter
    n = report.params["parameters"]
    assert z0["params_MiB"] * 2**20 == pytest.approx(4 * n, rel=0.01)
    assert z0["optim_MiB"] * 2**20 == pytest.approx(8 * n, rel=0.01)
    # ZeRO-3 with 2 workers: each rank holds about half of everything (padding aside)
    assert z3["params_MiB"] / z0["params_MiB"] == pytest.approx(0.5, abs=0.02)
    assert z3_offload["params_MiB"] == z3["params_MiB"]  # offloaded to host, still one partition per rank
    assert z3_offload["ds_estimate_MiB"] < z3["ds_estimate_MiB"]  # DeepSpeed moves it off the accelerator
    assert report.summary["zero3_over_zero0_param_bytes"] == z3["params_MiB"] / z0["params_MiB"]
    assert z0["ds_estimate_MiB"] is None and z3["ds_estimate_MiB"] > 0  # DeepSpeed estimates ZeRO 2/3 only
    ranks = report.params["per_rank"]
    assert [r["case"]["zero_stage"] for r in ranks] == [0, 3, 3]
    assert all(r["ranks"][0]["peak_kind"] == "peak_rss" for r in ranks)
    where = publish(report, tmp_path, None, Console(width=200))
    saved = json.loads((tmp_path / "memory.json").read_text())
    assert saved["rows"][1]["configuration"] == "ZeRO-3" and where["png"].endswith("memory.png")


@pytest.mark.parametrize("args, message", [
    (["--stages", "0,5"], "give ZeRO stages 0-3"),
    (["--stages", "two"], "give ZeRO stages 0-3"),
    (["model.name=vq_prior"], "vq_prior needs a trained parent"),
])
def test_bench_memory_refuses_bad_arguments_before_starting_a_worker(args, message):
    from typer.testing import CliRunner

    from pipeline.cli import app

    result = CliRunner().invoke(app, ["bench", "memory", "--config", "jobs/quickstart.yaml", *args])
    assert result.exit_code == 2 and message in result.output, result.output

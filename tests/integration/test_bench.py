"""The benchmark harness measures real training steps (the long runs live behind `vaepipe bench`)."""

import math

import pytest
import torch

from conftest import base_overrides
from pipeline.config import load_config


def test_baseline_rate_is_timed_steps_times_global_batch_over_their_time(shards32, tmp_path, monkeypatch):
    """Warm-up steps are not timed: the clock is read when the first timed step starts and after
    the last one, so the rate is steps * global batch / (t_end - t_start) exactly."""
    import pipeline.bench.baseline as baseline

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.precision": "fp32"}))
    data = baseline.load_in_memory(cfg, 64)
    assert data.shape == (64, 3, 32, 32) and 0 <= float(data.min()) and float(data.max()) <= 1
    clock = iter([100.0, 106.0])
    real = baseline.time.perf_counter
    monkeypatch.setattr(baseline, "time", type("T", (), {"perf_counter": staticmethod(lambda: next(clock))}))
    res = baseline.run_baseline(cfg, data, steps=3, warmup=1)
    monkeypatch.setattr(baseline, "time", type("T", (), {"perf_counter": staticmethod(real)}))
    assert res.global_batch == 8 * 2 and res.threads == 2
    assert res.images_per_sec == 3 * 16 / 6.0
    assert next(clock, None) is None  # read exactly twice
    assert res.ms_per_step["forward"] > 0 and res.ms_per_step["communication"] == 0


def test_bf16_baseline_trains_bf16_weights_from_an_fp32_master_copy(shards32, tmp_path):
    import torch

    from models import build_model
    from pipeline.bench.baseline import MasterWeights

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.precision": "bf16"}))
    model = build_model(cfg.model)
    opt = MasterWeights(model, cfg)
    before = [m.clone() for m in opt.master]
    loss = model(torch.rand(4, 3, 32, 32).to(torch.bfloat16), beta=1.0, free_bits=0.0)["loss"]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in opt.master)
    assert any(not torch.equal(a, b) for a, b in zip(before, opt.master))
    for m, p in zip(opt.master, model.parameters()):
        assert torch.equal(p, m.to(torch.bfloat16))  # written back


def test_overhead_report_ratios_are_the_measured_medians(shards32, tmp_path):
    from pipeline.bench.baseline import BaselineResult
    from pipeline.bench.overhead import build_report

    cfg = load_config(None, base_overrides(shards32, tmp_path))
    base = [BaselineResult(r, {"forward": 10.0}, 2, 16) for r in (100.0, 120.0, 110.0)]
    run = lambda r, sm: {"images_per_sec": r, "ms": {"forward": 5.0, "communication": 2.0}, "wall_s": 30.0, "run_id": "x"}
    pipes = {False: [run(r, False) for r in (90.0, 99.0, 95.0)], True: [run(r, True) for r in (80.0, 85.0, 88.0)]}
    engines = [{"images_per_sec": r, "ms": {"forward": 6.0, "communication": 1.0}} for r in (104.0, 100.0, 108.0)]
    rep = build_report(cfg, 10, base, pipes, engines)
    assert rep.summary["baseline_images_per_sec"] == 110.0
    assert rep.summary["ratio"] == 95.0 / 110.0 and rep.summary["ratio_sysmetrics"] == 85.0 / 110.0
    assert rep.summary["system_metrics_cost_pct"] == 100.0 * (1 - 85.0 / 95.0)
    assert rep.summary["ratio_engine_ranks"] == 104.0 / 110.0
    assert rep.summary["ray_stream_cost_pct"] == 100.0 * (1 - 95.0 / 104.0)  # the gap's part past the engine
    assert [r["ratio"] for r in rep.rows] == [1.0, 104.0 / 110.0, 95.0 / 110.0, 85.0 / 110.0]
    assert rep.rows[0]["±%"] == 100.0 * 10 / 110.0  # half the range over the median
    assert [r["comm"] for r in rep.rows] == [0.0, 1.0, 2.0, 2.0]
    assert rep.rows[1]["setup"] == "engine 2x1 ranks, no Ray"


def test_overhead_report_compiled_baseline_row_is_its_median_over_the_eager_one(shards32, tmp_path):
    from pipeline.bench.baseline import BaselineResult
    from pipeline.bench.overhead import build_report

    cfg = load_config(None, base_overrides(shards32, tmp_path))
    base = [BaselineResult(r, {"forward": 10.0}, 2, 16) for r in (100.0, 120.0, 110.0)]
    compiled = [BaselineResult(r, {"forward": 12.0}, 2, 16, compiled=True) for r in (80.0, 90.0, 88.0)]
    pipes = {False: [{"images_per_sec": 95.0, "ms": {}, "wall_s": 30.0, "run_id": "x"}]}
    rep = build_report(cfg, 10, base, pipes, compiled=compiled)
    assert rep.rows[1]["setup"] == "bare loop, 2 threads, torch.compile"
    assert rep.rows[1]["ratio"] == rep.summary["ratio_compiled_baseline"] == 88.0 / 110.0
    assert rep.summary["ratio"] == 95.0 / 110.0  # the pipeline is still against the eager loop


def test_overhead_report_layout_row_and_the_pipeline_against_it(shards32, tmp_path):
    from pipeline.bench.baseline import BaselineResult
    from pipeline.bench.overhead import build_report

    cfg = load_config(None, base_overrides(shards32, tmp_path))
    base = [BaselineResult(r, {"forward": 10.0}, 2, 16) for r in (100.0, 120.0, 110.0)]
    layout = [BaselineResult(r, {"forward": 6.0}, 2, 16, channels_last=True) for r in (140.0, 150.0, 130.0)]
    pipes = {False: [{"images_per_sec": r, "ms": {}, "wall_s": 30.0, "run_id": "x"} for r in (120.0, 125.0, 121.0)]}
    rep = build_report(cfg, 10, base, pipes, layout=layout)
    assert [r["setup"] for r in rep.rows[:2]] == ["bare loop, 2 threads", "bare loop, 2 threads, channels-last"]
    assert rep.rows[1]["ratio"] == rep.summary["ratio_layout_baseline"] == 140.0 / 110.0
    assert rep.rows[1]["fwd"] == 6.0
    assert rep.summary["ratio"] == 121.0 / 110.0  # the headline ratio stays against the plain loop
    assert rep.summary["ratio_to_layout_baseline"] == 121.0 / 140.0


def test_layout_baseline_runs_every_convolution_on_channels_last_input(shards32, tmp_path, monkeypatch):
    import pipeline.bench.baseline as baseline
    from pipeline.train import memory_format

    calls = []
    original = memory_format._channels_last_input
    monkeypatch.setattr(memory_format, "_channels_last_input",
                        lambda module, args: calls.append(type(module).__name__) or original(module, args))
    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.precision": "fp32"}))
    data = baseline.load_in_memory(cfg, 32)
    plain = baseline.run_baseline(cfg, data, steps=1, warmup=1)
    assert not calls and not plain.channels_last
    res = baseline.run_baseline(cfg, data, steps=1, warmup=1, channels_last=True)
    assert res.channels_last and res.images_per_sec > 0
    assert {"Conv2d", "ConvTranspose2d"} <= set(calls)


def test_compiled_baseline_runs_its_steps_through_a_compiled_graph(shards32, tmp_path):
    from torch._dynamo.utils import counters

    import pipeline.bench.baseline as baseline

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.precision": "fp32"}))
    data = baseline.load_in_memory(cfg, 32)
    counters.clear()
    res = baseline.run_baseline(cfg, data, steps=2, warmup=1, compiled=True)
    assert res.compiled and res.images_per_sec > 0
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo captured the model, not an eager fallback
    assert not counters["graph_break"]


def test_report_is_printed_saved_as_json_and_png_and_logged(tmp_path):
    import json

    from rich.console import Console

    from pipeline.bench.report import BenchReport, publish
    from pipeline.tracking import make_client

    rep = BenchReport("demo", "a demo", [{"setup": "a", "img/s": 10.0}, {"setup": "b", "img/s": 20.0}],
                      {"ratio": 2.0}, {"model": "x"}, chart=lambda ax, r: ax.bar(["a", "b"], [10, 20]))
    console = Console(record=True, width=120)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    where = publish(rep, tmp_path / "out", uri, console)
    text = console.export_text()  # (export clears the record)
    assert "a demo" in text and "ratio: 2" in text
    assert json.loads((tmp_path / "out" / "demo.json").read_text())["summary"] == {"ratio": 2.0}
    assert (tmp_path / "out" / "demo.png").read_bytes()[:4] == b"\x89PNG"
    run = make_client(uri).get_run(where["mlflow_run_id"])
    assert run.data.metrics["ratio"] == 2.0 and run.data.params["model"] == "x"


def test_data_bench_readers_deliver_the_same_images_and_ratios_come_from_the_rates(shards32, tmp_path):
    from pipeline.bench.data import build_report, read_tarfile_pil, read_vaepipe, read_webdataset

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"data.shuffle_buffer": 0}))
    n = read_tarfile_pil(cfg)
    assert n > 0 and n % cfg.data.batch_size == 0
    assert read_webdataset(cfg) == n  # same split, same full batches
    assert read_vaepipe(cfg) == (n // cfg.data.batch_size) * cfg.data.batch_size
    rates = {"tarfile + PIL, 1 process": [100.0, 200.0, 150.0], "webdataset pipeline, 1 process": [90.0] * 3,
             "vaepipe ShardStream, 1 process": [300.0] * 3}
    rep = build_report(cfg, rates, [500.0, 520.0, 510.0], [250.0, 260.0, 255.0], consumption=170.0)
    assert rep.summary["reader_vs_training"] == 510.0 / 170.0
    assert rep.rows[2]["vs tarfile+PIL"] == 300.0 / 150.0 and rep.rows[1]["vs training step"] == 90.0 / 170.0


def test_trials_are_drawn_as_tune_draws_them_and_reproducibly():
    from pipeline.tune import draw_trials

    space = {"optim.lr": {"loguniform": [1e-4, 1e-3]}, "model.beta": {"grid": [1.0, 2.0, 4.0]}}
    trials = draw_trials(space, num_samples=2, seed=3)
    assert len(trials) == 6  # every grid point once per sample
    assert sorted(t["model.beta"] for t in trials) == [1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert all(1e-4 <= t["optim.lr"] <= 1e-3 for t in trials)
    assert len({t["optim.lr"] for t in trials}) == 6
    assert draw_trials(space, num_samples=2, seed=3) == trials
    assert draw_trials(space, num_samples=2, seed=4) != trials


@pytest.mark.integration
def test_asha_bench_runs_the_same_trials_under_both_schedulers(ray_session, shards32, tmp_path):
    """A real bench: two sweeps on the session's Ray, the same drawn trials in both (read back
    from MLflow), and every figure of the report computed from what was measured."""
    from pipeline.bench.asha import asha_speedup
    from pipeline.tracking import make_client

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{
        "dist.num_workers": 0, "train.max_steps": 4, "train.log_every": 1, "train.val_every": 1,
        "train.checkpoint_every": 4, "train.image_every": 4, "tracking.log_model": False,
        "tune.num_samples": 1, "tune.grace_period": 1, "tune.reduction_factor": 2,
        "tune.storage_path": str(tmp_path / "tune")}))
    space = {"optim.lr": {"grid": [1e-2, 1e-5]}}
    res = asha_speedup(cfg, space, seed=0)
    assert res["speedup"] == res["fifo"]["wall_s"] / res["asha"]["wall_s"]
    assert res["fifo"]["trial_steps"] == 2 * 4 and res["fifo"]["stopped"] == []
    assert res["asha"]["trial_steps"] == 8 - sum(4 - s for s in res["asha"]["stopped"])
    assert res["trial_steps_ratio"] == res["fifo"]["trial_steps"] / res["asha"]["trial_steps"]
    client = make_client(cfg.tracking.tracking_uri)
    drawn = []
    for scheduler in ("asha", "fifo"):
        parent = res[scheduler]["parent_run_id"]
        exp = client.get_run(parent).info.experiment_id
        children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
        drawn.append(sorted(float(c.data.tags["vaepipe.hp.optim.lr"]) for c in children))
    assert drawn[0] == drawn[1] == [1e-5, 1e-2]


@pytest.mark.integration
def test_overhead_bench_smoke_runs_both_sides_and_reports_their_ratio(ray_session, shards32, tmp_path):
    from pipeline.bench.overhead import overhead

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"tracking.system_metrics_interval_s": 1}))
    rep = overhead(cfg, steps=6, repeats=1, system_metrics="both", max_images=64)
    s = rep.summary
    assert s["ratio"] == s["pipeline_images_per_sec"] / s["baseline_images_per_sec"] > 0
    assert s["ratio_sysmetrics"] == s["pipeline_sysmetrics_images_per_sec"] / s["baseline_images_per_sec"]
    assert [r["setup"].split()[0] for r in rep.rows] == ["bare", "bare", "engine", "vaepipe", "vaepipe"]
    assert rep.rows[1]["setup"].endswith("channels-last")  # train.channels_last is on by default
    assert s["ratio_to_layout_baseline"] == s["pipeline_images_per_sec"] / s["layout_baseline_images_per_sec"] > 0
    assert s["ratio_engine_ranks"] == s["engine_ranks_images_per_sec"] / s["baseline_images_per_sec"] > 0
    assert s["ray_stream_cost_pct"] == 100.0 * (1 - s["pipeline_images_per_sec"] / s["engine_ranks_images_per_sec"])
    for piped in rep.rows[2:4]:  # the engine ranks and the run: 2 ranks all-reduce gradients
        assert piped["fwd"] > 0 and piped["bwd"] > 0 and piped["comm"] > 0
    assert rep.params["global_batch"] == 16 and rep.params["precision"] in ("fp32", "bf16")


@pytest.mark.integration
def test_data_bench_smoke_measures_every_reader_and_the_training_step(shards32, tmp_path):
    from pipeline.bench.data import data_bench

    cfg = load_config(None, base_overrides(shards32, tmp_path))
    rep = data_bench(cfg, repeats=1, consumption_steps=2)
    assert len(rep.rows) == 5 and all(r["images/s"] > 0 for r in rep.rows)
    s = rep.summary
    assert s["reader_vs_training"] == s["vaepipe_total_images_per_sec"] / s["training_images_per_sec"]
    assert s["vaepipe_total_images_per_sec"] == 2 * s["vaepipe_per_process_images_per_sec"]


@pytest.mark.integration
def test_scaling_bench_smoke_measures_layouts_and_predicts_from_what_it_measured(ray_session, shards32, tmp_path):
    from pipeline.bench.scaling import GPU_COUNTS, Links, comm_seconds, efficiency, scaling

    cfg = load_config(None, base_overrides(shards32, tmp_path))
    big = load_config(None, base_overrides(shards32, tmp_path, **{"data.resolution": 64}))
    measured, predicted = scaling(cfg, steps=6, stages=(2,), links=Links(), gpu="H100", mfu=0.4,
                                  predict_cfg=big, predict_batch=32)
    whats = [r["what"].split(":")[0] for r in measured.rows]
    assert whats == ["weak", "weak", "layout", "layout"]  # 1w, 2w; 1w x 2 threads, 2w x 1 thread
    one, two = measured.rows[0]["img/s"], measured.rows[1]["img/s"]
    assert measured.summary["weak_efficiency_2w_zero2"] == two / (2 * one)
    assert measured.rows[3]["img/s"] == two  # the 2x1 layout is the weak-scaling run, not run twice
    best = max(measured.rows[2:], key=lambda r: r["img/s"])
    assert f"{measured.summary['recommended_workers']} worker(s) x {measured.summary['recommended_threads_per_worker']}" in best["what"]
    cpu = predicted.rows[0]  # ZeRO-0 on this CPU's measured compute time
    from pipeline.bench.flops import param_count

    t_c = cpu["compute ms"] / 1000
    for n in GPU_COUNTS:
        assert cpu[f"eff @{n}"] == efficiency(t_c, comm_seconds(param_count(cfg), n, 0, Links()), overlap=False)
    for row in predicted.rows[4:]:  # the GPU rows say what reaches 90% at 64 GPUs
        m = row["micro-batch for 90% @64"]
        assert m >= 1 and predicted.summary[f"predicted_micro_batch_for_90pct_64gpu_zero{row['zero']}"] == m


def test_comm_model_volumes_and_efficiency():
    from pipeline.bench.scaling import Links, comm_seconds, efficiency

    links = Links(gpus_per_node=8, intra_gbps=800.0, inter_gbps=100.0, latency_us=0.0)
    params = 10**6
    # 2 ranks on one node: ZeRO-0 moves 2 * (1/2) * P * 2 bytes = 2 MB over 800 Gb/s
    assert comm_seconds(params, 2, 0, links) == pytest.approx(2e6 * 8 / 800e9)
    assert comm_seconds(params, 64, 3, links) == pytest.approx(1.5 * comm_seconds(params, 64, 2, links))
    assert comm_seconds(params, 1, 3, links) == 0.0
    assert efficiency(3.0, 1.0, overlap=False) == 0.75 and efficiency(3.0, 1.0, overlap=True) == 1.0


def test_comm_model_follows_deepspeeds_schedule_under_gradient_accumulation():
    from pipeline.bench.scaling import Links, comm_seconds

    links = Links(latency_us=0.0)
    params, n = 10**7, 64
    one = {stage: comm_seconds(params, n, stage, links) for stage in range(4)}
    # ZeRO-0/1 reduce once per optimizer step; ZeRO-2 reduce-scatters every micro-batch and
    # all-gathers once; ZeRO-3 does all three collectives on every micro-batch
    assert comm_seconds(params, n, 0, links, accum=8) == pytest.approx(one[0])
    assert comm_seconds(params, n, 1, links, accum=8) == pytest.approx(one[1])
    assert comm_seconds(params, n, 2, links, accum=8) == pytest.approx(one[2] * (8 + 1) / 2)
    assert comm_seconds(params, n, 3, links, accum=8) == pytest.approx(one[3] * 8)
    # latency: one collective per bucket for ZeRO-0, two for ZeRO-1, 1 + accum for ZeRO-2
    hop = Links(latency_us=10.0, inter_gbps=1e12, intra_gbps=1e12)
    tree = 2 * 6 * 10e-6  # 2 log2(64) hops
    assert comm_seconds(params, n, 0, hop) == pytest.approx(tree, rel=1e-3)
    assert comm_seconds(params, n, 2, hop, accum=4) == pytest.approx(5 * tree, rel=1e-3)


def test_accumulation_and_micro_batch_for_90_percent_are_the_smallest_that_reach_it():
    from pipeline.bench.scaling import Links, accumulation_for, comm_seconds, efficiency, micro_batch_for

    links, params, n = Links(), 4 * 10**6, 64
    s_img = 2e-5  # seconds per image
    t_micro = 32 * s_img

    def eff(stage, a=1, m=32):
        return efficiency(a * m * s_img, comm_seconds(params, n, stage, links, accum=a), overlap=False)

    for stage in (0, 1):
        a = accumulation_for(params, t_micro, stage, links)
        assert a > 1 and eff(stage, a) >= 0.9 > eff(stage, a - 1)
    # ZeRO-2's per-micro-batch reduce-scatter caps it below 90% at any accumulation here
    assert eff(2, 1024) < 0.9 and accumulation_for(params, t_micro, 2, links) is None
    for stage in range(4):
        m = micro_batch_for(params, s_img, stage, links)
        assert eff(stage, m=m) >= 0.9 > eff(stage, m=m - 1)


def test_engine_ranks_refuse_data_short_of_one_global_batch(shards32, tmp_path):
    from pipeline.bench.engine_ranks import run_engine_ranks

    cfg = load_config(None, base_overrides(shards32, tmp_path))
    with pytest.raises(ValueError, match=r"one global batch \(16 images\).*gave 8"):
        run_engine_ranks(cfg, torch.zeros(8, 3, 32, 32), steps=2)


def test_checkpoint_bench_cost_is_the_step_time_difference_spread_over_the_checkpoints_in_the_span(monkeypatch):
    from pipeline.bench import checkpoint as bench

    # logs at steps 10..60, checkpoints every 10: those at 10, 20, 30, 40, 50 lie in the span, 60's after it
    fake = {"none": [20.0, 22.0], "sync": [30.0, 34.0], "async": [21.0, 23.0]}
    calls = []

    def timed_run(cfg):
        mode = "none" if cfg.train.checkpoint_every == 60 else cfg.train.checkpoint_upload
        calls.append((cfg.train.storage_path, mode, cfg.train.log_every, cfg.tracking.log_model, cfg.data.val_batches))
        return {"ms_per_step": fake[mode][sum(1 for c in calls if c[1] == mode and c[0] == cfg.train.storage_path) - 1],
                "span": (10, 60), "wall_s": 1.0}

    monkeypatch.setattr(bench, "timed_run", timed_run)
    monkeypatch.setattr(bench, "resolved_precision", lambda cfg: cfg)
    report = bench.checkpoint_bench(load_config(None, []), ["runs", "s3://b/r"], steps=60, every=10, repeats=2)
    assert {c[2:] for c in calls} == {(10, False, 0)} and len(calls) == 12  # 2 storages x 3 ways x 2 repeats
    local = {r["upload"]: r for r in report.rows if r["storage"] == "local"}
    assert local["sync"]["checkpoints in span"] == 5 and local["none"]["checkpoints in span"] == 0
    assert local["sync"]["ms per checkpoint"] == pytest.approx((32.0 - 21.0) * 50 / 5)  # medians of the repeats
    assert report.summary["s3_async_ms_per_checkpoint"] == pytest.approx((22.0 - 21.0) * 50 / 5)
    with pytest.raises(ValueError, match="--steps 20 needs at least 3 x --every 10"):
        bench.checkpoint_bench(load_config(None, []), ["runs"], steps=20, every=10, repeats=1)


def test_validation_bench_compares_the_three_ways_at_one_checkpoint_schedule_on_as_many_samples(monkeypatch):
    from pipeline.bench import validation as bench

    fake = {"none": [20.0, 22.0], "in_loop": [40.0, 44.0], "off_loop": [24.0, 26.0]}
    calls = []

    def timed_run(cfg):
        mode = "off_loop" if cfg.train.validation == "off_loop" else ("in_loop" if cfg.data.val_batches else "none")
        calls.append((mode, cfg.train.checkpoint_every, cfg.train.val_every, cfg.data.val_batches,
                      cfg.train.val_max_samples))
        return {"ms_per_step": fake[mode][sum(1 for c in calls if c[0] == mode) - 1], "span": (10, 60), "wall_s": 5.0}

    monkeypatch.setattr(bench, "timed_run", timed_run)
    monkeypatch.setattr(bench, "resolved_precision", lambda cfg: cfg)
    cfg = load_config(None, ["data.batch_size=8", "dist.num_workers=2"])
    report = bench.validation_bench(cfg, steps=60, every=10, val_batches=3, repeats=2)
    assert len(calls) == 6 and {c[1:3] for c in calls} == {(10, 10)}  # one checkpoint schedule for all three
    assert {c[0]: c[3:] for c in calls} == {"none": (0, 48), "in_loop": (3, 48), "off_loop": (0, 48)}  # 3 x 8 x 2 samples
    rows = {r["validation"]: r for r in report.rows}
    assert rows["in_loop"]["ms/step"] == 42.0 and rows["in_loop"]["images/s"] == pytest.approx(1000 * 16 / 42.0)
    assert report.summary["off_loop_vs_in_loop"] == pytest.approx(42.0 / 25.0)
    assert report.summary["in_loop_vs_none"] == pytest.approx(21.0 / 42.0)
    with pytest.raises(ValueError, match="--val-batches 0"):
        bench.validation_bench(cfg, steps=60, every=10, val_batches=0, repeats=1)


def test_quality_verdict_is_the_gap_of_the_means_against_two_standard_errors():
    import math
    import statistics

    from pipeline.bench.quality import verdict

    bare = [100.0, 102.0, 104.0]
    se = math.sqrt(statistics.variance([101.0, 103.0, 105.0]) / 3 + statistics.variance(bare) / 3)
    within = verdict([101.0, 103.0, 105.0], bare)  # 1 nat worse, inside the spread
    assert within["gap_nats"] == pytest.approx(1.0) and within["tolerance_nats"] == pytest.approx(2 * se)
    assert not within["worse"]
    assert verdict([110.0, 112.0, 114.0], bare)["worse"]  # 10 nats worse: beyond it
    assert not verdict([90.0, 92.0, 94.0], bare)["worse"]  # better is never a failure
    with pytest.raises(ValueError, match="at least 2 seeds"):
        verdict([1.0], [1.0, 2.0])


@pytest.mark.parametrize("overrides, key", [(["schedule.kl_anneal=linear", "schedule.warmup=100"], "schedule.kl_anneal"),
                                            (["optim.name=adamw"], "optim.name"), (["train.ema_rate=0.99"], "train.ema_rate"),
                                            (["model.name=factor_vae"], "model.name"), (["dist.num_workers=0"], "dist.num_workers")])
def test_quality_bench_refuses_math_the_bare_loop_does_not_do_by_name(overrides, key):
    from pipeline.bench.quality import comparable

    cfg = load_config(None, overrides)
    with pytest.raises(ValueError, match=f"{key} is not comparable"):
        comparable(cfg)


def test_quality_bench_scores_the_bare_loops_model_on_held_out_data_and_training_lowers_it(shards32, tmp_path):
    """The bare side as the bench runs it: the debug model trained in the loop scores a lower test
    -ELBO after 30 steps than untrained, both scored by the evaluation's code on the test split."""
    from pipeline.bench.quality import bare_blob, held_out_split, in_memory, score

    cfg = load_config(None, base_overrides(shards32, tmp_path, **{"train.precision": "fp32"}))
    data = in_memory(cfg)
    split = held_out_split(shards32)
    untrained, trained = (score(bare_blob(cfg, data, steps), cfg, split, 16) for steps in (0, 30))
    assert split == "test" and data.shape[1:] == (3, 32, 32)
    assert math.isfinite(trained) and trained < 0.9 * untrained, (untrained, trained)

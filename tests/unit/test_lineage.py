"""What a user sees in MLflow, without Ray: the shard set as a run's dataset input (digest =
manifest hash), lineage on registered versions with a model card, images by key and step,
system metrics named per rank, and a promotion gate refused before a sweep starts."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import base_overrides, logged_images
from pipeline.config import load_config, to_dict
from pipeline.lineage import DIGEST_LEN, config_hash, manifest_hash
from pipeline.logger import RankZeroLogger
from pipeline.tracking import make_client, start_run


def _cfg(shards: str, tmp_path: Path, **extra):
    return load_config(None, base_overrides(shards, tmp_path, **extra))


def _dataset_input(client, run_id: str):
    (inp,) = client.get_run(run_id).inputs.dataset_inputs
    return inp


def _change_one_shard(src: str, dst: Path) -> None:
    """A copy of the shard set whose first train shard holds one different image, with the
    manifest's sha256 of that shard updated (what re-sharding changed data writes)."""
    import webdataset as wds

    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    samples = [dict(s) for s in wds.WebDataset(str(dst / entry["name"]), shardshuffle=False, empty_check=False)]
    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (32, 32), (255, 0, 0)).save(buf, format="JPEG")
    samples[0]["jpg"] = buf.getvalue()
    with wds.TarWriter(str(dst / entry["name"])) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k in ("__key__", "jpg", "json")})
    entry["sha256"] = hashlib.sha256((dst / entry["name"]).read_bytes()).hexdigest()
    (dst / "manifest.json").write_text(json.dumps(manifest))


def test_run_dataset_input_is_the_manifest_hash_and_changes_with_a_shard(shards32, tmp_path):
    from pipeline.data.shards import read_manifest

    cfg = _cfg(shards32, tmp_path)
    uri = cfg.tracking.tracking_uri
    client = make_client(uri)
    run_id = start_run(cfg, uri)
    inp = _dataset_input(client, run_id)
    manifest = read_manifest(shards32)
    full = manifest_hash(manifest)
    assert inp.dataset.digest == full[:DIGEST_LEN]  # MLflow keeps 36 characters of a digest
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    assert json.loads(inp.dataset.source) == {"uri": shards32} and inp.dataset.source_type == "local"
    profile = json.loads(inp.dataset.profile)
    assert profile["manifest_sha256"] == full and profile["resolution"] == 32
    assert profile["num_samples"] == {s: v["num_samples"] for s, v in manifest["splits"].items()}
    assert profile["attr_names"] == manifest["attr_names"] and len(profile["attr_names"]) == 40
    schema = json.loads(inp.dataset.schema)["mlflow_colspec"]
    assert {"__key__", "jpg", "attrs.Smiling"} <= {c["name"] for c in schema}
    tags = client.get_run(run_id).data.tags
    assert tags["vaepipe.data_sha256"] == full and tags["vaepipe.config_hash"] == config_hash(to_dict(cfg))
    # the same manifest written again later is the same data; one changed shard is not
    assert manifest_hash({**manifest, "created": "2031-01-01T00:00:00Z", "last_run": {}}) == full
    changed = tmp_path / "changed"
    _change_one_shard(shards32, changed)
    other = start_run(_cfg(str(changed), tmp_path), uri)
    assert _dataset_input(client, other).dataset.digest != inp.dataset.digest
    assert _dataset_input(client, other).dataset.digest == manifest_hash(read_manifest(str(changed)))[:DIGEST_LEN]


def test_source_url_credentials_never_reach_the_dataset_input():
    from pipeline.lineage import dataset_input

    manifest = {"format": "vaepipe-shards/1", "resolution": 32, "splits": {}, "attr_names": ["Smiling"]}
    inp = dataset_input(manifest, "s3://bucket/faces?X-Amz-Signature=abcdef123456", "train")
    assert "abcdef123456" not in inp.dataset.source and inp.dataset.source_type == "s3"


def test_config_hash_is_the_model_not_where_it_runs(shards32, tmp_path):
    a = to_dict(_cfg(shards32, tmp_path))
    b = to_dict(_cfg(shards32, tmp_path / "elsewhere", **{"tracking.experiment": "x", "train.run_name": "trial-7"}))
    c = to_dict(_cfg(shards32, tmp_path, **{"model.latent_dim": 16}))
    assert config_hash(a) == config_hash(b) != config_hash(c)


def _logged_model_run(cfg, uri: str) -> str:
    from models import build_model
    from pipeline.config import to_yaml
    from pipeline.serving import log_pyfunc
    from pipeline.tracking import end_run

    run_id = start_run(cfg, uri)
    client = make_client(uri)
    client.log_metric(run_id, "val_neg_elbo", 1234.5)
    model = build_model(cfg.model)
    path = Path(cfg.train.storage_path) / run_id / "weights.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    mc = {"name": cfg.model.name, **model.config}
    torch.save({"model_config": mc, "state_dict": model.state_dict(), "config": to_dict(cfg)}, path)
    client.set_tag(run_id, "vaepipe.model_uri", log_pyfunc(run_id, path, mc, to_yaml(cfg)))
    end_run(uri, run_id)
    return run_id


def test_registered_version_names_data_config_and_code_with_a_model_card(shards32, tmp_path):
    from pipeline.tracking import register_model

    cfg = _cfg(shards32, tmp_path)
    uri = cfg.tracking.tracking_uri
    run_id = _logged_model_run(cfg, uri)
    version = register_model(uri, run_id, "vae-lineage", "champion")
    client = make_client(uri)
    mv = client.get_model_version("vae-lineage", str(version))
    run_tags = client.get_run(run_id).data.tags
    for key in ("vaepipe.data_digest", "vaepipe.data_sha256", "vaepipe.config_hash", "vaepipe.code_version"):
        assert mv.tags[key] == run_tags[key], key
    assert mv.tags["vaepipe.data_digest"] == _dataset_input(client, run_id).dataset.digest
    card = mv.description
    assert "conv_vae" in card and "synth32" in card and mv.tags["vaepipe.data_digest"] in card
    assert "val_neg_elbo 1234" in card and f'load_model("models:/vae-lineage/{version}")' in card


def test_images_are_retrievable_by_key_and_step(shards32, tmp_path):
    from PIL import Image

    cfg = _cfg(shards32, tmp_path)
    uri = cfg.tracking.tracking_uri
    run_id = start_run(cfg, uri)
    log = RankZeroLogger(uri, run_id, enabled=True)
    rng = np.random.default_rng(0)
    grids = {step: rng.integers(0, 256, (9, 17, 3), dtype=np.uint8) for step in (5, 10)}
    for step, grid in grids.items():
        log.image(grid, "reconstructions", step)
    log.flush()
    client = make_client(uri)
    found = logged_images(client, run_id)
    assert set(found) == {("reconstructions", 5), ("reconstructions", 10)}
    local = client.download_artifacts(run_id, found[("reconstructions", 10)], str(tmp_path))
    assert np.array_equal(np.asarray(Image.open(local)), grids[10])  # lossless, the picture of its step
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_a_resumed_rank_does_not_log_the_redone_steps_twice(shards32, tmp_path):
    """The run holds metrics to step 4 (loss) and 3 (val_loss) and images at 2 and 4; a rank
    resumed from step 2 logs steps 3-6 again. Each key keeps one value per step: the first one."""
    from pipeline.logger import logged_images as all_logged

    cfg = _cfg(shards32, tmp_path)
    uri = cfg.tracking.tracking_uri
    run_id = start_run(cfg, uri)
    first = RankZeroLogger(uri, run_id, enabled=True)
    grid = np.zeros((5, 5, 3), dtype=np.uint8)
    for step in (1, 2, 3, 4):
        first.metrics({"loss": float(step), **({"val_loss": 10.0 * step} if step <= 3 else {})}, step)
        if step % 2 == 0:
            first.image(grid, "samples", step)
    first.flush()
    resumed = RankZeroLogger(uri, run_id, enabled=True)
    resumed.skip_held()
    for step in (3, 4, 5, 6):
        resumed.metrics({"loss": step + 0.5, "val_loss": 10.0 * step + 0.5}, step)
        if step % 2 == 0:
            resumed.image(grid, "samples", step)
    resumed.flush()
    client = make_client(uri)
    history = {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in ("loss", "val_loss")}
    assert history["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5)]
    assert history["val_loss"] == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.5), (5, 50.5), (6, 60.5)]
    images = all_logged(client, run_id)
    assert sorted(images) == [("samples", 2), ("samples", 4), ("samples", 6)]
    assert all(len(paths) == 1 for paths in images.values()), images


def test_system_metrics_name_each_rank_and_stop(shards32, tmp_path):
    from pipeline.train.system_metrics import RankSystemMetrics

    cfg = _cfg(shards32, tmp_path)
    uri = cfg.tracking.tracking_uri
    run_id = start_run(cfg, uri)
    monitors = [RankSystemMetrics(uri, run_id, f"rank{r}-127.0.0.1", interval_s=0.1).start() for r in (0, 1)]
    time.sleep(0.5)
    for m in monitors:
        m.finish()
    assert not any(m._thread.is_alive() for m in monitors)
    metrics = make_client(uri).get_run(run_id).data.metrics
    for r in (0, 1):
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "process_memory_rss_megabytes"):
            assert f"system/rank{r}-127.0.0.1/{name}" in metrics, sorted(metrics)
        assert metrics[f"system/rank{r}-127.0.0.1/process_memory_rss_megabytes"] > 10
    history = make_client(uri).get_metric_history(run_id, "system/rank0-127.0.0.1/cpu_utilization_percentage")
    assert len(history) >= 2 and [m.step for m in history] == list(range(len(history)))


def test_tune_promote_refuses_nll_before_any_trial(shards32, tmp_path):
    from pipeline.promote import check_gate_before_sweep

    cfg = _cfg(shards32, tmp_path, **{"model.likelihood": "bernoulli"})
    with pytest.raises(ValueError, match=r"'nll' is not defined.*--metrics neg_iwae_nats"):
        check_gate_before_sweep(cfg, ["nll", "au"])
    with pytest.raises(ValueError, match="unknown"):
        check_gate_before_sweep(cfg, ["nlll"])
    check_gate_before_sweep(cfg, ["neg_iwae_nats", "au"])

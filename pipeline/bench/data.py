"""``vaepipe bench data``: the streaming reader's images/s beside two baselines and the training step.

Every reader makes the same batches from the same train shards (decode, grayscale/RGB,
antialiased resize to the configured resolution, stack, scale to [0, 1]):

- ``tarfile + PIL``: a plain loop over the tars in one process, the least a reader can do;
- ``webdataset``: WebDataset's own pipeline stages (shard list, split by worker, tar to
  samples, shuffle, PIL decode with ``warn_and_continue``, batch) doing the same work;
- ``vaepipe``: ``ShardStream`` as a training rank uses it, one process, and then one process
  per worker (``dist.num_workers`` ranks at once, each reading its own share: the total is
  what the job's workers get together).

The training step's consumption is the bare loop's images/s on in-memory data (forward,
backward, optimizer on all cores, convolutions in the job's layout, ``train.channels_last``):
the reader keeps up when its total is above it, and the issue's bar is 3x. A local shard set
measures decode; an ``s3://`` one measures the network too.
"""

from __future__ import annotations

import importlib
import io
import multiprocessing as mp
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from PIL import Image

from pipeline.bench.report import BenchReport, spread
from pipeline.config import VaepipeConfig
from pipeline.data import storage
from pipeline.data.epoch_reader import image_pixels


def _train_urls(cfg: VaepipeConfig) -> list[str]:
    from pipeline.data.shards import read_manifest

    manifest = read_manifest(cfg.data.path)
    return [storage.join(cfg.data.path, s["name"]) for s in manifest["splits"]["train"]["shards"]]


def _batches(images, batch: int):
    """Stack an image iterator into float batches; returns how many images went into full batches."""
    items, n = [], 0
    for x in images:
        items.append(x)
        if len(items) == batch:
            torch.stack(items).float().div_(255.0)
            items, n = [], n + batch
    return n


def read_tarfile_pil(cfg: VaepipeConfig) -> int:
    def images():
        for url in _train_urls(cfg):
            with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r|") as tar:
                for member in tar:
                    if member.name.endswith(".jpg"):
                        with Image.open(io.BytesIO(tar.extractfile(member).read())) as img:
                            yield image_pixels(img, cfg.data.resolution, cfg.data.channels)
    return _batches(images(), cfg.data.batch_size)


def _open_streams(urls):
    """WebDataset's url_opener stage, through vaepipe's storage (local files and s3:// alike)."""
    for sample in urls:
        yield {**sample, "stream": storage.open_read(sample["url"])}


def read_webdataset(cfg: VaepipeConfig) -> int:
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    res, ch = cfg.data.resolution, cfg.data.channels
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(_train_urls(cfg)), wds.split_by_worker, _open_streams,
        lambda src: tar_file_expander(src, handler=wds.warn_and_continue), group_by_keys,
        wds.shuffle(cfg.data.shuffle_buffer), wds.decode("pil", handler=wds.warn_and_continue),
        wds.map(lambda s: image_pixels(s["jpg"], res, ch), handler=wds.warn_and_continue),
    )
    return _batches(pipeline, cfg.data.batch_size)


def read_vaepipe(cfg: VaepipeConfig, rank: int = 0, world: int = 1) -> int:
    from pipeline.data.stream import ShardStream

    stream = ShardStream(cfg.data.path, "train", cfg.data.batch_size, cfg.data.resolution, rank, world,
                         seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                         num_workers=cfg.data.loader_workers, channels=cfg.data.channels, binarize=cfg.data.binarize)
    return sum(len(b["image"]) for b in stream.iter_epoch(0))


def timed(fn, *args) -> float:
    """images/s of one pass of ``fn`` (which returns the images it delivered), on one torch thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t0 = time.perf_counter()
        n = fn(*args)
        return n / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)


def _rank_rate(args) -> float:
    importlib.import_module("pipeline.data.stream")  # imported before the clock starts, as in a worker
    cfg, rank, world = args
    return timed(read_vaepipe, cfg, rank, world)


def read_vaepipe_parallel(cfg: VaepipeConfig, world: int) -> tuple[float, float]:
    """``world`` ranks reading at once in their own processes: (total images/s, per process)."""
    # each rate is its own process's, measured while all run; a reader process that dies fails
    # the bench (BrokenProcessPool) where multiprocessing.Pool would wait for it forever
    with ProcessPoolExecutor(world, mp_context=mp.get_context("spawn")) as pool:
        rates = list(pool.map(_rank_rate, [(cfg, r, world) for r in range(world)]))
    return sum(rates), sum(rates) / world


def data_bench(cfg: VaepipeConfig, repeats: int, consumption_steps: int = 30) -> BenchReport:
    from pipeline.bench.baseline import load_in_memory, run_baseline
    from pipeline.bench.overhead import resolved_precision

    readers = {"tarfile + PIL, 1 process": read_tarfile_pil, "webdataset pipeline, 1 process": read_webdataset,
               "vaepipe ShardStream, 1 process": read_vaepipe}
    rates = {name: [] for name in readers}
    parallel_total, parallel_each = [], []
    for _ in range(repeats):  # alternating, so drift hits every reader alike
        for name, fn in readers.items():
            rates[name].append(timed(fn, cfg))
        total, each = read_vaepipe_parallel(cfg, cfg.dist.num_workers)
        parallel_total.append(total)
        parallel_each.append(each)
    run_cfg = resolved_precision(cfg)
    consumption = run_baseline(run_cfg, load_in_memory(run_cfg, 2048), consumption_steps,
                               channels_last=run_cfg.train.channels_last).images_per_sec
    return build_report(cfg, rates, parallel_total, parallel_each, consumption)


def build_report(cfg, rates: dict, parallel_total: list, parallel_each: list, consumption: float) -> BenchReport:
    base = spread(rates["tarfile + PIL, 1 process"])["median"]
    rows = []
    for name, values in rates.items():
        s = spread(values)
        rows.append({"reader": name, "images/s": s["median"], "± %": s["spread_pct"], "vs tarfile+PIL": s["median"] / base,
                     "vs training step": s["median"] / consumption})
    total, each = spread(parallel_total), spread(parallel_each)
    w = cfg.dist.num_workers
    rows.append({"reader": f"vaepipe ShardStream, {w} processes (total)", "images/s": total["median"],
                 "± %": total["spread_pct"], "vs tarfile+PIL": total["median"] / base,
                 "vs training step": total["median"] / consumption})
    rows.append({"reader": "training step consumption (bare loop, job's layout, all cores)", "images/s": consumption,
                 "± %": 0.0, "vs tarfile+PIL": consumption / base, "vs training step": 1.0})
    summary = {"tarfile_pil_images_per_sec": base,
               "webdataset_images_per_sec": spread(rates["webdataset pipeline, 1 process"])["median"],
               "vaepipe_images_per_sec": spread(rates["vaepipe ShardStream, 1 process"])["median"],
               "vaepipe_total_images_per_sec": total["median"], "vaepipe_per_process_images_per_sec": each["median"],
               "training_images_per_sec": consumption, "reader_vs_training": total["median"] / consumption}
    params = {"data": cfg.data.path, "resolution": cfg.data.resolution, "batch_size": cfg.data.batch_size,
              "loader_workers": cfg.data.loader_workers, "shuffle_buffer": cfg.data.shuffle_buffer,
              "processes": w, "repeats": len(parallel_total), "model": cfg.model.name}
    notes = ["each reader: one pass over the train split, median of repetitions (± half the range)",
             f"training step: bare loop at global batch {cfg.data.batch_size * w}, data in memory, {w} threads"]
    return BenchReport("data", f"streaming reader at {cfg.data.resolution}px ({cfg.data.path})", rows, summary, params,
                       chart=_chart, notes=notes)


def _chart(ax, report: BenchReport) -> None:
    ax.barh([r["reader"] for r in report.rows], [r["images/s"] for r in report.rows])
    ax.axvline(report.summary["training_images_per_sec"], color="k", linestyle="--", linewidth=1)
    ax.axvline(3 * report.summary["training_images_per_sec"], color="r", linestyle=":", linewidth=1)
    ax.set_xlabel("images/s (dashed: training step; dotted: 3x)")
    ax.tick_params(axis="y", labelsize=7)


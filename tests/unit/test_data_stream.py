"""ShardStream: equal steps per rank, disjoint shares, resize, corrupt samples, resume."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.epoch_reader import batches_of_worker, raw_bytes
from pipeline.data.stream import ShardStream

try:
    from tests.data_fixtures import STORED_RES, jpeg_bytes, shard_dir, synth_dir, write_raw_shard_set  # noqa: F401
except ImportError:
    from data_fixtures import STORED_RES, jpeg_bytes, shard_dir, synth_dir, write_raw_shard_set  # noqa: F401


def _epoch_keys(stream, epoch=0, start_step=0):
    batches = list(stream.iter_epoch(epoch, start_step))
    return batches, [k for b in batches for k in b["key"]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_same_steps_full_batches_disjoint(shard_dir, num_workers):
    # 5 train shards of 20,20,20,20,16 samples: ranks get 60 and 36 samples but run the same steps.
    per_rank = []
    for rank in (0, 1):
        stream = ShardStream(str(shard_dir), "train", 8, STORED_RES, rank, 2, shuffle_buffer=16,
                             num_workers=num_workers)
        assert stream.steps_per_epoch == 96 // 16
        batches, keys = _epoch_keys(stream)
        assert len(batches) == 6 and all(len(b["key"]) == 8 for b in batches)
        b = batches[0]
        assert b["image"].shape == (8, 3, STORED_RES, STORED_RES) and b["image"].dtype == torch.float32
        assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.05
        assert b["attrs"].shape == (8, 40) and b["attrs"].dtype == torch.long
        assert b["factors"].shape == (8, 7) and sum(x["n_corrupt"] for x in batches) == 0
        # Smiling is decided by the smile factor in the synthetic set: labels must travel together.
        assert torch.equal(b["attrs"][:, 31], b["factors"][:, 5])
        unique = len(set(keys))
        if num_workers == 0:  # a short rank starts over only after its whole share was seen
            assert len(set(keys[:unique])) == unique
        per_rank.append(set(keys))
    assert not per_rank[0] & per_rank[1] and len(per_rank[0] | per_rank[1]) >= 80


def test_sample_level_split_when_fewer_shards_than_slots(shard_dir):
    # valid: one shard of 12 samples for 2 ranks x 2 loader workers -> every slot strides samples.
    keys = []
    for rank in (0, 1):
        stream = ShardStream(str(shard_dir), "valid", 3, 32, rank, 2, shuffle_buffer=4, num_workers=2)
        batches, k = _epoch_keys(stream)
        assert len(batches) == 2 and all(len(b["key"]) == 3 for b in batches)
        keys.append(set(k))
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 12


def test_resize_grayscale_and_too_large_resolution(shard_dir):
    stream = ShardStream(str(shard_dir), "train", 4, 32, 0, 1, num_workers=0)
    batch = next(stream.iter_epoch(0))
    assert batch["image"].shape == (4, 3, 32, 32)
    gray = next(ShardStream(str(shard_dir), "train", 4, 16, 0, 1, num_workers=0, channels=1).iter_epoch(0))
    assert gray["image"].shape == (4, 1, 16, 16)
    with pytest.raises(ValueError, match="resolution 128 .* stored resolution 64"):
        ShardStream(str(shard_dir), "train", 4, 128, 0, 1)
    with pytest.raises(ValueError, match="12 samples, fewer than world_size\\*batch_size = 2\\*8"):
        ShardStream(str(shard_dir), "test", 8, 32, 0, 2)
    with pytest.raises(KeyError, match="'nope'"):
        ShardStream(str(shard_dir), "nope", 4, 32, 0, 1)


def test_epochs_are_deterministic_and_differ(shard_dir):
    make = lambda: ShardStream(str(shard_dir), "train", 8, 32, 0, 1, seed=5, shuffle_buffer=32, num_workers=0)
    _, e0 = _epoch_keys(make(), 0)
    _, e0_again = _epoch_keys(make(), 0)
    _, e1 = _epoch_keys(make(), 1)
    assert e0 == e0_again and e0 != e1 and sorted(e0) == sorted(e1)


def test_resume_from_start_step(shard_dir):
    stream = ShardStream(str(shard_dir), "train", 8, 32, 1, 2, shuffle_buffer=16, num_workers=0)
    _, full = _epoch_keys(stream, 3)
    resumed, rest = _epoch_keys(stream, 3, start_step=2)
    assert len(resumed) == stream.steps_per_epoch - 2 and rest == full[16:]
    # With loader workers the same batches come back (worker interleaving may reorder them).
    par = ShardStream(str(shard_dir), "train", 8, 32, 1, 2, shuffle_buffer=16, num_workers=2)
    _, full_par = _epoch_keys(par, 3)
    _, rest_par = _epoch_keys(par, 3, start_step=3)
    assert sorted(rest_par) == sorted(full_par[24:])


def test_state_dict_round_trip(shard_dir):
    stream = ShardStream(str(shard_dir), "train", 8, 32, 0, 1, num_workers=0)
    it = stream.iter_epoch(2)
    next(it), next(it), next(it)
    assert stream.state_dict() == {"epoch": 2, "step_in_epoch": 3, "world_size": 1, "workers": 0, "segments": []}
    other = ShardStream(str(shard_dir), "train", 8, 32, 0, 1, num_workers=0)
    other.load_state_dict(stream.state_dict())
    assert (other.epoch, other.step_in_epoch) == (2, 3)
    other.load_state_dict({"epoch": 2, "step_in_epoch": stream.steps_per_epoch})  # finished epoch
    assert (other.epoch, other.step_in_epoch) == (3, 0)


def test_worker_batch_shares_add_up():
    for nw in (1, 2, 3):
        for start, stop in ((0, 7), (2, 7), (5, 5)):
            assert sum(batches_of_worker(w, nw, start, stop) for w in range(nw)) == stop - start


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_sample_is_skipped_and_counted(tmp_path, num_workers):
    good = [(f"a{i:03d}", jpeg_bytes((i * 10, 80, 160))) for i in range(20)]
    shard_a = good[:5] + [("broken", b"\xff\xd8 garbage, not a jpeg")] + good[5:]
    shard_b = [(f"b{i:03d}", jpeg_bytes((40, i * 10, 90))) for i in range(20)]
    folder = write_raw_shard_set(tmp_path / "raw", {"train-000000.tar": shard_a, "train-000001.tar": shard_b})
    stream = ShardStream(str(folder), "train", 10, 32, 0, 1, shuffle_buffer=0, num_workers=num_workers)
    assert stream.steps_per_epoch == 41 // 10
    batches, keys = _epoch_keys(stream)
    assert len(batches) == 4 and all(len(b["key"]) == 10 for b in batches)
    assert sum(b["n_corrupt"] for b in batches) == 1 and "broken" not in keys and len(set(keys)) == 40
    evaluated = list(stream.iter_eval())
    assert sum(b["n_corrupt"] for b in evaluated) == 1 and sum(len(b["key"]) for b in evaluated) == 40


def test_iter_eval_covers_split_once_across_ranks(shard_dir):
    keys = []
    for rank in (0, 1):
        stream = ShardStream(str(shard_dir), "train", 5, 32, rank, 2, num_workers=0)
        batches = list(stream.iter_eval("test"))
        assert all(0 < len(b["key"]) <= 5 for b in batches)
        keys.append([k for b in batches for k in b["key"]])
        again = [k for b in stream.iter_eval("test") for k in b["key"]]
        assert again == keys[-1]  # deterministic
        assert len(list(stream.iter_eval("test", max_batches=1))) == 1
    assert sorted(keys[0] + keys[1]) == [f"{i:06d}" for i in range(109, 121)]


def test_hq_folder_without_attributes_streams(tmp_path):
    from PIL import Image

    from pipeline.data.shards import write_shards

    hq = tmp_path / "hq"
    hq.mkdir()
    for i in range(40):
        Image.new("RGB", (80, 80), (i * 6, 30, 200 - i * 4)).save(hq / f"{i:05d}.png")
    manifest = write_shards(hq, str(tmp_path / "shards"), 32, shard_size=10, workers=1, progress=False)
    assert manifest["attr_names"] == [] and manifest["factor_names"] == []
    n_train = manifest["splits"]["train"]["num_samples"]
    stream = ShardStream(str(tmp_path / "shards"), "train", 4, 32, 0, 1, num_workers=0)
    batches = list(stream.iter_epoch(0))
    assert len(batches) == n_train // 4
    assert batches[0]["attrs"].shape == (4, 0) and "factors" not in batches[0]
    assert batches[0]["image"].shape == (4, 3, 32, 32)


def test_decoded_cache_gives_the_same_batches_and_decodes_each_image_once(shard_dir, monkeypatch):
    import pipeline.data.epoch_reader as stream_mod

    calls = []
    real = stream_mod.decode_sample
    monkeypatch.setattr(stream_mod, "decode_sample", lambda s, *a: calls.append(s["__key__"]) or real(s, *a))
    make = lambda mb: ShardStream(str(shard_dir), "train", 8, 32, 0, 1, seed=5, shuffle_buffer=32, num_workers=0, cache_mb=mb)
    plain, cached = make(0), make(64)
    for epoch in range(3):
        a, b = list(plain.iter_epoch(epoch)), list(cached.iter_epoch(epoch))
        assert [x["key"] for x in a] == [x["key"] for x in b]
        for x, y in zip(a, b):
            assert torch.equal(x["image"], y["image"])
    n_plain = 3 * plain.steps_per_epoch * 8
    # the uncached stream decoded every sample of every epoch; the cached one each image once
    assert len(calls) - n_plain == len(set(calls))
    held_raw = sum(raw_bytes(s) for s in cached.cache.raw.values())
    assert cached.cache.bytes == len(cached.cache.items) * 3 * 32 * 32 + held_raw


def test_decoded_cache_stops_growing_at_its_bound_and_needs_in_process_decoding(shard_dir, monkeypatch):
    import pipeline.data.epoch_reader as stream_mod

    reads = []
    real = stream_mod.iter_shard_or_skip
    monkeypatch.setattr(stream_mod, "iter_shard_or_skip", lambda url: reads.append(url) or real(url))
    stream = ShardStream(str(shard_dir), "train", 8, 32, 0, 1, num_workers=0, cache_mb=1)
    stream.cache.max_bytes = 10 * 3 * 32 * 32
    first = [b["key"] for b in stream.iter_epoch(0)]
    assert len(stream.cache.items) == 10 and stream.cache.bytes <= stream.cache.max_bytes
    n_first = len(reads)
    again = [b["key"] for b in stream.iter_epoch(0)]
    assert again == first and len(reads) == 2 * n_first  # shards it could not hold are read again
    with pytest.raises(ValueError, match="cache_mb=8 needs num_workers=0"):
        ShardStream(str(shard_dir), "train", 8, 32, 0, 1, num_workers=2, cache_mb=8)


def test_decoded_cache_starts_over_when_a_progressive_stage_changes_the_resolution(shard_dir):
    stream = ShardStream(str(shard_dir), "train", 8, 16, 0, 1, num_workers=0, cache_mb=16)
    list(stream.iter_epoch(0))
    stream.set_shape(32, 8)
    assert stream.cache.bytes == 0
    batches = list(stream.iter_epoch(1))
    assert batches[0]["image"].shape == (8, 3, 32, 32)


def test_shards_whose_images_are_all_cached_are_not_read_again(shard_dir, monkeypatch):
    import pipeline.data.epoch_reader as stream_mod

    reads = []
    real = stream_mod.iter_shard_or_skip
    monkeypatch.setattr(stream_mod, "iter_shard_or_skip", lambda url: reads.append(url) or real(url))
    stream = ShardStream(str(shard_dir), "train", 8, 32, 0, 1, seed=5, shuffle_buffer=32, num_workers=0, cache_mb=64)
    plain = ShardStream(str(shard_dir), "train", 8, 32, 0, 1, seed=5, shuffle_buffer=32, num_workers=0)
    first = [b["key"] for b in stream.iter_epoch(0)]
    n_first = len(reads)
    second = [b["key"] for b in stream.iter_epoch(1)]
    assert n_first >= 1 and len(reads) == n_first  # epoch 1 read no shard: every one was cached whole
    assert first == [b["key"] for b in plain.iter_epoch(0)] and second == [b["key"] for b in plain.iter_epoch(1)]


def test_shard_order_keeps_each_slots_shards_when_asked():
    from pipeline.data.epoch_reader import shard_order

    urls = [f"s{i}" for i in range(9)]
    fixed = [shard_order(urls, 3, e, 2, True) for e in range(5)]
    moving = [shard_order(urls, 3, e, 2, False) for e in range(5)]
    assert all(sorted(o) == urls for o in fixed + moving)  # every shard, once, every epoch
    for slot in range(2):
        assert len({frozenset(o[slot::2]) for o in fixed}) == 1  # the same share every epoch...
        assert len({tuple(o[slot::2]) for o in fixed}) > 1  # ...in a new order
    assert len({frozenset(o[0::2]) for o in moving}) > 1  # without the cache, shares move
    assert shard_order(urls, 3, 1, 1, True) == shard_order(urls, 3, 1, 1, False)  # one slot: nothing to fix


def test_with_a_cache_two_ranks_read_no_shard_after_their_first_epoch(shard_dir, monkeypatch):
    """A rank holds each shard it read whole, decoded or raw, even where its first epoch ended
    with samples still in the shuffle buffer (uneven shards here), so later epochs read nothing;
    both ranks still deliver disjoint full batches every epoch."""
    import pipeline.data.epoch_reader as stream_mod

    reads = {0: [], 1: []}
    real = stream_mod.iter_shard_or_skip
    streams = [ShardStream(str(shard_dir), "train", 4, 32, r, 2, seed=1, shuffle_buffer=16, num_workers=0, cache_mb=64)
               for r in range(2)]
    assert len(streams[0]._urls("train")) >= 4
    per_epoch = []
    for epoch in range(5):
        keys = []
        for r, stream in enumerate(streams):
            monkeypatch.setattr(stream_mod, "iter_shard_or_skip", lambda url, r=r: reads[r].append(url) or real(url))
            batches = list(stream.iter_epoch(epoch))
            assert len(batches) == stream.steps_per_epoch and all(b["image"].shape[0] == 4 for b in batches)
            keys.append({k for b in batches for k in b["key"]})
        assert not keys[0] & keys[1]
        per_epoch.append(sum(len(v) for v in reads.values()))
    assert per_epoch[0] >= 4 and len(set(per_epoch)) == 1, per_epoch  # epochs 1-4 read nothing

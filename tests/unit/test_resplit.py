"""An epoch resumed on another world size deals out exactly what the old ranks left: no sample
of the epoch lost (beyond the last partial global batch) and none seen twice, every new rank
running the same number of steps; a second change inside the same epoch chains."""

from __future__ import annotations

from pipeline.data.stream import ShardStream

B = 8


def _ranks(url: str, world: int, state: dict | None = None, stop: int | None = None):
    """Every rank of a layout from ``state`` (or epoch 0) for ``stop`` steps: keys per rank, last state."""
    keys, states, steps = [], [], []
    for rank in range(world):
        s = ShardStream(url, "train", B, 32, rank, world, seed=0, shuffle_buffer=16, num_workers=0)
        if state is not None:
            s.load_state_dict(state)
        mine = []
        for n, batch in enumerate(s.iter_epoch(s.epoch, s.step_in_epoch), 1):
            assert len(batch["key"]) == B
            mine += batch["key"]
            if stop is not None and n >= stop:
                break
        keys.append(mine)
        states.append(s.state_dict())
        steps.append(len(mine) // B)
    assert len(set(steps)) == 1, f"ranks ran different step counts: {steps}"
    return keys, states[0]


def _flat(keys):
    return [k for rank in keys for k in rank]


def test_two_ranks_to_one_mid_epoch_loses_and_repeats_nothing(shards32):
    everything = ShardStream(shards32, "train", B, 32, 0, 1, num_workers=0).all_keys()
    before, state = _ranks(shards32, 2, stop=5)
    assert state["world_size"] == 2 and state["step_in_epoch"] == 5
    after, end = _ranks(shards32, 1, state)
    seen = _flat(before) + _flat(after)
    assert len(seen) == len(set(seen))  # nothing twice
    assert len(set(everything) - set(seen)) < 1 * B  # only the last partial batch is left out
    assert end["segments"] == [{"world_size": 2, "workers": 0, "steps": 5}]


def test_one_rank_to_two_then_back_to_one_inside_one_epoch(shards32):
    everything = ShardStream(shards32, "train", B, 32, 0, 1, num_workers=0).all_keys()
    first, state = _ranks(shards32, 1, stop=4)
    second, state = _ranks(shards32, 2, state, stop=3)
    assert [len(k) for k in second] == [3 * B, 3 * B]
    assert not set(second[0]) & set(second[1])  # disjoint shares
    third, _ = _ranks(shards32, 1, state)
    seen = _flat(first) + _flat(second) + _flat(third)
    assert len(seen) == len(set(seen))
    assert len(set(everything) - set(seen)) < 2 * B


def test_the_next_epoch_is_a_normal_one(shards32):
    _, state = _ranks(shards32, 2, stop=5)
    s = ShardStream(shards32, "train", B, 32, 0, 1, seed=0, shuffle_buffer=16, num_workers=0)
    s.load_state_dict(state)
    rest = sum(1 for _ in s.iter_epoch(s.epoch, s.step_in_epoch))
    assert rest == (240 - 80) // B
    assert s.segments and sum(1 for _ in s.iter_epoch(s.epoch + 1)) == s.steps_per_epoch
    assert s.segments == []


def test_same_layout_resume_is_unchanged(shards32):
    _, state = _ranks(shards32, 2, stop=5)
    s = ShardStream(shards32, "train", B, 32, 1, 2, seed=0, shuffle_buffer=16, num_workers=0)
    s.load_state_dict(state)
    assert (s.epoch, s.step_in_epoch, s.segments) == (0, 5, [])

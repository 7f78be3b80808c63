"""Seeds derived from (run seed, coordinates) are independent of their neighbours and the same in
every process, whatever Python's hash randomisation."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.seeds import mixed_seeds


def test_neighbouring_coordinates_give_unrelated_seeds():
    seeds = {mixed_seeds(seed, rank)[0] for seed in range(4) for rank in range(4)}
    assert len(seeds) == 16  # seed + rank arithmetic would give 7 distinct values here
    assert mixed_seeds(3, 1, 2, n=2) == mixed_seeds(3, 1, 2, n=2)
    assert mixed_seeds(3, 1, 2, n=2)[0] != mixed_seeds(3, 2, 1, n=2)[0]
    assert all(0 <= s < 2**64 for s in mixed_seeds(-1, 0, n=3))  # a negative run seed folds into range


def test_the_same_in_a_process_with_another_hash_seed():
    code = "from pipeline.seeds import mixed_seeds; print(mixed_seeds(11, 0, 3, 1, n=2))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(mixed_seeds(11, 0, 3, 1, n=2))

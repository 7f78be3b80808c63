"""One way to derive independent seeds from a run's seed and the coordinates of a draw.

``np.random.SeedSequence`` mixes its entropy words through a hash, so (seed, rank) and
(seed + 1, rank - 1) give unrelated streams, which ``seed + rank`` arithmetic would not, and
the result is the same in every process (Python's ``hash`` of a tuple is too, for ints, but it
is not documented to stay so across versions).
"""

from __future__ import annotations

import numpy as np


def mixed_seeds(seed: int, *coordinates: int, n: int = 1) -> list[int]:
    """``n`` 64-bit seeds drawn from (``seed``, *``coordinates``); every coordinate a non-negative int."""
    state = np.random.SeedSequence([seed % 2**63, *coordinates]).generate_state(n, np.uint64)
    return [int(s) for s in state]

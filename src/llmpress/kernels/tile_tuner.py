"""Picks the fastest usable tile of a kernel per call shape, timed once, outside any CUDA graph capture.

Used instead of triton.autotune where the grid and the split-K factor derive from the tile, or where the
candidates depend on the shape (kernels/triton_int4_rows_mma.py, kernels/triton_int4_rows_split.py).
"""

from __future__ import annotations

from typing import Callable, Hashable

import torch
import triton
import triton.testing


class TileTuner:
    def __init__(self):
        self.best: dict[Hashable, tuple] = {}

    def pick(self, key: Hashable, launch: Callable[[tuple], None], candidates: list[tuple]) -> tuple:
        """The fastest of `candidates` (each passed to `launch`) for `key`; the first one while a CUDA graph
        is being captured (timing would launch kernels into the graph) or when there is no choice."""
        if key in self.best:
            return self.best[key]
        if torch.cuda.is_current_stream_capturing() or len(candidates) == 1:
            return candidates[0]
        timings = {c: triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20) for c in candidates}
        self.best[key] = min(timings, key=timings.get)
        return self.best[key]

"""Capture a fixed-shape step once as a CUDA graph and replay it: one launch instead of hundreds."""

from __future__ import annotations

from typing import Callable

import torch

# torch.compile's options for a step captured whole as one CUDA graph: Inductor's own CUDA graphs stay off (we
# capture the step ourselves), and coordinate descent tunes each kernel's launch configuration by timing it. The
# 3B's bf16 decode varies 342-441 tok/s between compilations on the H200 (benchmarks/NOTES.md, session 17); whether
# that is the tuning is not known yet (benchmarks/int4_gpu.py's bf16-nocd variant turns it off).
STEP_COMPILE_OPTIONS = {"coordinate_descent_tuning": True, "triton.cudagraphs": False}


class GraphedStep:
    """Wraps `fn(*inputs) -> Tensor` whose inputs keep their shapes; calls copy into static buffers and replay.

    Warm-up runs (which compile and autotune, if `fn` is compiled) happen on a side stream before
    capture, as torch.cuda.graphs requires. The returned tensor is the graph's static output:
    read or clone it before the next call.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: tuple[torch.Tensor, ...], warmup_runs: int = 3,
                 reset: Callable[[], None] | None = None):
        """reset: called before each warm-up run and before the capture, for a step that advances state of its own
        (a position it increments), so that warm-up runs start where the captured step will."""
        self.static_inputs = tuple(x.clone() for x in example_inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup_runs):
                if reset is not None:
                    reset()
                fn(*self.static_inputs)
            if reset is not None:
                reset()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_output = fn(*self.static_inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self.static_inputs, inputs):
            static.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_output

"""Programmatic dependent launch (PDL, Hopper and later) for our batch-1 decode kernels.

Why: at batch 1 a decoder layer is a chain of small kernels, and each one pays a fixed cost before its
first byte arrives (launch, then a DRAM round trip): 3.0-3.7 us for the 3B's q|k|v and o GEMVs on the
H200, as long as the weight read itself (benchmarks/NOTES.md, session 4). With PDL the next kernel is
launched while this one is still running: its programs start, issue the loads that depend on nothing
before them (the weights), and wait at `griddepcontrol.wait` for the previous grid to finish and flush
before they read or write anything else. The fixed cost then overlaps the previous kernel's tail.

The rule every kernel launched this way follows: before `gdc_wait`, only loads of tensors no kernel ever
writes (weights); every other load and every store after it. `gdc_launch_dependents` lets the next kernel
launch as soon as all of this kernel's programs have called it: at their start ("early") or once their own
wait is over ("late", so that at most two kernels' programs are resident at a time). Both are no-ops on a
launch without PDL, and CUDA graphs keep the launch attribute as a programmatic edge.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import cuda as tl_cuda

from llmpress.kernels.triton_int4 import INTERPRETED

# "off", "early" or "late" (above). Early by default since the tensor-core GEMV (kernels/triton_int4_frag.py) waits
# only after its weight loads: 3B int4 decode with an int4 head on the H200, batch 1, each twice in one run
# (benchmarks/int4_gpu.py variants int4-tc-only-swiglu+head, int4-tc-only-pdl+head, int4-tc-only-pdl-late+head,
# results/int4_h200_frag_pdl.*): off 722.5 / 722.2 tok/s, early 783.2 / 783.1 (+8.4%), late 750.3.
MODES = {"off": 0, "early": 1, "late": 2}
mode = "early"
# The split GEMV (kernels/triton_int4_rows_split.py) under PDL was slower (3B int4 decode, results/int4_h200_pdl_ab.*:
# off 581.2 / 580.8 tok/s, early 552.4 / 551.5, late 545.5 / 545.6), so it takes PDL only with this switched on. Not
# because its wait was hoisted (as ptxas did with the fragment GEMV's unpredicated one): its sm_90 SASS has the
# tile's 12 weight loads before the wait (compiled on the CPU machine). Not diagnosed further.
split_gemv = False

gdc_wait = tl_cuda.gdc_wait
gdc_launch_dependents = tl_cuda.gdc_launch_dependents


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """A PDL kernel's first step: the early trigger (PDL == 1)."""
    if PDL == 1:
        gdc_launch_dependents()


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """Wait for the previous kernel (any PDL launch), then the late trigger (PDL == 2); after the loads of what no
    kernel writes, before everything else."""
    if PDL:
        gdc_wait()
    if PDL == 2:
        gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _supports_pdl(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def launch_mode(device: torch.device) -> int:
    """The PDL constexpr for kernels on `device` (0: launched without PDL; 1 early, 2 late trigger): `mode` on
    Hopper or later, 0 elsewhere and in the interpreter. Launch with launch_pdl=bool(it)."""
    return MODES[mode] * (not INTERPRETED and device.type == "cuda" and _supports_pdl(
        torch.cuda.current_device() if device.index is None else device.index))

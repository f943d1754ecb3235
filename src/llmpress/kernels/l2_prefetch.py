"""Asking the L2 for bytes a later kernel will read (`cp.async.bulk.prefetch.L2`, sm_90): a hint with no result.

Why: at batch 1 a decoder layer's attention and o product read little and wait on latency for ~10 us, while DRAM
idles; gate|up, the next product, then streams 26 MB (the 3B) at ~58% of the copy bandwidth. The o product's
programs are resident during attention (programmatic dependent launch) and can ask for gate|up's weights before
they wait. Session 17 asked from attention's programs after their wait, and decode slowed by about the prefetch's
transfer time (results/int4_h200_s17c.*): the o product waits for attention's grid to complete, and it seemingly did
not complete before its prefetches had landed. Issued before the o product's wait, the transfer overlaps attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 4096  # bytes one instruction asks for (the asm below spells it out)
LANES = 128  # instructions a program issues a round


@triton.jit
def prefetch_l2(base_ptr, chunks, rounds, LANES: tl.constexpr):
    """This program's share of `chunks` CHUNK-byte runs from base_ptr (bytes), round-robin over the grid."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    me = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    lanes = tl.arange(0, LANES)
    for r in range(rounds):
        chunk = (r * programs + me) * LANES + lanes
        wanted = (chunk < chunks).to(tl.int32)
        ptrs = base_ptr + tl.minimum(chunk, chunks - 1).to(tl.int64) * 4096
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], 4096; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, wanted], dtype=tl.int32, is_pure=False, pack=1)


def prefetch_operands(weights: torch.Tensor | None, nbytes: int, programs: int, dummy: torch.Tensor) -> dict:
    """The kernel arguments for asking the L2 for the first `nbytes` of `weights` from `programs` programs:
    PREFETCH False (and `dummy` as the pointer) where there is nothing to ask for, or off CUDA."""
    chunks = min(nbytes, weights.nbytes) // CHUNK if weights is not None and weights.is_cuda and nbytes > 0 else 0
    return dict(prefetch_ptr=weights.view(torch.uint8) if chunks else dummy, prefetch_chunks=max(chunks, 1),
                prefetch_rounds=triton.cdiv(chunks, programs * LANES), PREFETCH=chunks > 0, PREFETCH_LANES=LANES)

"""Tensor-core W4A16 matmul over the row layout (kernels/triton_int4_rows.py) for 2..16 rows of x.

The packed words are read as bytes, qb [N, K/2]: byte c of row n holds inputs 2c (low nibble) and 2c + 1
(high nibble), so a group's byte tile yields two [BLOCK_N, GROUP_SIZE/2] dot operands, against x's even
and odd inputs. A nibble becomes a 16-bit float MAGIC_VALUE + q with one OR; the zero point and the scale
are applied per group after the dot; each program takes one [BLOCK_N rows x GROUPS groups] tile, split-K
over the rest (the last program of a tile adds the partial sums, `triton_int4._write_output`).
At M = 4 it takes 2.1 ms over a 3B token's linears, against 3.9 ms for the CUDA-core GEMV and 4.4 ms for
dequantize + cuBLAS; at M = 1 it is 1.77 ms against the GEMV's 1.72 (H200, int4_rows_h200_run5.json).
Reference: `kernels.reference.int4_matmul_rows_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpress.kernels.tile_tuner import TileTuner
from llmpress.kernels.triton_int4 import INTERPRETED as _INTERPRETED, _workspace, _write_output


# (BLOCK_N, GROUPS, num_warps) of the tensor-core GEMV: each program reads one [BLOCK_N, GROUPS groups] tile
MMA_CONFIGS = [(64, 1, 4), (64, 2, 4), (64, 4, 4), (64, 8, 4), (128, 1, 4), (128, 2, 4), (128, 4, 4), (128, 2, 8),
               (128, 4, 8), (256, 1, 8), (256, 2, 8), (32, 4, 4)]
MMA_MAX_M = 16  # one tl.dot tile of x rows; beyond it dequantize + cuBLAS
MMA_WORKSPACE = 1 << 22  # fp32 partial sums: fixed, so CUDA graphs never see the buffer move


# Four packed bytes -> their eight nibbles as 16-bit floats MAGIC_VALUE + q, two per register: PRMT spreads
# bytes 0, 1 (then 2, 3) into the two 16-bit halves of a word, one LOP3 keeps the low nibbles and ORs in the
# magic exponent, a shift and a second LOP3 do the high nibbles: 8 instructions per 8 weights. The
# dot-operand layout hands each thread 2-byte pieces that PRMTs regroup first, so the whole kernel went
# from 1520 to 1440 SASS instructions per thread for a [128 x 2 groups] tile (benchmarks/NOTES.md).
_UNPACK_ASM = """{{
.reg .b32 t0, t1, h0, h1;
prmt.b32 t0, $4, 0, 0x4140;
prmt.b32 t1, $4, 0, 0x4342;
lop3.b32 $0, t0, 0x000F000F, {magic}, 0xEA;
lop3.b32 $1, t1, 0x000F000F, {magic}, 0xEA;
shr.u32 h0, t0, 4;
shr.u32 h1, t1, 4;
lop3.b32 $2, h0, 0x000F000F, {magic}, 0xEA;
lop3.b32 $3, h1, 0x000F000F, {magic}, 0xEA;
}}"""
UNPACK_ASM_BF16 = tl.constexpr(_UNPACK_ASM.format(magic="0x43004300"))
UNPACK_ASM_FP16 = tl.constexpr(_UNPACK_ASM.format(magic="0x64006400"))


@triton.jit
def _unpack_nibbles(packed, dtype: tl.constexpr, MAGIC: tl.constexpr, USE_ASM: tl.constexpr):
    """uint8 bytes -> (low nibbles, high nibbles) as `dtype` values MAGIC_VALUE + q, exactly."""
    if USE_ASM:
        if MAGIC == 0x4300:
            low, high = tl.inline_asm_elementwise(UNPACK_ASM_BF16, "=r,=r,=r,=r,r", [packed],
                                                  dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)
        else:
            low, high = tl.inline_asm_elementwise(UNPACK_ASM_FP16, "=r,=r,=r,=r,r", [packed],
                                                  dtype=(tl.float16, tl.float16), is_pure=True, pack=4)
    else:  # the same values in plain Triton (and in the interpreter, which has no inline assembly)
        wide = packed.to(tl.int16)
        low = ((wide & 0xF) | MAGIC).to(dtype, bitcast=True)
        high = (((wide >> 4) & 0xF) | MAGIC).to(dtype, bitcast=True)
    return low, high


@triton.jit
def _mma_rows(x_ptr, xs_ptr, qb_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, G, row_bytes,
                   stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr,
                   GROUPS: tl.constexpr, SPLIT_K, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr,
                   USE_ASM: tl.constexpr):
    """[BLOCK_N rows, GROUPS groups] of W per program, no loop: at batch 1 a GEMV is bound by how many bytes
    are in flight, and independent programs (and the unrolled groups inside one) keep more of them in
    flight than a loop whose next load waits for the previous step (one step per ~1 us on the H200).

    The packed weight is read as bytes, qb [N, K/2]: byte c holds inputs 2c (low nibble) and 2c + 1
    (high nibble), so the low and high nibbles of a group's byte tile are two [BLOCK_N, GROUP_SIZE/2]
    dot operands, against x's even and odd inputs. A nibble becomes a 16-bit float with one OR:
    MAGIC | q is MAGIC_VALUE + q exactly (bf16 128 + q, fp16 1024 + q). The products are exact and
    summed in fp32, so per group
        sum_k x_k (q_k - z) s = s * (dot - (MAGIC_VALUE + z) * sum_k x_k),
    with the group sums of x (xs [M, G], fp32) computed once per call instead of once per program."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HALF: tl.constexpr = GROUP_SIZE // 2  # bytes per group and row
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, HALF)
    n_mask = offs_n < N  # whole groups along K: no mask along a row, so the loads vectorize
    m_mask = offs_m < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for u in tl.static_range(GROUPS):
        g = pid_k * GROUPS + u
        packed = tl.load(qb_ptr + offs_n[:, None] * row_bytes + g * HALF + offs_c[None, :], mask=n_mask[:, None],
                         other=0, eviction_policy="evict_first")
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + g * GROUP_SIZE + 2 * offs_c[:, None]
        x_even = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        x_odd = tl.load(x_ptrs + 1, mask=m_mask[None, :], other=0.0)
        x_sum = tl.load(xs_ptr + offs_m * G + g, mask=m_mask, other=0.0)
        scale = tl.load(s_ptr + offs_n * G + g, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + offs_n * G + g, mask=n_mask, other=0).to(tl.float32)
        low, high = _unpack_nibbles(packed, dtype, MAGIC, USE_ASM)
        dot = tl.dot(high, x_odd, tl.dot(low, x_even))  # [BLOCK_N, BLOCK_M]
        acc += scale[:, None] * (dot - (MAGIC_VALUE + zero)[:, None] * x_sum[None, :])
    _write_output(tl.trans(acc), y_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_ym, pid_n, pid_k,
                  SPLIT_K)


def mma_fits(N: int, G: int, M: int, block_n: int, groups: int) -> bool:
    """A config is usable when its tiles split K evenly and its partial sums fit the fixed workspace."""
    split = G // groups
    return (G % groups == 0 and (split == 1 or split * M * N <= MMA_WORKSPACE)
            and triton.cdiv(N, block_n) <= 1 << 14)


def mma_candidates(G: int) -> list[tuple[int, int, int]]:
    """MMA_CONFIGS plus whole-K tiles (no split-K, so they fit any workspace) where K is short enough to unroll."""
    return MMA_CONFIGS + ([(64, G, 4), (128, G, 8)] if G <= 32 else [])


# 16-bit float patterns whose last mantissa bit is worth exactly 1: OR-ing q in gives MAGIC_VALUE + q
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


# the fastest usable tile per (device, M, N, K, group size, dtype)
_mma_tuner = TileTuner()


def mma_matmul_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    config: dict | None = None) -> torch.Tensor:
    """x [M, K] (M <= MMA_MAX_M, fp16/bf16) @ Wᵀ; `config` {"BLOCK_N", "GROUPS", "num_warps"} bypasses the tuner."""
    M, K = x.shape
    N, G = scales.shape
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partial, counter = _workspace.get(x.device, MMA_WORKSPACE, 1 << 14)
    magic, magic_value = _MAGIC[x.dtype]
    qbytes = qweight.view(torch.uint8)
    x_sums = x.unflatten(1, (G, group_size)).sum(dim=-1, dtype=torch.float32)  # [M, G]

    def launch(c: tuple[int, int, int]) -> None:
        block_n, groups, warps = c
        _mma_rows[(triton.cdiv(N, block_n), G // groups)](
            x, x_sums, qbytes, scales, zeros, y, partial, counter, M, N, G, K // 2, x.stride(0), y.stride(0),
            BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, GROUP_SIZE=group_size, GROUPS=groups,
            SPLIT_K=G // groups, MAGIC=magic, MAGIC_VALUE=magic_value, USE_ASM=not _INTERPRETED, num_warps=warps)

    if config is not None and "BLOCK_N" in config:
        assert mma_fits(N, G, M, config["BLOCK_N"], config["GROUPS"]), config
        launch((config["BLOCK_N"], config["GROUPS"], config["num_warps"]))
    else:
        # a whole-K tile needs no workspace: the fallback when every split-K tile would overflow it
        candidates = [c for c in mma_candidates(G) if mma_fits(N, G, M, c[0], c[1])] or [(64, G, 4)]
        launch(_mma_tuner.pick((x.device, M, N, K, group_size, x.dtype), launch, candidates))
    return y

"""Batch-1 W4A16 GEMV over the row layout (kernels/triton_int4_rows.py) in packed half2 arithmetic.

Experimental (family "half2", never picked by the dispatch). It tested one prediction: the CUDA-core
GEMV issues ~4-5 instructions per weight (an FADD and an FFMA per weight, plus unpacking); doing two
weights per instruction should cut that to ~2.5 and, if issue rate is the limit, speed it up ~1.5x.
Outcome on the H200 (session 4, benchmarks/NOTES.md): correct (its CUDA test passes), 4.25 SASS
instructions per weight, 1.33 ms over a 3B token's linears: 4% faster than the fp32 split-tile GEMV with
the same reduction, slower than `triton_int4_rows_split.py` as it is now (1.25 ms), with fp16 sums.

One inline-PTX block per packed word (8 weights, input 8w + j at bits 4j):
  - LOP3 with the fp16 magic 0x6400 (1024.0) turns the nibbles at bits 0 and 16 into the half pair
    (1024 + q0, 1024 + q4); the nibbles at bits 4 and 20 land as (1024 + 16 q1, 1024 + 16 q5) without a
    shift; a shift by 8 gives nibbles 2, 6 and 3, 7 the same way: 1 SHF + 4 LOP3.
  - HSUB2 of (1024, 1024) leaves exact small integers q (or 16 q).
  - Four HFMA2 against x pairs (x0, x4), (x1, x5)/16, (x2, x6), (x3, x7)/16 built once per program,
    shared by every row: 16 q x / 16 = q x exactly.
  - The pair's halves are summed in fp32.
x is scaled by 2^-6 before it becomes fp16 (and the sum by 2^6 after), so the fp16 partial sums of a
word (at most 8 * 15 * |x|) stay finite for |x| up to ~3.5e4. The zero point and scale are applied per
group as in the GEMV: sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k).
Reference: `kernels.reference.int4_matmul_rows_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpress.kernels.triton_int4 import _workspace, _write_output
from llmpress.kernels.triton_int4_rows_split import load_word_inputs, tile_pointers

X_SCALE = 1.0 / 64  # x in fp16 is x * X_SCALE; the lanes holding 16 q take x * X_SCALE / 16
HALF2_WORKSPACE = 1 << 22

_WORD_DOT_ASM = tl.constexpr("""{
.reg .b32 m, t, a, b, c, d, acc;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mov.b32 m, 0x64006400;
lop3.b32 a, $1, 0x000F000F, m, 0xEA;
lop3.b32 b, $1, 0x00F000F0, m, 0xEA;
shr.u32 t, $1, 8;
lop3.b32 c, t, 0x000F000F, m, 0xEA;
lop3.b32 d, t, 0x00F000F0, m, 0xEA;
sub.f16x2 a, a, m;
sub.f16x2 b, b, m;
sub.f16x2 c, c, m;
sub.f16x2 d, d, m;
mul.rn.f16x2 acc, a, $2;
fma.rn.f16x2 acc, b, $3, acc;
fma.rn.f16x2 acc, c, $4, acc;
fma.rn.f16x2 acc, d, $5, acc;
mov.b32 {lo, hi}, acc;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}""")


@triton.jit
def _half2_pair(high, low):
    """Two fp32 tensors -> int32 words holding (fp16(low), fp16(high)) in the (low, high) halves."""
    return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $1, $2;", "=r,r,r", [high, low], dtype=tl.int32,
                                     is_pure=True, pack=1)


@triton.jit
def _half2_gemv(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, N, G, words_per_row, stride_ym,
                     BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K,
                     X_SCALE: tl.constexpr):
    """y[0, n] for BLOCK_N rows over GROUPS groups per program (split-K over the rest), no loop."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, n_mask, word_ptrs, group_offsets, x_base = tile_pointers(x_ptr, qw_ptr, N, G, words_per_row, BLOCK_N,
                                                                     GROUPS, GROUP_SIZE)
    words = tl.load(word_ptrs, mask=n_mask[:, None, None], other=0, eviction_policy="evict_first")
    x0, x1, x2, x3, x4, x5, x6, x7 = load_word_inputs(x_base)
    x_sum = tl.sum(((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)), axis=1)  # [GROUPS]
    pair_04 = _half2_pair(x4 * X_SCALE, x0 * X_SCALE)
    pair_15 = _half2_pair(x5 * (X_SCALE / 16), x1 * (X_SCALE / 16))
    pair_26 = _half2_pair(x6 * X_SCALE, x2 * X_SCALE)
    pair_37 = _half2_pair(x7 * (X_SCALE / 16), x3 * (X_SCALE / 16))
    per_word = tl.inline_asm_elementwise(_WORD_DOT_ASM, "=r,r,r,r,r,r",
                                         [words, pair_04[None, :, :], pair_15[None, :, :], pair_26[None, :, :],
                                          pair_37[None, :, :]], dtype=tl.float32, is_pure=True, pack=1)
    dot = tl.sum(per_word, axis=2) * (1.0 / X_SCALE)  # [BLOCK_N, GROUPS]: sum_k x_k q_k per group
    scale = tl.load(s_ptr + group_offsets, mask=n_mask[:, None], other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + group_offsets, mask=n_mask[:, None], other=0).to(tl.float32)
    acc = tl.sum(scale * (dot - zero * x_sum[None, :]), axis=1)  # [BLOCK_N]
    _write_output(acc[None, :], y_ptr, partial_ptr, counter_ptr, tl.arange(0, 1), offs_n, 1, N, stride_ym, pid_n,
                  pid_k, SPLIT_K)


# (BLOCK_N, GROUPS, num_warps), timed by benchmarks/int4_rows_gpu.py --sweep
# ordered by SASS instructions per weight on sm_90 (4.3, 5.5, 5.5, 6.6, 6.6, 8.4; compiled on the CPU machine)
HALF2_CONFIGS = [(256, 1, 4), (128, 1, 4), (256, 1, 8), (128, 2, 8), (64, 2, 4), (32, 4, 4)]


def half2_fits(N: int, G: int, block_n: int, groups: int) -> bool:
    split = G // groups
    return G % groups == 0 and (split == 1 or split * N <= HALF2_WORKSPACE) and triton.cdiv(N, block_n) <= 1 << 14


def half2_gemv_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, config: dict | None = None) -> torch.Tensor:
    """x [1, K] fp16/bf16 @ Wᵀ -> [1, N]; `config` {"BLOCK_N", "GROUPS", "num_warps"} (default: the first that fits)."""
    M, K = x.shape
    N, G = scales.shape
    assert M == 1, "the half2 GEMV takes one row of x"
    if config is None:
        block_n, groups, warps = next(c for c in HALF2_CONFIGS if half2_fits(N, G, c[0], c[1]))
    else:
        block_n, groups, warps = config["BLOCK_N"], config["GROUPS"], config["num_warps"]
        assert half2_fits(N, G, block_n, groups), config
    y = torch.empty(1, N, dtype=x.dtype, device=x.device)
    partial, counter = _workspace.get(x.device, HALF2_WORKSPACE, 1 << 14)
    _half2_gemv[(triton.cdiv(N, block_n), G // groups)](
        x, qweight, scales, zeros, y, partial, counter, N, G, K // 8, y.stride(0), BLOCK_N=block_n, GROUPS=groups,
        GROUP_SIZE=group_size, SPLIT_K=G // groups, X_SCALE=X_SCALE, num_warps=warps)
    return y

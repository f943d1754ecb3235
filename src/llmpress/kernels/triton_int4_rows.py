"""Triton W4A16 matmul over a row-major packed int4 weight: y = x @ Wᵀ, W [N, K] in 4 bits per weight.

Layout ("rows", made from the GPTQ runtime layout by `quant.linear.QuantLinear.use_row_layout`):
qweight int32 [N, K/8], the eight 4-bit weights of output row n and inputs 8w..8w+7 in word w, input
8w + j at bits 4j (the GPTQ word, transposed); scales [N, G] (model dtype); zeros uint8 [N, G] (real zero
points); group g covers inputs g*group_size .. (g+1)*group_size - 1, and groups tile K (no act-order).

Why rows: at batch 1 a linear layer is one stream of its packed weights. With each output row's words
contiguous, a program streams [BLOCK_N rows x BLOCK_K/8 words] tiles in 16-byte loads, the layout our
bf16 GEMV reached 86% of the copy bandwidth with, and the x values a word needs are reused by every row.

- `gemv` (M <= GEMV_MAX_M): CUDA-core FMAs. A nibble becomes a float without a conversion instruction
  (quarter rate): OR-ing the masked word into the bit pattern of 1.0 gives 1 + q * 2^(b-23) for the
  nibble at bit b (exact), so one LOP3 and one FADD yield q * 2^(b-23), and x is pre-scaled by 2^(23-b)
  (an exact power of two, once per x element, shared by every row). Per group, with exact integers q,
  sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k): the zero point and scale cost nothing per weight.
  Split-K spreads K over programs; the last program of a tile sums the partials (`triton_int4._write_output`).
- `mma` (GEMV_MAX_M < M <= MMA_MAX_M: speculative verify steps, small engine batches): tensor cores. The
  packed words are read as bytes, whose low and high nibbles are two dot operands (against x's even and
  odd inputs); a nibble becomes a 16-bit float MAGIC_VALUE + q with one OR, the zero point and scale are
  applied per group after the dot, one tile of [BLOCK_N rows x GROUPS groups] per program, split-K over the
  rest. At M = 4 it takes 2.1 ms over a 3B token's linears, against 3.9 ms for the GEMV and 4.4 ms for
  `dequant`; at M = 1 it is 1.77 ms against the GEMV's 1.72 (H200, int4_rows_h200_run5.json).
- `dequant` (larger M, prefill): one pass writes the dense weight in x's dtype, then cuBLAS multiplies. On
  the H200 a tl.dot GEMM over this layout ran at 1.4-1.9% of the copy bandwidth at M = 512; this path is
  1.9x faster there than the GPTQ-layout GEMM.
Measured at M = 1 on the H200: 15-28% of the copy bandwidth on the 3B's layer shapes, 45% on its lm_head
(what limits them, from SASS counts and the timings: benchmarks/NOTES.md).
Reference: `kernels.reference.int4_matmul_rows_reference`.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
import triton.testing

from llmpress.kernels.triton_int4 import MAX_SPLIT_K, SPLIT_K_MAX_M, _workspace, _write_output

_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # no inline assembly there
GEMV_MAX_M = 1  # the GEMV repeats its unpacking per row of x: at M = 4 it took twice its M = 1 time on the H200
ONE_BITS = tl.constexpr(0x3F800000)  # the fp32 bit pattern of 1.0

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages); BLOCK_K is a multiple of the group size (pruned otherwise)
GEMV_CONFIGS = [(8, 512, 1, 4, 2), (16, 512, 1, 4, 2), (32, 512, 1, 4, 2), (16, 1024, 1, 4, 2), (32, 1024, 1, 8, 2),
                (8, 1024, 1, 4, 2), (16, 256, 2, 4, 2), (16, 512, 2, 4, 2), (32, 512, 2, 8, 2), (8, 512, 4, 4, 2),
                (16, 1024, 2, 8, 2), (64, 256, 1, 4, 2), (32, 256, 4, 4, 2), (16, 512, 4, 4, 2)]


@triton.jit
def _gemv_rows_body(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, G, stride_xm, stride_ym,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_SIZE: tl.constexpr,
                    SPLIT_K: tl.constexpr):
    GROUPS: tl.constexpr = BLOCK_K // GROUP_SIZE  # groups per block
    WPG: tl.constexpr = GROUP_SIZE // 8  # packed words per group and row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.arange(0, GROUPS)
    offs_w = tl.arange(0, WPG)
    n_mask = offs_n < N
    words_per_row = K // 8
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        block = k0 // BLOCK_K
        g0 = block * GROUPS
        word_ptrs = (qw_ptr + offs_n[:, None, None] * words_per_row + (g0 + offs_g)[None, :, None] * WPG
                     + offs_w[None, None, :])
        words = tl.load(word_ptrs, mask=n_mask[:, None, None], other=0, eviction_policy="evict_first")
        high = words >> 12  # nibbles 5, 6, 7 (bits 20..31) land at bits 8..19, inside the mantissa
        group_offsets = offs_n[:, None] * G + (g0 + offs_g)[None, :]
        scale = tl.load(s_ptr + group_offsets, mask=n_mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group_offsets, mask=n_mask[:, None], other=0).to(tl.float32)
        x_base = (g0 + offs_g)[:, None] * GROUP_SIZE + offs_w[None, :] * 8  # input index of nibble 0 of each word
        for m in tl.static_range(BLOCK_M):
            dot = tl.zeros([BLOCK_N, GROUPS, WPG], dtype=tl.float32)
            x_sum = tl.zeros([GROUPS, WPG], dtype=tl.float32)
            for j in tl.static_range(8):
                x = tl.load(x_ptr + m * stride_xm + x_base + j, mask=m < M, other=0.0).to(tl.float32)
                x_sum += x
                bit = 4 * j - 12 * (j >= 5)
                if j < 5:
                    src = words
                else:
                    src = high
                level = ((src & (0xF << bit)) | ONE_BITS).to(tl.float32, bitcast=True) - 1.0  # q * 2^(bit-23)
                dot += level * (x * (8388608.0 / (1 << bit)))[None, :, :]
            partial = tl.sum(scale * (tl.sum(dot, axis=2) - zero * tl.sum(x_sum, axis=1)[None, :]), axis=1)
            acc = tl.where(offs_m[:, None] == m, acc + partial[None, :], acc)
    _write_output(acc, y_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_ym, pid_n, pid_k, SPLIT_K)


@triton.jit
def _dequantize_rows(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, G, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """W [N, K] in w's dtype, one [BLOCK_N, GROUP_SIZE] tile (one group of BLOCK_N rows) per program."""
    pid_n = tl.program_id(0)
    group = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = group * (GROUP_SIZE // 8) + tl.arange(0, GROUP_SIZE // 8)
    n_mask = offs_n < N
    words = tl.load(qw_ptr + offs_n[:, None] * (K // 8) + offs_p[None, :], mask=n_mask[:, None], other=0)
    levels = (words[:, :, None] >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF  # input 8p + j at [:, p, j]
    levels = tl.reshape(levels, (BLOCK_N, GROUP_SIZE))
    scale = tl.load(s_ptr + offs_n * G + group, mask=n_mask, other=0.0).to(tl.float32)
    zero = tl.load(z_ptr + offs_n * G + group, mask=n_mask, other=0).to(tl.float32)
    w = (levels.to(tl.float32) - zero[:, None]) * scale[:, None]
    offs_k = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    tl.store(w_ptr + offs_n[:, None] * K + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=n_mask[:, None])


def dequantize_rows_triton(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` (nn.Linear's layout), one pass over the packed words."""
    N, G = scales.shape
    K = G * group_size
    w = torch.empty(N, K, dtype=dtype, device=qweight.device)
    block_n = 32
    _dequantize_rows[(triton.cdiv(N, block_n), G)](qweight, scales, zeros, w, N, K, G, GROUP_SIZE=group_size,
                                                    BLOCK_N=block_n, num_warps=4)
    return w


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
def _mma_rows_body(x_ptr, xs_ptr, qb_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, G, row_bytes,
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


def _mma_fits(N: int, G: int, M: int, block_n: int, groups: int) -> bool:
    """A config is usable when its tiles split K evenly and its partial sums fit the fixed workspace."""
    split = G // groups
    return (G % groups == 0 and (split == 1 or split * M * N <= MMA_WORKSPACE)
            and triton.cdiv(N, block_n) <= 1 << 14)


def mma_candidates(G: int) -> list[tuple[int, int, int]]:
    """MMA_CONFIGS plus whole-K tiles (no split-K, so they fit any workspace) where K is short enough to unroll."""
    return MMA_CONFIGS + ([(64, G, 4), (128, G, 8)] if G <= 32 else [])


@triton.jit
def _mma_rows(x_ptr, xs_ptr, qb_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, G, row_bytes, stride_xm,
              stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr,
              GROUPS: tl.constexpr, SPLIT_K, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr, USE_ASM: tl.constexpr):
    _mma_rows_body(x_ptr, xs_ptr, qb_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, G, row_bytes,
                   stride_xm, stride_ym, BLOCK_M, BLOCK_N, GROUP_SIZE, GROUPS, SPLIT_K, MAGIC, MAGIC_VALUE, USE_ASM)


# 16-bit float patterns whose last mantissa bit is worth exactly 1: OR-ing q in gives MAGIC_VALUE + q
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}


class _MmaTuner:
    """Picks the fastest usable MMA_CONFIGS entry per (device, M, N, K, group size, dtype), timed once outside
    any CUDA graph capture (as triton.autotune does; ours because the grid and SPLIT_K derive from the tile)."""

    def __init__(self):
        self.best: dict[tuple, tuple[int, int, int]] = {}

    def pick(self, key: tuple, launch, M: int, N: int, G: int) -> tuple[int, int, int]:
        if key in self.best:
            return self.best[key]
        # a whole-K tile needs no workspace: the fallback when every split-K tile would overflow it
        candidates = [c for c in mma_candidates(G) if _mma_fits(N, G, M, c[0], c[1])] or [(64, G, 4)]
        if torch.cuda.is_current_stream_capturing() or len(candidates) == 1:
            return candidates[0]
        timings = {c: triton.testing.do_bench(lambda: launch(c), warmup=5, rep=20) for c in candidates}
        self.best[key] = min(timings, key=timings.get)
        return self.best[key]


_mma_tuner = _MmaTuner()


def _mma_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                config: dict | None) -> torch.Tensor:
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
        assert _mma_fits(N, G, M, config["BLOCK_N"], config["GROUPS"]), config
        launch((config["BLOCK_N"], config["GROUPS"], config["num_warps"]))
    else:
        launch(_mma_tuner.pick((x.device, M, N, K, group_size, x.dtype), launch, M, N, G))
    return y


def _prune(configs, named_args, **kwargs):
    """Blocks made of whole groups that tile K; split-K only for small M and never beyond K's blocks."""
    M, K, group_size = named_args["M"], named_args["K"], kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE"))
    kept = [c for c in configs
            if c.kwargs["BLOCK_K"] % group_size == 0 and K % c.kwargs["BLOCK_K"] == 0
            and (c.kwargs["SPLIT_K"] == 1 or (M <= SPLIT_K_MAX_M and K >= c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"]))]
    if kept:
        return kept
    fallback = configs[0]  # one group per block always tiles K
    return [triton.Config({**fallback.kwargs, "BLOCK_K": group_size, "SPLIT_K": 1}, num_warps=fallback.num_warps,
                          num_stages=fallback.num_stages)]


@triton.autotune(configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
                          for n, k, s, w, st in GEMV_CONFIGS],
                 key=["M", "N", "K", "GROUP_SIZE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemv_rows(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, G, stride_xm, stride_ym,
               BLOCK_M: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SPLIT_K: tl.constexpr):
    _gemv_rows_body(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, G, stride_xm, stride_ym,
                    BLOCK_M, BLOCK_N, BLOCK_K, GROUP_SIZE, SPLIT_K)


def default_family(M: int, group_size: int) -> str:
    """The path for M rows of x, from the H200 runs (int4_rows_h200_run5.json): the CUDA-core GEMV at M = 1
    (1.72 vs 1.77 ms over a 3B token's linears), the tensor-core GEMV up to MMA_MAX_M rows (2.0x the GEMV,
    2.1x dequantize + cuBLAS at M = 4), dequantize + cuBLAS beyond."""
    if M <= GEMV_MAX_M:
        return "gemv"
    if M <= MMA_MAX_M and group_size >= 32:
        return "mma"
    return "gemv" if M <= 2 else "dequant"


def int4_matmul_rows_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            group_size: int, config: dict | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16; qweight: int32 [N, K/8]; scales: [N, G]; zeros: uint8 [N, G]. Returns [M, N] in x.dtype.

    `config` (benchmarks) picks the path: {"family": "mma"}, {"family": "gemv"} (autotuned) or {"family": "dequant"};
    a GEMV config with "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages" (mma: "BLOCK_N", "GROUPS",
    "num_warps") also bypasses the autotuner."""
    M, K = x.shape
    N, G = scales.shape
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert qweight.dtype == torch.int32 and qweight.shape == (N, K // 8) and zeros.shape == (N, G), (qweight.shape, zeros.shape)
    assert G * group_size == K and group_size % 8 == 0 and group_size & (group_size - 1) == 0, (G, group_size, K)
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    family = config["family"] if config else default_family(M, group_size)
    if family == "dequant":
        return F.linear(x, dequantize_rows_triton(qweight, scales, zeros, group_size, x.dtype))
    if family == "mma":
        assert M <= MMA_MAX_M and group_size >= 32, "the tensor-core GEMV takes M <= 16 and groups of >= 32"
        return _mma_matmul(x, qweight, scales, zeros, group_size, config)
    assert M <= 4, "the GEMV unrolls its rows: M <= 4"
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partial, counter = _workspace.get(x.device, MAX_SPLIT_K * M * N, triton.cdiv(N, 8))
    args = (x, qweight, scales, zeros, y, partial, counter, M, N, K, G, x.stride(0), y.stride(0))
    extra = dict(BLOCK_M=triton.next_power_of_2(M), GROUP_SIZE=group_size)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    if config is None or len(config) == 1:  # {"family": "gemv"}: the autotuned GEMV whatever M is
        _gemv_rows[grid](*args, **extra)
    else:
        meta = {k: config[k] for k in ("BLOCK_N", "BLOCK_K", "SPLIT_K")}
        assert meta["SPLIT_K"] <= MAX_SPLIT_K, config
        _gemv_rows.fn[grid(meta)](*args, **extra, **meta, num_warps=config["num_warps"], num_stages=config["num_stages"])
    return y

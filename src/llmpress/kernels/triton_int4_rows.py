"""Triton W4A16 matmul over a row-major packed int4 weight: y = x @ Wᵀ, W [N, K] in 4 bits per weight.

Layout ("rows", made from the GPTQ runtime layout by `quant.linear.QuantLinear.use_row_layout`):
qweight int32 [N, K/8], the eight 4-bit weights of output row n and inputs 8w..8w+7 in word w, input
8w + j at bits 4j (the GPTQ word, transposed); scales [N, G] (model dtype); zeros uint8 [N, G] (real zero
points); group g covers inputs g*group_size .. (g+1)*group_size - 1, and groups tile K (no act-order).

Why rows: at batch 1 a linear layer is one stream of its packed weights. With each output row's words
contiguous, a program streams [BLOCK_N rows x BLOCK_K/8 words] tiles in 16-byte loads, the layout our
bf16 GEMV reached 86% of the copy bandwidth with, and the x values a word needs are reused by every row.

- `split` (M = 1, the default there): many loopless [rows x 1-2 groups] tiles, `triton_int4_rows_split.py`;
  the last program of a row tile adds the tiles' partial sums. Over a 3B token's linears on the H200:
  1.25 ms (0.93 ms for the kernel alone), the looped `gemv` 1.72 (int4_rows_h200_run8.json).
- `gemv` (forced, or M = 2 with groups under 32): CUDA-core FMAs, looping over K. A nibble becomes a float
  without a conversion instruction (quarter rate): OR-ing the masked word into the bit pattern of 1.0
  gives 1 + q * 2^(b-23) for the nibble at bit b (exact), so one LOP3 and one FADD yield q * 2^(b-23), and x is pre-scaled by 2^(23-b)
  (an exact power of two, once per x element, shared by every row). Per group, with exact integers q,
  sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k): the zero point and scale cost nothing per weight.
  Split-K spreads K over programs; the last program of a tile sums the partials (`triton_int4._write_output`).
- `mma` (1 < M <= MMA_MAX_M: speculative verify steps, small engine batches): tensor cores,
  in `triton_int4_rows_mma.py`. At M = 4 it takes 2.1 ms over a 3B token's linears, against 3.9 ms for
  the GEMV and 4.4 ms for `dequant`; at M = 1 it is 1.77 ms against the GEMV's 1.72 (H200, run 5).
- `split_partials` (forced; kernels/ops.py on request): the split GEMV's fp32 partials, summed by PyTorch.
- `half2` (forced only): an experimental batch-1 GEMV in fp16-pair arithmetic, `triton_int4_rows_half2.py`.
- `dequant` (larger M, prefill): one pass writes the dense weight in x's dtype, then cuBLAS multiplies. On
  the H200 a tl.dot GEMM over this layout ran at 1.4-1.9% of the copy bandwidth at M = 512; this path is
  1.9x faster there than the GPTQ-layout GEMM.
What limits each path, from SASS counts and timings: benchmarks/NOTES.md.
Reference: `kernels.reference.int4_matmul_rows_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from llmpress.kernels.triton_int4 import MAX_SPLIT_K, SPLIT_K_MAX_M, _workspace, _write_output
from llmpress.kernels.triton_int4_rows_mma import MMA_MAX_M, mma_matmul_rows
from llmpress.kernels.triton_int4_rows_split import nibble_level, split_gemv_rows


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
                dot += nibble_level(words, high, j) * (x * (8388608.0 / (1 << (4 * j - 12 * (j >= 5)))))[None, :, :]
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


FAMILIES = ("split", "split_partials", "gemv", "mma", "dequant", "half2")


def default_family(M: int, group_size: int) -> str:
    """The path for M rows of x, from the H200 runs: at M = 1 the split-tile GEMV (1.25 ms over a 3B token's
    linears against the looped GEMV's 1.72 and tinygemm's 1.17, int4_rows_h200_run8.json), the
    tensor-core GEMV up to MMA_MAX_M rows (2.0x the GEMV, 2.1x dequantize + cuBLAS at M = 4, run 5),
    dequantize + cuBLAS beyond."""
    if M == 1:
        return "split"
    if M <= MMA_MAX_M and group_size >= 32:
        return "mma"
    return "gemv" if M <= 2 else "dequant"  # groups under 32 (too short for a tensor-core tile): as before


def int4_matmul_rows_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                            group_size: int, config: dict | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16; qweight: int32 [N, K/8]; scales: [N, G]; zeros: uint8 [N, G]. Returns [M, N] in x.dtype.

    `config` (benchmarks) picks the path: {"family": "mma"}, {"family": "gemv"} (autotuned), {"family": "dequant"},
    {"family": "split"} / {"family": "split_partials"} (M = 1) or {"family": "half2"} (experimental, M = 1);
    a GEMV config with "BLOCK_N", "BLOCK_K", "SPLIT_K", "num_warps", "num_stages" (mma: "BLOCK_N", "GROUPS",
    "num_warps") also bypasses the autotuner."""
    M, K = x.shape
    N, G = scales.shape
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert qweight.dtype == torch.int32 and qweight.shape == (N, K // 8) and zeros.shape == (N, G), (qweight.shape, zeros.shape)
    assert G * group_size == K and group_size % 8 == 0 and group_size & (group_size - 1) == 0, (G, group_size, K)
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous() and zeros.is_contiguous()
    family = config["family"] if config else default_family(M, group_size)
    if family not in FAMILIES:
        raise ValueError(f"unknown int4 row-layout kernel family {family!r}; choose from {', '.join(FAMILIES)}")
    if family == "dequant":
        return F.linear(x, dequantize_rows_triton(qweight, scales, zeros, group_size, x.dtype))
    if family == "half2":  # experimental, never the default (triton_int4_rows_half2.py)
        from llmpress.kernels.triton_int4_rows_half2 import half2_gemv_rows
        return half2_gemv_rows(x, qweight, scales, zeros, group_size, config if config and "BLOCK_N" in config else None)
    if family in ("split", "split_partials"):
        forced = config if config and "BLOCK_N" in config else None
        if family == "split":
            return split_gemv_rows(x, qweight, scales, zeros, group_size, forced, reduce="in_kernel")
        return split_gemv_rows(x, qweight, scales, zeros, group_size, forced).sum(0, keepdim=True).to(x.dtype)
    if family == "mma":
        assert M <= MMA_MAX_M and group_size >= 32, "the tensor-core GEMV takes M <= 16 and groups of >= 32"
        return mma_matmul_rows(x, qweight, scales, zeros, group_size, config)
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

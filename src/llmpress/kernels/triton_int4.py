"""Triton W4A16 matmul: y = x @ dequant(W), 4-bit weights in the GPTQ runtime layout, dequantized in registers.

Layout (see quant/format.py): qweight int32 [K/8, N], 8 input rows per word, row k at bits 4*(k % 8);
scales [G, N]; qzeros int32 [G, N/8] holding the real zero points (no GPTQ v1 offset), column n at
bits 4*(n % 8); g_idx int32 [K] (act-order) or None (group of row k = k // group_size).

One kernel serves both regimes. Decode (M <= 16) is bound by reading the packed weights, so tiles
are short in M and the K loop is split across programs (split-K, fp32 atomics) to fill every SM.
Prefill is bound by the matrix units, so tiles are large and each program owns its output tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
DECODE_CONFIGS = [(16, n, k, s, w, 3) for n, k, s, w in
                  [(64, 128, 1, 4), (64, 128, 4, 4), (128, 128, 2, 4), (64, 256, 2, 4), (32, 256, 4, 4),
                   (128, 64, 4, 4), (64, 128, 8, 4), (256, 64, 2, 8), (64, 256, 8, 4)]]
# The grouped fast path needs BLOCK_K = 128 (16 packed rows: tl.dot's minimum K per nibble product).
GROUPED_DECODE_CONFIGS = [(16, n, 128, s, w, st) for n, s, w, st in
                          [(64, 1, 4, 3), (64, 2, 4, 3), (64, 4, 4, 3), (128, 2, 4, 3), (128, 4, 8, 3), (32, 4, 4, 3),
                           (32, 8, 4, 3), (128, 1, 4, 4), (256, 2, 8, 3)]]
GROUPED_PREFILL_CONFIGS = [(m, n, 128, 1, w, st) for m, n, w, st in [(64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3)]]
PREFILL_CONFIGS = [(m, n, k, 1, w, s) for m, n, k, w, s in
                   [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 4)]]


def _configs(table):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
            for m, n, k, s, w, st in table]


@triton.jit
def _w4a16_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, group_size,
                stride_xm, stride_ym, HAS_GIDX: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    zero_shift = (offs_n % 8) * 4
    # Split-K interleaves: program pid_k takes K blocks pid_k, pid_k + SPLIT_K, ...
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # Each int32 holds 8 consecutive rows: 8 threads read the same word, served from L1.
        packed = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0)
        levels = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF
        if HAS_GIDX:
            groups = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
        else:
            groups = offs_k // group_size
        scales = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        zeros_packed = tl.load(qz_ptr + groups[:, None] * (N // 8) + offs_n[None, :] // 8,
                               mask=k_mask[:, None] & n_mask[None, :], other=0)
        zeros = (zeros_packed >> zero_shift[None, :]) & 0xF
        w = ((levels - zeros).to(tl.float32) * scales.to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, w)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)


@triton.jit
def _w4a16_grouped_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The fast path: each BLOCK_K slice of K lies inside one quantization group (group_size % BLOCK_K == 0),
    so scales and zeros are one vector per block, and each packed word is loaded once and unpacked into
    its 8 nibbles: nibble j of word i is input row 8*i + j, so the block's product is the sum over j of
    x[:, rows 8i+j] @ W[rows 8i+j, :]."""
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid_mn // num_pid_n
    pid_n = pid_mn % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_w = tl.arange(0, BLOCK_K // 8)  # packed rows of the block
    m_mask = offs_m < M
    n_mask = offs_n < N
    zero_shift = (offs_n % 8) * 4
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        packed = tl.load(qw_ptr + (k0 // 8 + offs_w)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = (tl.load(qz_ptr + group * (N // 8) + offs_n // 8, mask=n_mask, other=0) >> zero_shift) & 0xF
        for j in tl.static_range(8):
            w = ((((packed >> (4 * j)) & 0xF) - zero[None, :]).to(tl.float32) * scale[None, :])
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 8 * offs_w + j)[None, :], mask=m_mask[:, None], other=0.0)
            acc += tl.dot(x, w.to(x.dtype))
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(y_ptrs, acc, mask=out_mask)


@triton.autotune(configs=_configs(DECODE_CONFIGS), key=["M_BUCKET", "N", "K"], reset_to_zero=["y_ptr"])
@triton.jit
def _w4a16_decode(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                  M_BUCKET, HAS_GIDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    _w4a16_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                HAS_GIDX, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.autotune(configs=_configs(PREFILL_CONFIGS), key=["M_BUCKET", "N", "K"])
@triton.jit
def _w4a16_prefill(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                   M_BUCKET, HAS_GIDX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    _w4a16_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                HAS_GIDX, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.autotune(configs=_configs(GROUPED_DECODE_CONFIGS), key=["M_BUCKET", "N", "K"], reset_to_zero=["y_ptr"])
@triton.jit
def _w4a16_grouped_decode(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym, M_BUCKET,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    _w4a16_grouped_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                        BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.autotune(configs=_configs(GROUPED_PREFILL_CONFIGS), key=["M_BUCKET", "N", "K"])
@triton.jit
def _w4a16_grouped_prefill(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym, M_BUCKET,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    _w4a16_grouped_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, M, N, K, group_size, stride_xm, stride_ym,
                        BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


DECODE_MAX_M = 16
GROUPED_BLOCK_K = 128


def int4_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """x: [M, K] fp16/bf16; qweight: int32 [K/8, N]; scales: [G, N]; qzeros: int32 [G, N/8]. Returns [M, N] in x.dtype."""
    M, K = x.shape
    N = qweight.shape[1]
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert qweight.dtype == torch.int32 and qweight.shape[0] * 8 == K and qzeros.shape[1] * 8 == N, (qweight.shape, qzeros.shape)
    assert scales.shape == (qzeros.shape[0], N) and N % 8 == 0, (scales.shape, N)
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous() and qzeros.is_contiguous()
    has_gidx = g_idx is not None
    gidx = g_idx if has_gidx else qweight  # any int32 tensor: never read when HAS_GIDX is False
    m_bucket = triton.next_power_of_2(M)
    if not has_gidx and group_size % GROUPED_BLOCK_K == 0 and K % GROUPED_BLOCK_K == 0:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        if M <= DECODE_MAX_M:
            y32 = torch.zeros(M, N, dtype=torch.float32, device=x.device)
            _w4a16_grouped_decode[grid](x, qweight, scales, qzeros, y32, M, N, K, group_size, x.stride(0), y32.stride(0),
                                        m_bucket)
            return y32.to(x.dtype)
        y = torch.empty(M, N, dtype=x.dtype, device=x.device)
        _w4a16_grouped_prefill[grid](x, qweight, scales, qzeros, y, M, N, K, group_size, x.stride(0), y.stride(0),
                                     min(m_bucket, 4096))
        return y
    if M <= DECODE_MAX_M:
        y32 = torch.zeros(M, N, dtype=torch.float32, device=x.device)  # split-K accumulates with atomics
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        _w4a16_decode[grid](x, qweight, scales, qzeros, gidx, y32, M, N, K, group_size, x.stride(0), y32.stride(0),
                            m_bucket, HAS_GIDX=has_gidx)
        return y32.to(x.dtype)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)
    _w4a16_prefill[grid](x, qweight, scales, qzeros, gidx, y, M, N, K, group_size, x.stride(0), y.stride(0),
                         min(m_bucket, 4096), HAS_GIDX=has_gidx)
    return y

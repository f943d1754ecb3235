"""Triton matrix-vector product for batch-1..4 decode in 16-bit: y = x @ Wᵀ, W row-major [N, K].

At batch 1 a linear layer is a pure stream of its weight matrix. Each program owns BLOCK_N rows
and reads them in contiguous BLOCK_K chunks (16-byte vector loads); when N alone gives too few
programs to cover the GPU, the K dimension is split too and partial sums meet in fp32 atomics.
Reference: `torch.nn.functional.linear`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s}, num_warps=w, num_stages=st)
                for n, k, s, w, st in [(8, 512, 1, 4, 3), (16, 512, 1, 4, 3), (4, 1024, 1, 4, 3), (16, 256, 2, 4, 4),
                                       (8, 512, 2, 4, 3), (32, 256, 1, 8, 3), (8, 1024, 4, 8, 2), (16, 512, 4, 8, 3)]]


@triton.autotune(configs=GEMV_CONFIGS, key=["M", "N", "K"], reset_to_zero=["y_ptr"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    for m in range(0, M):
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                        other=0.0, eviction_policy="evict_first")  # streamed once: keep L2 for activations
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + m * stride_ym + offs_n, acc, mask=n_mask)
        else:
            tl.atomic_add(y_ptr + m * stride_ym + offs_n, acc, mask=n_mask)


def gemv_triton(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x: [M, K] (M <= 4), weight: [N, K], both fp16/bf16. Returns [M, N] in x.dtype."""
    M, K = x.shape
    N = weight.shape[0]
    assert weight.shape[1] == K and x.dtype == weight.dtype and x.stride(1) == 1 and weight.stride(1) == 1
    y = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    _gemv_kernel[grid](x, weight, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0))
    return y.to(x.dtype)

"""Slow, obviously-correct references for every op in `ops`. Tests compare fast paths against these."""

from __future__ import annotations

import math

import torch

from llmpress.quant.format import dequantize_runtime, unpack_columns, unpack_rows  # the bit layout lives in one file


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v, computed in float32 (float64 for float64 inputs).

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with H a multiple of Hkv (grouped-query attention);
    mask: bool [T, S] or [B, 1, T, S], True where a query may attend; causal: mask key j > query i
    (queries aligned to the end of the keys). Returns [B, H, T, D] in q's dtype.
    """
    groups = q.shape[1] // k.shape[1]
    compute = torch.promote_types(q.dtype, torch.float32)
    k = k.repeat_interleave(groups, dim=1).to(compute)
    v = v.repeat_interleave(groups, dim=1).to(compute)
    scores = q.to(compute) @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T, S = q.shape[-2], k.shape[-2]
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)


def cache_attention_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """Bool [T, cache_len]: a query at position p sees cache slots 0..p (causal, never unwritten slots)."""
    slots = torch.arange(cache_len, device=positions.device)
    return slots[None, :] <= positions[:, None]


def cached_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor) -> torch.Tensor:
    """Reference for `ops.cached_attention`. q: [B, H, T, D]; caches: [B, Hkv, S, D]; positions: [T]."""
    return attention_reference(q, k_cache, v_cache, mask=cache_attention_mask(positions, k_cache.shape[2]))


def int4_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                          g_idx: torch.Tensor | None, group_size: int, bits: int) -> torch.Tensor:
    """x @ W for a weight in the runtime packed layout (quant/format.py): unpack, dequantize to x's dtype, matmul.

    x: [M, K] float; qweight: int32 [K*bits/32, N]; scales: [G, N]; qzeros: int32 [G, N*bits/32] (real zero
    points); g_idx: int32 [K] or None (row i in group i // group_size). Returns [M, N] in x's dtype.
    """
    return x @ dequantize_runtime(qweight, scales, qzeros, g_idx, group_size, bits, x.dtype)


def int4_matmul_grouped(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                        group_size: int, bits: int) -> torch.Tensor:
    """`int4_matmul_reference` for groups that tile K (no g_idx), written as broadcasts and a reshape
    (no gathers), so that torch.compile can fuse the dequantization into the matmul it feeds: at
    M = 1 Inductor turns the product into a reduction and the unpacking into its index arithmetic."""
    levels = unpack_rows(qweight, bits)  # [K, N]
    K, N = levels.shape
    zeros = unpack_columns(qzeros, bits)  # [G, N]
    G = zeros.shape[0]
    # (q - z) is a small integer, exact in bf16/fp16; one rounding to x's dtype after the scale, as the reference.
    weight = ((levels.view(G, K // G, N) - zeros[:, None, :]).float() * scales.float()[:, None, :]).to(x.dtype)
    return x @ weight.view(K, N)

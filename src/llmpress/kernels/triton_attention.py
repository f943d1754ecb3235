"""Triton decode attention over a static KV cache (flash-decoding: split the keys, then combine).

One query token per sequence attends to cache slots 0..position. The keys are split into chunks
processed by separate programs, so that even batch 1 with 8 KV heads fills the GPU; each program
serves every query head of its KV group (grouped-query attention reads each K/V block once).
Reference: `kernels.reference.attention_reference` with the causal-by-position mask.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # keys per inner step


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_out_ptr, part_lse_ptr,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  num_kv_heads, num_heads, chunk, sm_scale,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    length = tl.load(pos_ptr) + 1  # slots 0..position are valid
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        k = tl.load(k_base + n[:, None] * stride_ks + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        v = tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    rows = (b * num_heads + heads) * NUM_SPLITS + split
    tl.store(part_out_ptr + rows[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None])
    tl.store(part_lse_ptr + rows, lse, mask=g_mask)


@triton.jit
def _combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                    D: tl.constexpr):
    row = tl.program_id(0)  # b * num_heads + head
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    weights = tl.exp(lse - tl.max(lse, 0))
    weights = weights / tl.sum(weights, 0)
    parts = tl.load(part_out_ptr + (row * NUM_SPLITS + offs_s[:, None]) * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough programs for about two waves of the GPU, but never a split with no keys at full length."""
    return max(1, min(math.ceil(2 * num_sms / batch_kv_heads), math.ceil(max_seq_len / BLOCK_N)))


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
    """q: [B, H, 1, D]; k_cache, v_cache: [B, Hkv, S, D]; positions: [1] int64. Returns [B, H, 1, D]."""
    B, H, T, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    assert T == 1 and H % Hkv == 0 and positions.numel() == 1, (q.shape, k_cache.shape, positions.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype and D in (64, 128), (q.dtype, k_cache.dtype, D)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    group = H // Hkv
    num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    splits = num_splits_for(B * Hkv, S, num_sms)
    chunk = math.ceil(math.ceil(S / splits) / BLOCK_N) * BLOCK_N
    part_out = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    _split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, positions, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, H, chunk, 1.0 / math.sqrt(D),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, D=D, NUM_SPLITS=splits,
        num_warps=4)
    out = torch.empty_like(q)
    _combine_kernel[(B * H,)](part_out, part_lse, out, NUM_SPLITS=splits,
                              BLOCK_S=max(2, triton.next_power_of_2(splits)), D=D, num_warps=4)
    return out

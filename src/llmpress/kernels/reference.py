"""Slow, obviously-correct references for every op in `ops`. Tests compare fast paths against these."""

from __future__ import annotations

import math

import torch

# the bit layout lives in one file
from llmpress.quant.format import dequantize_runtime, fragments_to_rows, unpack_columns, unpack_rows


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm: normalized in float32 and cast back before the gain, as the reference implementation does, so that
    bf16 results match it bit for bit in the common case."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


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


def int4_matmul_rows_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                               group_size: int) -> torch.Tensor:
    """x @ Wᵀ for a 4-bit weight in the row layout (quant/format.py `runtime_to_rows`): qweight int32 [N, K/8]
    (input 8w + j of row n at bits 4j of word w), scales [N, G], zeros uint8 [N, G]. Returns [M, N] in x's dtype."""
    N, G = scales.shape
    levels = unpack_rows(qweight.T, 4).T  # [N, K]: a row-layout word is the GPTQ word, transposed
    weight = (levels.reshape(N, G, group_size) - zeros.to(torch.int32)[:, :, None]).float() * scales.float()[:, :, None]
    return x @ weight.to(x.dtype).view(N, G * group_size).T


def int4_matmul_fragments_reference(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor,
                                    zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x @ Wᵀ for a 4-bit weight held as tensor-core fragments (quant/format.py `rows_to_fragments`) with scales
    and zeros [G, N]: back to the row layout, then `int4_matmul_rows_reference`."""
    return int4_matmul_rows_reference(x, fragments_to_rows(fragments), scales.T, zeros.T, group_size)


def greedy_tokens_reference(logits: torch.Tensor) -> torch.Tensor:
    """logits: [..., V] -> int64 [...]: the index of each row's maximum, the first one on ties (torch.argmax)."""
    return logits.float().argmax(dim=-1)


# ---- Paged KV cache (vLLM's PagedAttention layout) ----------------------------------------------------
# Per layer: k_cache, v_cache [num_blocks, block_size, Hkv, D]; key position t of sequence s lives at
# cache[block_tables[s, t // block_size], t % block_size]. Quantized caches (int8, float8_e4m3fn) carry one
# float16 scale per token per kv head, k_scale/v_scale [num_blocks, block_size, Hkv]: real = stored * scale.

KV_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # largest stored magnitude (448: e4m3fn's max finite)
# The smallest *normal* float16 (2^-14). A scale below it would be subnormal: too few significant bits, so
# dividing by the rounded scale could push |x / scale| far past QMAX. An all-zero vector gets this scale and
# stores zeros (0 / tiny = 0), never 0 / 0.
KV_SCALE_MIN = 2.0 ** -14


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-vector quantization over the last dim. x: [..., D] float -> (q [..., D] in `dtype`
    (int8 or float8_e4m3fn), scale [...] float16) with x ≈ q.float() * scale."""
    qmax = KV_QMAX[dtype]
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / qmax).clamp(KV_SCALE_MIN, torch.finfo(torch.float16).max).to(torch.float16)
    # Divide by the float16-rounded scale, the one dequantization will multiply by.
    y = xf / scale.float()[..., None]
    if dtype == torch.int8:
        q = y.round().clamp(-qmax, qmax).to(torch.int8)
    else:  # the clamp only catches the float16 rounding of the scale (|y| <= 448 * (1 + 2^-11))
        q = y.clamp(-qmax, qmax).to(dtype)
    return q, scale


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q: [..., D] int8/float8_e4m3fn, scale: [...] float16 -> q * scale [..., D] in `dtype` (computed in fp32)."""
    return (q.float() * scale.float()[..., None]).to(dtype)


def _as_storable(cache: torch.Tensor) -> torch.Tensor:
    # Indexed copies into float8 tensors are not implemented for every device; the bits are what we copy.
    return cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache


def store_kv_paged_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                             slot_mapping: torch.Tensor) -> None:
    """Write new tokens' keys/values into a paged cache, in place, quantizing for int8/fp8 caches.

    k, v: [N, Hkv, D] in the model dtype; caches: [num_blocks, block_size, Hkv, D]; scales: float16
    [num_blocks, block_size, Hkv] for quantized caches, else None; slot_mapping: int64 [N], slot s is
    block s // block_size, offset s % block_size. No host syncs or data-dependent shapes: CUDA-graph safe.
    """
    block_size = k_cache.shape[1]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if cache.dtype in KV_QMAX:
            assert scale is not None and scale.dtype == torch.float16, "quantized caches need float16 scales"
            stored, token_scale = quantize_kv(x, cache.dtype)
            scale[blocks, offsets] = token_scale
        else:
            assert scale is None, "an unquantized cache takes no scales"
            stored = x.to(cache.dtype)
        _as_storable(cache)[blocks, offsets] = _as_storable(stored)


def gather_kv_paged(cache: torch.Tensor, scale: torch.Tensor | None, block_table: torch.Tensor, seq_len: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """One sequence's keys (or values) 0..seq_len-1 through its block table [max_blocks], dequantized to
    `dtype`: [seq_len, Hkv, D]."""
    t = torch.arange(seq_len, device=cache.device)
    block_size = cache.shape[1]
    blocks, offsets = block_table.long()[t // block_size], t % block_size
    stored = cache[blocks, offsets]
    return stored.to(dtype) if scale is None else dequantize_kv(stored, scale[blocks, offsets], dtype)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                              block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Causal attention of a step's queries over a paged cache, one sequence at a time (slow, host syncs).

    q: [N, H, D]; caches [num_blocks, block_size, Hkv, D] (scales as in `store_kv_paged_reference`);
    block_tables: int32 [S, max_blocks]; seq_lens: int32 [S], cached tokens including this step's;
    query_start_loc: int32 [S+1], sequence s's queries are rows query_start_loc[s]:query_start_loc[s+1].
    Query j of a sequence with q_len queries sits at position p = seq_len - q_len + j and sees keys 0..p.
    max_query_len and max_seq_len are unused here (the fast path sizes its grid with them).
    Returns [N, H, D] in q's dtype; rows outside every sequence's range are zero.
    """
    compute = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros_like(q)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        q_len = q1 - q0
        if q_len == 0:
            continue
        assert q_len <= seq_len, f"sequence {s}: {q_len} queries but only {seq_len} cached tokens"
        k = gather_kv_paged(k_cache, k_scale, block_tables[s], seq_len, compute)
        v = gather_kv_paged(v_cache, v_scale, block_tables[s], seq_len, compute)
        positions = torch.arange(seq_len - q_len, seq_len, device=q.device)
        attended = attention_reference(q[q0:q1].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], mask=cache_attention_mask(positions, seq_len))
        out[q0:q1] = attended[0].transpose(0, 1).to(q.dtype)
    return out

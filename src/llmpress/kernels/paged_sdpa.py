"""Paged attention in plain PyTorch, vectorized: every sequence's keys gathered into one padded batch and a
single SDPA call with a causal mask per sequence. The CPU's fast path (the reference loops over sequences);
same contract as `reference.paged_attention_reference`, which the tests compare it against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmpress.kernels.reference import dequantize_kv


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor, valid: torch.Tensor,
            dtype: torch.dtype) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D] at slots [S, L] -> [S, Hkv, L, D] in `dtype`, zero where not valid."""
    flat = cache.flatten(0, 1)
    if flat.dtype == torch.float8_e4m3fn:  # gathers are not implemented for float8 everywhere; the bits are
        x = flat.view(torch.uint8)[slots].view(torch.float8_e4m3fn)
    else:
        x = flat[slots]
    x = x.to(dtype) if scale is None else dequantize_kv(x, scale.flatten(0, 1)[slots], dtype)
    # Slots past a sequence's length may hold anything (NaN in the tests): zero them, since a masked score
    # still multiplies its value row by a zero probability and 0 * NaN is NaN.
    return x.masked_fill(~valid[:, :, None, None], 0).transpose(1, 2)


def paged_attention_sdpa(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                         block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                         max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """q: [N, H, D] -> [N, H, D]; arguments as in `paged_attention_reference`. No host syncs."""
    N, H, D = q.shape
    block_size = k_cache.shape[1]
    device = q.device
    compute = torch.promote_types(q.dtype, torch.float32)
    starts, seq_lens = query_start_loc[:-1].long(), seq_lens.long()
    q_lens = query_start_loc[1:].long() - starts
    j = torch.arange(max_query_len, device=device)
    t = torch.arange(max_seq_len, device=device)
    q_valid = j[None, :] < q_lens[:, None]  # [S, Qmax]
    q_rows = (starts[:, None] + j[None, :]).clamp(max=max(N - 1, 0))
    k_valid = t[None, :] < seq_lens[:, None]  # [S, Kmax]
    columns = (t // block_size).clamp(max=block_tables.shape[1] - 1)
    slots = block_tables.long()[:, columns] * block_size + t % block_size  # [S, Kmax]
    k = _gather(k_cache, k_scale, slots, k_valid, compute)
    v = _gather(v_cache, v_scale, slots, k_valid, compute)
    positions = seq_lens[:, None] - q_lens[:, None] + j[None, :]  # [S, Qmax]: query j of a sequence sees 0..p
    mask = (t[None, None, :] <= positions[:, :, None]) & k_valid[:, None, :]
    mask |= ~q_valid[:, :, None] & (t == 0)[None, None, :]  # padding query rows see key 0: no all-masked row
    out = F.scaled_dot_product_attention(q[q_rows].transpose(1, 2).to(compute), k, v, attn_mask=mask[:, None],
                                         enable_gqa=k.shape[1] != H)  # [S, H, Qmax, D]
    result = torch.zeros_like(q)
    result[q_rows[q_valid]] = out.transpose(1, 2)[q_valid].to(q.dtype)
    return result

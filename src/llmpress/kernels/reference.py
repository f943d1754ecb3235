"""Slow, obviously-correct references for every op in `ops`. Tests compare fast paths against these."""

from __future__ import annotations

import math

import torch


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v, computed in float32.

    q: [B, H, T, D]; k, v: [B, Hkv, S, D] with H a multiple of Hkv (grouped-query attention);
    mask: bool [T, S] or [B, 1, T, S], True where a query may attend; causal: mask key j > query i
    (queries aligned to the end of the keys). Returns [B, H, T, D] in q's dtype.
    """
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    T, S = q.shape[-2], k.shape[-2]
    if causal:
        allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).to(q.dtype)

"""The op interface the model calls. Backend: `torch` (reference math), `sdpa` (PyTorch's fused
attention: flash / cuDNN / memory-efficient on GPU), or `auto` (sdpa).

Tests force a backend with `set_backend`; nothing here reads the environment at import time.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from llmpress.kernels.reference import attention_reference

BACKENDS = ("auto", "torch", "sdpa")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the kernel backend for all ops (`auto`, `torch`, `sdpa`)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Grouped-query attention. q: [B, H, T, D]; k, v: [B, Hkv, S, D]; mask: bool, True = attend."""
    if _backend == "torch":
        return attention_reference(q, k, v, mask=mask, causal=causal)
    # SDPA's is_causal aligns the triangle to the top-left; we only pass it when T == S.
    if causal and q.shape[-2] != k.shape[-2]:
        T, S = q.shape[-2], k.shape[-2]
        causal_mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=S - T)
        mask = causal_mask if mask is None else (mask & causal_mask)
        causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])

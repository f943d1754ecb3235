"""Attention ops against the float32 reference: SDPA everywhere, the Triton decode kernel on CUDA."""

import pytest
import torch

from llmpress.kernels import ops
from llmpress.kernels.reference import attention_reference, cached_attention_reference
from llmpress.model.rope import RotaryEmbedding

cuda_only = pytest.mark.skipif(not ops.triton_available(), reason="Triton decode kernel needs a CUDA GPU")


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def rotate_store_attend(qkv: torch.Tensor, heads: int, rotary: RotaryEmbedding, caches: list[torch.Tensor],
                        positions: torch.Tensor) -> torch.Tensor:
    """What the Triton RoPE decode kernel replaces, as three steps, the attention in float64: T new tokens' q|k|v
    [1, T, width] (the projection's output in the caches' dtype) rotated at `positions`, k and v written into
    `caches` [k, v] (in place) at them, each query attending over slots up to its own. Returns [1, H, T, D]."""
    import math
    from llmpress.model.rope import apply_rope
    T, (_, kv_heads, cache_len, head_dim) = qkv.shape[1], caches[0].shape
    cos, sin = rotary(positions, caches[0].dtype)
    q, k, v = (t.view(1, T, -1, head_dim).transpose(1, 2)
               for t in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    caches[0].index_copy_(2, positions, apply_rope(k, cos, sin))
    caches[1].index_copy_(2, positions, v)
    kk, vv = (t.double().repeat_interleave(heads // kv_heads, 1) for t in caches)
    scores = apply_rope(q, cos, sin).double() @ kk.transpose(-1, -2) / math.sqrt(head_dim)
    visible = torch.arange(cache_len, device=qkv.device)[None, :] <= positions[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vv


@pytest.mark.parametrize("heads,kv_heads,T,S", [(4, 4, 7, 7), (6, 2, 5, 12), (8, 1, 1, 9)])
def test_sdpa_matches_reference(heads, kv_heads, T, S):
    torch.manual_seed(0)
    q = torch.randn(2, heads, T, 16, dtype=torch.float64)
    k, v = torch.randn(2, 2, kv_heads, S, 16, dtype=torch.float64)
    positions = torch.arange(S - T, S)
    ref = cached_attention_reference(q, k, v, positions)
    with ops.use_backend("sdpa"):
        assert rel_error(ops.cached_attention(q, k, v, positions), ref) < 1e-10
    if T == S:
        with ops.use_backend("sdpa"):
            assert rel_error(ops.attention(q, k, v, causal=True), attention_reference(q, k, v, causal=True)) < 1e-10


def test_causal_attention_with_fewer_queries_than_keys_aligns_to_the_end():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 10, 8, dtype=torch.float64)
    with ops.use_backend("sdpa"):
        got = ops.attention(q, k, v, causal=True)
    ref = cached_attention_reference(q, k, v, torch.arange(7, 10))
    assert rel_error(got, ref) < 1e-10


@cuda_only
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,cache_len", [
    (1, 24, 8, 128, 320), (1, 32, 8, 64, 4096), (4, 9, 3, 64, 200), (3, 8, 8, 128, 64), (2, 32, 4, 128, 1000)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_decode_attention_matches_reference(batch, heads, kv_heads, head_dim, cache_len, dtype):
    torch.manual_seed(cache_len)
    for position in (0, 1, cache_len // 3, cache_len - 1):
        q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=dtype)
        k = torch.randn(batch, kv_heads, cache_len, head_dim, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        k[:, :, position + 1:] = float("nan")  # unwritten slots must never be read into the result
        v[:, :, position + 1:] = float("nan")
        positions = torch.tensor([position], device="cuda")
        with ops.use_backend("triton"):
            got = ops.cached_attention(q, k, v, positions)
        ref = cached_attention_reference(q.double(), k.double().nan_to_num(), v.double().nan_to_num(), positions)
        assert torch.isfinite(got).all()
        assert rel_error(got, ref) < 1e-2, (position, rel_error(got, ref))


@cuda_only
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,cache_len", [
    (1, 24, 8, 128, 320), (1, 32, 8, 64, 2048), (3, 9, 3, 64, 200), (2, 8, 8, 128, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loads_first", [False, True])
def test_triton_rope_attention_matches_rotate_store_attend(batch, heads, kv_heads, head_dim, cache_len, dtype,
                                                           loads_first, monkeypatch):
    """The fused kernel (rotate q and k, store k and v, attend) against the three steps it replaces, run in
    float64: same output, same cache slot, and no other slot touched; with its small loads first or not."""
    import llmpress.kernels.triton_attention as attention
    monkeypatch.setattr(attention, "loads_first", loads_first)
    torch.manual_seed(cache_len + batch)
    rotary = RotaryEmbedding(head_dim, 500000.0, None).to("cuda")
    for position in (0, 1, cache_len // 2, cache_len - 1):
        qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=dtype)
        k_cache = torch.randn(batch, kv_heads, cache_len, head_dim, device="cuda", dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        k_cache[:, :, position:] = float("nan")  # the new slot must be written before it is read
        v_cache[:, :, position:] = float("nan")
        k_ref, v_ref = k_cache.double().nan_to_num(), v_cache.double().nan_to_num()
        positions = torch.tensor([position], device="cuda")
        cos, sin = rotary(positions, dtype)  # the kernel computes them from inv_freq itself
        inv_freq = rotary.inv_freq
        with ops.use_backend("triton"):
            got = ops.cached_attention_rope(qkv, heads, cos, sin, inv_freq, k_cache, v_cache, positions)
        with ops.use_backend("torch"):
            ref = ops.cached_attention_rope(qkv.double(), heads, cos.double(), sin.double(), inv_freq, k_ref, v_ref,
                                            positions)
        assert rel_error(got, ref) < 1e-2, (position, rel_error(got, ref))
        assert rel_error(k_cache[:, :, position], k_ref[:, :, position]) < 1e-2
        assert torch.equal(v_cache[:, :, position].double(), v_ref[:, :, position])
        assert torch.equal(v_cache[:, :, position], qkv[:, 0, (heads + kv_heads) * head_dim:].view(batch, kv_heads, head_dim))
        if position + 1 < cache_len:
            assert torch.isnan(k_cache[:, :, position + 1:]).all() and torch.isnan(v_cache[:, :, position + 1:]).all()


@cuda_only
@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,cache_len", [(1, 24, 8, 128, 512), (2, 9, 3, 64, 200)])
def test_triton_decode_attention_launch_options_agree(batch, heads, kv_heads, head_dim, cache_len):
    """The splits combined by the last split program or by a kernel of their own, launched with or without PDL
    (early or late trigger; the plain variant always launches without it): the same arithmetic in the same order,
    so the same bits, plain and fused with RoPE."""
    import llmpress.kernels.pdl as pdl
    import llmpress.kernels.triton_attention as attention
    torch.manual_seed(cache_len)
    rotary = RotaryEmbedding(head_dim, 500000.0, None).to("cuda")
    position = cache_len // 2
    positions = torch.tensor([position], device="cuda")
    q = torch.randn(batch, heads, 1, head_dim, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, cache_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cos, sin = rotary(positions, torch.bfloat16)
    outputs = []
    defaults = attention.combine, pdl.mode
    try:
        for combine in ("kernel", "in_kernel"):
            for mode in ("off", "early", "late"):
                attention.combine, pdl.mode = combine, mode
                k_cache, v_cache = k.clone(), v.clone()
                with ops.use_backend("triton"):
                    plain = ops.cached_attention(q, k, v, positions)
                    fused = ops.cached_attention_rope(qkv, heads, cos, sin, rotary.inv_freq, k_cache, v_cache, positions)
                outputs.append((plain, fused, k_cache, v_cache))
    finally:
        attention.combine, pdl.mode = defaults
    ref = cached_attention_reference(q.double(), k.double(), v.double(), positions)
    assert rel_error(outputs[0][0], ref) < 1e-2
    for other in outputs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outputs[0], other))


@cuda_only
@pytest.mark.parametrize("heads,kv_heads,head_dim,cache_len,first", [
    (24, 8, 128, 320, 60), (32, 8, 64, 2048, 1500), (8, 8, 128, 64, 56), (4, 1, 64, 1024, 895)])
@pytest.mark.parametrize("queries", [2, 6, 8])
def test_triton_decode_attention_of_several_new_tokens_matches_the_masked_reference(heads, kv_heads, head_dim,
                                                                                    cache_len, first, queries):
    """A verify step's T new tokens, query t at position first + t seeing slots 0..first + t, against float64."""
    import math
    from llmpress.kernels.triton_attention import decode_attention_triton
    torch.manual_seed(queries + cache_len)
    q = torch.randn(1, queries, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(1, kv_heads, cache_len, head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, kv_heads, cache_len, head_dim, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(first, first + queries, device="cuda")
    out = decode_attention_triton(q, k, v, positions)
    kk, vv = (t.double().repeat_interleave(heads // kv_heads, 1) for t in (k, v))
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(head_dim)
    visible = torch.arange(cache_len, device="cuda")[None, :] <= positions[:, None]
    expected = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vv
    assert out.shape == expected.shape
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2


@cuda_only
@pytest.mark.parametrize("heads,kv_heads,head_dim,cache_len,first", [
    (24, 8, 128, 320, 60), (32, 8, 64, 2048, 1500), (8, 8, 128, 64, 56), (4, 1, 64, 1024, 893)])
@pytest.mark.parametrize("queries", [2, 6, 8])
def test_triton_rope_attention_of_several_new_tokens_matches_rotate_store_attend(heads, kv_heads, head_dim, cache_len,
                                                                                first, queries):
    """A verify step's T new tokens straight from the fused projection: rotated by their own positions, stored at
    them, each attending over slots up to its own; against the three steps in float64."""
    from llmpress.kernels.triton_attention import decode_attention_rope_triton
    torch.manual_seed(queries + cache_len)
    rotary = RotaryEmbedding(head_dim, 500000.0, None).to("cuda")
    qkv = torch.randn(1, queries, (heads + 2 * kv_heads) * head_dim, device="cuda", dtype=torch.bfloat16)
    caches = [torch.randn(1, kv_heads, cache_len, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    positions = torch.arange(first, first + queries, device="cuda")
    out = decode_attention_rope_triton(qkv, heads, rotary.inv_freq, *caches, positions)
    expected = rotate_store_attend(qkv, heads, rotary, expected_caches, positions)
    assert out.shape == expected.shape
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
    for got, want in zip(caches, expected_caches):
        torch.testing.assert_close(got[:, :, first:first + queries].float(), want[:, :, first:first + queries].float(),
                                   rtol=0.02, atol=0.02)
        assert torch.equal(got[:, :, :first], want[:, :, :first]) and torch.equal(got[:, :, first + queries:],
                                                                                    want[:, :, first + queries:])

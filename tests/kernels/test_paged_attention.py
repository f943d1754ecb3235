"""Paged KV cache: store (with int8/fp8 quantization) and attention. The reference against dense float64
attention on CPU; the Triton kernel against the reference on CUDA, NaN in every slot it must not read."""

import math

import pytest
import torch

from llmpress.kernels import ops
from llmpress.kernels.reference import (KV_QMAX, KV_SCALE_MIN, dequantize_kv, paged_attention_reference,
                                        quantize_kv)

cuda_only = pytest.mark.skipif(not ops.triton_available(), reason="Triton paged attention needs a CUDA GPU")
FP8 = torch.float8_e4m3fn


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def shuffled_block_tables(seq_lens: list[int], block_size: int, spare_blocks: int = 3):
    """Each sequence gets ceil(len / block_size) distinct blocks in random order, plus one extra table entry
    pointing at some other block (never to be read). Returns (int32 [S, max_blocks], num_blocks)."""
    needed = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare_blocks
    tables = torch.randint(0, num_blocks, (len(seq_lens), max(needed) + 1))
    order = torch.randperm(num_blocks)
    start = 0
    for s, n in enumerate(needed):
        tables[s, :n] = order[start:start + n]
        start += n
    return tables.int(), num_blocks


def slots_of(tables: torch.Tensor, s: int, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots (block * block_size + offset) of sequence s's key positions [T], int64."""
    return tables[s].long()[positions // block_size] * block_size + positions % block_size


def empty_paged_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                      device: str = "cpu"):
    """(k_cache, v_cache, k_scale, v_scale) with NaN wherever a NaN fits: a slot read before it was written
    shows up in the result. int8 cannot hold NaN; its slots get random bytes and NaN scales."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    if dtype == torch.int8:
        caches = [torch.randint(-128, 128, shape, dtype=torch.int8, device=device) for _ in range(2)]
    else:
        caches = [torch.full(shape, float("nan"), device=device).to(dtype) for _ in range(2)]
    scales = [torch.full(shape[:3], float("nan"), dtype=torch.float16, device=device) for _ in range(2)] \
        if dtype in KV_QMAX else [None, None]
    return caches[0], caches[1], scales[0], scales[1]


def dense_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One sequence, written from the definition: q [T, H, D] at positions L-T..L-1 over k, v [L, Hkv, D]."""
    T, H, D = q.shape
    L, Hkv, _ = k.shape
    k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("thd,lhd->htl", q, k) / math.sqrt(D)
    visible = torch.arange(L)[None, :] <= torch.arange(L - T, L)[:, None]  # [T, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("htl,lhd->thd", scores.softmax(dim=-1), v)


# (cached prefix, new tokens): decode, full prefill, chunked prefill over a cached prefix, a one-token prompt,
# decode across a block boundary.
MIXED_BATCH = [(9, 1), (0, 7), (13, 5), (0, 1), (31, 1), (4, 12)]


def metadata(batch: list[tuple[int, int]], device: str = "cpu"):
    """seq_lens [S] and query_start_loc [S+1], int32, for (prefix, q_len) pairs."""
    seq_lens = torch.tensor([p + n for p, n in batch], dtype=torch.int32, device=device)
    q_lens = torch.tensor([n for _, n in batch], device=device)
    query_start_loc = torch.cat([q_lens.new_zeros(1), q_lens.cumsum(0)]).int()
    return seq_lens, query_start_loc


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 4)])
def test_reference_matches_dense_attention(block_size, heads, kv_heads):
    torch.manual_seed(block_size + heads)
    D = 16
    seq_lens, query_start_loc = metadata(MIXED_BATCH)
    tables, num_blocks = shuffled_block_tables(seq_lens.tolist(), block_size)
    k_cache, v_cache, _, _ = empty_paged_cache(num_blocks, block_size, kv_heads, D, torch.float64)
    q = torch.randn(int(query_start_loc[-1]), heads, D, dtype=torch.float64)
    expected = torch.empty_like(q)
    for s, (prefix, q_len) in enumerate(MIXED_BATCH):
        L = prefix + q_len
        k, v = torch.randn(2, L, kv_heads, D, dtype=torch.float64)
        t = torch.arange(L)
        blocks, offsets = tables[s].long()[t // block_size], t % block_size
        k_cache[blocks, offsets], v_cache[blocks, offsets] = k, v  # the block layout, written out by hand
        rows = slice(int(query_start_loc[s]), int(query_start_loc[s + 1]))
        expected[rows] = dense_causal_attention(q[rows], k, v)
    args = (q, k_cache, v_cache, None, None, tables, seq_lens, query_start_loc,
            max(n for _, n in MIXED_BATCH), int(seq_lens.max()))
    assert torch.isfinite(paged_attention_reference(*args)).all()
    assert rel_error(paged_attention_reference(*args), expected) < 1e-12
    for backend in ("torch", "sdpa", "auto"):  # off CUDA every backend but "triton" is the reference
        with ops.use_backend(backend):
            assert rel_error(ops.paged_attention(*args), expected) < 1e-12


@pytest.mark.parametrize("dtype,bound", [(torch.int8, 1e-2), (FP8, 7e-2)])
def test_quantize_dequantize_error_bound(dtype, bound):
    torch.manual_seed(0)
    x = torch.randn(64, 4, 128) * torch.logspace(-6, 2, 64)[:, None, None]  # vectors of 1e-6 up to 1e2
    x[3, 1] = 0.0
    q, scale = quantize_kv(x, dtype)
    assert q.dtype == dtype and scale.dtype == torch.float16 and scale.shape == x.shape[:-1]
    assert q.float().abs().max() <= KV_QMAX[dtype]
    back = dequantize_kv(q, scale, torch.float32)
    assert torch.isfinite(back).all() and (back[3, 1] == 0).all() and scale[3, 1] == KV_SCALE_MIN
    # Relative error where the scale is amax / QMAX; tiny vectors get the floor scale, so a fixed step.
    unclamped = scale.float() > KV_SCALE_MIN
    assert unclamped.sum() > 100
    errors = (back - x).norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)
    assert errors[unclamped].max() < bound
    if dtype == torch.int8:  # round to nearest: at most half a step (plus fp32 rounding), the step being the scale
        assert ((back - x).abs() <= 0.5 * scale.float()[..., None] * (1 + 1e-4)).all()
    else:  # e4m3: half an ulp is 2^-4 of a normal value, 2^-10 absolute among subnormals; times the scale
        assert ((back - x).abs() <= (2.0 ** -4 * x.abs() + 2.0 ** -10 * scale.float()[..., None]) * (1 + 1e-4)).all()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8, FP8])
def test_store_kv_paged_then_read_back(cache_dtype):
    torch.manual_seed(1)
    block_size, kv_heads, D = 4, 2, 32
    model_dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
    seq_lens = [5, 1, 11]
    tables, num_blocks = shuffled_block_tables(seq_lens, block_size)
    k_cache, v_cache, k_scale, v_scale = empty_paged_cache(num_blocks, block_size, kv_heads, D, cache_dtype)
    slots = torch.cat([slots_of(tables, s, torch.arange(n), block_size) for s, n in enumerate(seq_lens)])
    k, v = torch.randn(2, len(slots), kv_heads, D).to(model_dtype)
    k[2] = 0.0  # an all-zero key must come back zero, not 0 / 0
    ops.store_kv_paged(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    blocks, offsets = slots // block_size, slots % block_size
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        if scale is None:
            assert torch.equal(cache[blocks, offsets], x.to(cache_dtype))
        else:
            back = dequantize_kv(cache[blocks, offsets], scale[blocks, offsets], torch.float32)
            assert torch.isfinite(back).all()
            assert rel_error(back, x) < (1e-2 if cache_dtype == torch.int8 else 7e-2)
    assert (k_cache[blocks[2], offsets[2]].float() == 0).all()
    # Slots no token was written to still hold the filler.
    unwritten = torch.ones(num_blocks * block_size, dtype=torch.bool)
    unwritten[slots] = False
    filler = k_cache.float() if k_scale is None else k_scale  # int8 holds no NaN; its scales do
    assert filler.flatten(0, 1)[unwritten].isnan().all()


@pytest.mark.parametrize("cache_dtype,bound", [(torch.int8, 2e-2), (FP8, 1e-1)])
def test_quantized_cache_attention_stays_close_to_full_precision(cache_dtype, bound):
    torch.manual_seed(2)
    block_size, heads, kv_heads, D = 16, 8, 2, 64
    seq_lens, query_start_loc = metadata(MIXED_BATCH)
    tables, num_blocks = shuffled_block_tables(seq_lens.tolist(), block_size)
    full = empty_paged_cache(num_blocks, block_size, kv_heads, D, torch.float32)
    quant = empty_paged_cache(num_blocks, block_size, kv_heads, D, cache_dtype)
    slots = torch.cat([slots_of(tables, s, torch.arange(int(n)), block_size) for s, n in enumerate(seq_lens)])
    k, v = torch.randn(2, len(slots), kv_heads, D)
    ops.store_kv_paged(k, v, *full, slots)
    ops.store_kv_paged(k, v, *quant, slots)
    q = torch.randn(int(query_start_loc[-1]), heads, D)
    meta = (tables, seq_lens, query_start_loc, 12, int(seq_lens.max()))
    with ops.use_backend("torch"):
        assert rel_error(ops.paged_attention(q, *quant, *meta), ops.paged_attention(q, *full, *meta)) < bound


def test_triton_backend_needs_cuda_tensors():
    q = torch.randn(1, 2, 64)
    k_cache, v_cache, _, _ = empty_paged_cache(2, 4, 2, 64, torch.float32)
    one = torch.ones(1, dtype=torch.int32)
    with ops.use_backend("triton"), pytest.raises(ValueError, match="CUDA"):
        ops.paged_attention(q, k_cache, v_cache, None, None, one[None], one, torch.tensor([0, 1]).int(), 1, 1)


# ---- CUDA: the Triton kernel -----------------------------------------------------------------------------

def random_paged_batch(batch, heads, kv_heads, head_dim, block_size, kv_dtype, q_dtype, device="cuda"):
    """A step's inputs: every sequence's keys/values (prefix + new tokens) stored through ops.store_kv_paged
    into a NaN-filled shuffled cache, and queries for the new tokens. Returns the paged_attention args."""
    seq_lens, query_start_loc = metadata(batch, device)
    tables, num_blocks = shuffled_block_tables(seq_lens.tolist(), block_size)
    tables = tables.to(device)
    caches = empty_paged_cache(num_blocks, block_size, kv_heads, head_dim, kv_dtype, device)
    lens = seq_lens.tolist()
    slots = torch.cat([slots_of(tables, s, torch.arange(n, device=device), block_size) for s, n in enumerate(lens)])
    k, v = torch.randn(2, len(slots), kv_heads, head_dim, device=device).to(q_dtype)
    ops.store_kv_paged(k, v, *caches, slots)
    q = torch.randn(int(query_start_loc[-1]), heads, head_dim, device=device).to(q_dtype)
    return (q, *caches, tables, seq_lens, query_start_loc, max(n for _, n in batch), max(lens))


def random_mixed_batch(seed: int) -> list[tuple[int, int]]:
    """Decodes (prefixes up to ~1000), full prefills and chunked prefills (q_len up to ~300), and edge cases:
    a one-token prompt, decode at the first position of a new 64-key step, a prefill of exactly 64."""
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    batch = [(r(0, 1000), 1) for _ in range(5)] + [(0, r(2, 300)), (r(1, 1000), r(2, 300)), (r(1, 600), r(2, 40))]
    batch += [(0, 1), (64, 1), (0, 64), (63, 2)]
    perm = torch.randperm(len(batch), generator=g).tolist()
    return [batch[i] for i in perm]


@cuda_only
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kv", ["model", "int8", "fp8"])
@pytest.mark.parametrize("heads,kv_heads", [(24, 8), (32, 8), (9, 3), (8, 8)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_paged_attention_matches_reference(head_dim, heads, kv_heads, kv, q_dtype):
    torch.manual_seed(head_dim + heads)
    kv_dtype = {"model": q_dtype, "int8": torch.int8, "fp8": FP8}[kv]
    args = random_paged_batch(random_mixed_batch(head_dim * heads), heads, kv_heads, head_dim, 16, kv_dtype, q_dtype)
    with ops.use_backend("triton"):
        got = ops.paged_attention(*args)
    ref = paged_attention_reference(args[0].double(), *args[1:])
    assert torch.isfinite(got).all()
    assert rel_error(got, ref) < (2e-2 if q_dtype == torch.bfloat16 else 1e-2), rel_error(got, ref)
    # Decode rows alone (one query each): the G heads of a kv head share one tile.
    starts = args[7].tolist()
    decode_rows = [starts[s] for s in range(len(starts) - 1) if starts[s + 1] - starts[s] == 1]
    assert rel_error(got[decode_rows], ref[decode_rows]) < 2e-2


@cuda_only
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_triton_paged_attention_replays_in_a_cuda_graph(kv_dtype):
    torch.manual_seed(3)
    heads, kv_heads, D, block_size, S = 24, 8, 128, 16, 6
    prefixes = [37, 0, 500, 15, 16, 200]
    max_seq_len = 1024
    tables, num_blocks = shuffled_block_tables([max_seq_len] * S, block_size)
    tables = tables.cuda()
    caches = empty_paged_cache(num_blocks, block_size, kv_heads, D, kv_dtype, "cuda")
    # Fill the prefixes, then capture one decode step: store the new token's K/V, attend.
    for s, n in enumerate(prefixes):
        slots = slots_of(tables, s, torch.arange(n, device="cuda"), block_size)
        ops.store_kv_paged(*torch.randn(2, n, kv_heads, D, device="cuda").to(torch.bfloat16), *caches, slots)
    q = torch.empty(S, heads, D, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = torch.empty(2, S, kv_heads, D, device="cuda", dtype=torch.bfloat16)
    seq_lens = torch.empty(S, dtype=torch.int32, device="cuda")
    slot_mapping = torch.empty(S, dtype=torch.int64, device="cuda")
    query_start_loc = torch.arange(S + 1, dtype=torch.int32, device="cuda")

    def set_step(lengths):
        q.normal_(), k_new.normal_(), v_new.normal_()
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        slot_mapping.copy_(torch.stack([slots_of(tables, s, torch.tensor([n - 1], device="cuda"), block_size)[0]
                                        for s, n in enumerate(lengths)]))

    def step():
        ops.store_kv_paged(k_new, v_new, *caches, slot_mapping)
        return ops.paged_attention(q, *caches, tables, seq_lens, query_start_loc, 1, max_seq_len)

    lengths = [n + 1 for n in prefixes]
    set_step(lengths)
    with ops.use_backend("triton"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # compile outside the capture (storing the same token twice is harmless)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
    for _ in range(3):  # each replay decodes one more token per sequence
        set_step(lengths)
        graph.replay()
        torch.cuda.synchronize()
        ref = paged_attention_reference(q.double(), *caches, tables, seq_lens, query_start_loc, 1, max_seq_len)
        assert torch.isfinite(out).all() and rel_error(out, ref) < 2e-2
        lengths = [n + 1 for n in lengths]


@cuda_only
def test_triton_launcher_rejects_bad_inputs():
    from llmpress.kernels.triton_paged_attention import paged_attention_triton
    args = list(random_paged_batch([(5, 1), (0, 3)], 8, 2, 64, 16, torch.int8, torch.bfloat16))
    bad_scale = list(args)
    bad_scale[3] = args[3].float()
    with pytest.raises(ValueError, match="k_scale float16"):
        paged_attention_triton(*bad_scale)
    wrong_dim = list(args)
    wrong_dim[0] = torch.randn(4, 8, 128, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        paged_attention_triton(*wrong_dim)
    no_scales = list(args)
    no_scales[3] = no_scales[4] = None
    with pytest.raises(ValueError, match="needs k_scale"):
        paged_attention_triton(*no_scales)
    wide_tables = list(args)
    wide_tables[5] = args[5].long()
    with pytest.raises(ValueError, match="block_tables must be int32"):
        paged_attention_triton(*wide_tables)


@cuda_only
def test_triton_paged_attention_traces_into_torch_compile_as_one_op():
    torch.manual_seed(4)
    args = random_paged_batch([(40, 1), (0, 20), (7, 3)], 8, 2, 64, 16, torch.float8_e4m3fn, torch.bfloat16)
    with ops.use_backend("triton"):
        eager = ops.paged_attention(*args)
        compiled = torch.compile(ops.paged_attention, fullgraph=True)(*args)
    assert torch.equal(compiled, eager)


@pytest.mark.parametrize("cache_dtype,q_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.int8, torch.float32), (FP8, torch.bfloat16)])
def test_vectorized_sdpa_path_matches_the_reference(cache_dtype, q_dtype):
    """The CPU fast path (kernels/paged_sdpa.py) against the loop reference, quantized caches included."""
    from llmpress.kernels.paged_sdpa import paged_attention_sdpa
    from llmpress.kernels.reference import store_kv_paged_reference
    torch.manual_seed(7)
    block_size, heads, kv_heads, D = 4, 6, 2, 32
    seq_lens, query_start_loc = metadata(MIXED_BATCH)
    tables, num_blocks = shuffled_block_tables(seq_lens.tolist(), block_size)
    k_cache, v_cache, k_scale, v_scale = empty_paged_cache(num_blocks, block_size, kv_heads, D, cache_dtype)
    slots = torch.cat([slots_of(tables, s, torch.arange(int(n)), block_size) for s, n in enumerate(seq_lens)])
    k, v = torch.randn(2, len(slots), kv_heads, D).to(q_dtype)
    store_kv_paged_reference(k, v, k_cache, v_cache, k_scale, v_scale, slots)
    q = torch.randn(int(query_start_loc[-1]), heads, D).to(q_dtype)
    args = (q, k_cache, v_cache, k_scale, v_scale, tables, seq_lens, query_start_loc,
            max(n for _, n in MIXED_BATCH), int(seq_lens.max()))
    got, ref = paged_attention_sdpa(*args), paged_attention_reference(*args)
    assert torch.isfinite(got).all()
    assert rel_error(got, ref) < (1e-6 if q_dtype == torch.float32 else 1e-2)

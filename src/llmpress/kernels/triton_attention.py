"""Triton decode attention over a static KV cache (flash-decoding: split the keys, then combine).

One query token per sequence attends to cache slots 0..position. The keys are split into chunks
processed by separate programs, so that even batch 1 with 8 KV heads fills the GPU; each program
serves every query head of its KV group (grouped-query attention reads each K/V block once).

`decode_attention_rope_triton` also takes the new token's q, k, v straight from the projections: each
program rotates its q heads (RoPE), and the program whose chunk holds the new position rotates k and
writes k, v into the cache before reading it. That replaces three small kernels per layer (rotate q,
rotate k + write it, write v: ~3.8 us per layer on the H200 for 1-1.4 us of work each) with a few
instructions inside this one.
The split programs' partial results are combined by a second kernel, or (`combine = "in_kernel"`) by the
last program of each KV head to finish (an atomic arrival counter, as in the split GEMV). With PDL
(kernels/pdl.py; the RoPE variant by default) the kernel launches while the q|k|v projection is still running.
Reference: `kernels.reference.attention_reference` with the causal-by-position mask (and `apply_rope`,
`StaticKVCache.update` before it for the fused variant).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from llmpress.kernels.pdl import launch_mode, pdl_start, pdl_wait
from llmpress.kernels.triton_int4 import _workspace

BLOCK_N = 64  # keys per inner step
MAX_QUERIES = 8  # new tokens per sequence the plain variant takes (a speculative verify step's k + 1)
# Who combines the splits: "in_kernel" (the last split program of each KV head) or "kernel" (a combine kernel
# after the split kernel). "kernel" by default: with one kernel fewer per layer, the 3B's int4 decode on the H200
# still ran 2.3% slower (int4_gpu.py, results/int4_h200_pdl_ab.*: 594.3-595.0 vs 580.8-581.2 tok/s, twice each).
# The last program combines its GROUP heads one after another after an atomic round trip; a combine kernel
# does every head at once.
combine = "kernel"
# The RoPE variant's split programs request q, its rotation partner, the new token's k and v, inv_freq and the
# norm's shares before any arithmetic. As written before, the squares' reduction (a barrier), the trigonometry and
# its layout conversions (barriers) came between them, and the sm_90 SASS (compiled on the CPU machine) showed
# three rounds of loads before the keys' cp.async: the shares and position; inv_freq; q. On since session 18: 3B
# int4 decode on the H200 (int4_gpu.py variants int4-tc-only-acc-dgf+head against -dgf-lf+head) 1097.1 / 1097.1
# against 1093.5 / 1089.5 tok/s (results/int4_h200_s18b.*), 1102.4 against 1094.3 / 1091.4 (int4_h200_s18c.*).
loads_first = True
# Warps of a one-token split program (its GROUP heads padded to 16 rows x D, a block of 64 keys at a time). 4: on
# 2 and 8 the 3B's int4 decode ran 1081.3 and 1023.8 tok/s against 1093.5 / 1089.5 (results/int4_h200_s18b.*).
decode_warps = 4
# Tried in session 11 and removed, both slower for the 3B's int4 decode on the H200: the split programs' first block
# of keys and values loaded before the PDL wait (958.3 / 956.3 against 1000.1 / 999.9 tok/s,
# results/int4_h200_s11_ab.*), or with the position, bounded by the cache's length, the new token's k and v put in
# from registers (916.2 / 926.1 against 983.8 / 995.3, results/int4_h200_s11_early_kv.*; every split then reads a
# whole block, past the position too).
# Tried in session 17 and removed: the split programs asking the L2 for the layer's gate|up weights after their wait
# (cp.async.bulk.prefetch.L2, 4 KB an instruction), while DRAM idles: 3B int4 decode 953.9 / 935.3 / 873.0 tok/s for
# 8 / 16 / 32 MB against 1084.6 / 1090.7 without (results/int4_h200_s17c.*, commit 2ee5e82).


@triton.jit
def _load_input(ptrs, mask, scale, dtype_ptr, SCALED: tl.constexpr):
    """The new token's q, k or v as the projection gave them; SCALED: an fp32 accumulator of W (w * h) whose
    norm's rsqrt is `scale`, rounded to dtype_ptr's dtype as the projection's own output would be."""
    return _scaled_input(tl.load(ptrs, mask=mask, other=0.0), scale, dtype_ptr, SCALED)


@triton.jit
def _scaled_input(x, scale, dtype_ptr, SCALED: tl.constexpr):
    """`_load_input` of a value already loaded."""
    if SCALED:
        x = (x * scale).to(dtype_ptr.dtype.element_ty)
    return x


@triton.jit
def _rotate(ptr, offs_d, cos, sin, mask, D: tl.constexpr, scale, dtype_ptr, SCALED: tl.constexpr):
    """RoPE in HF's half-split layout, x * cos + rotate_half(x) * sin, in fp32 rounded once to x's dtype.
    ptr: [..., 1] row starts; offs_d: [1, D]; rotate_half(x)[d] = -x[d + D/2] (d < D/2), x[d - D/2] (else)."""
    x = _load_input(ptr + offs_d, mask, scale, dtype_ptr, SCALED)
    partner = _load_input(ptr + (offs_d + D // 2) % D, mask, scale, dtype_ptr, SCALED)
    return _rotate_loaded(x, partner, offs_d, cos, sin, D)


@triton.jit
def _rotate_loaded(x, partner, offs_d, cos, sin, D: tl.constexpr):
    """`_rotate` of x and its partner x[(d + D/2) % D], loaded (and scaled) already."""
    partner = partner.to(tl.float32)
    rotated = tl.where(offs_d < D // 2, -partner, partner)
    return (x.to(tl.float32) * cos + rotated * sin).to(x.dtype)


@triton.jit
def _row_scale(squares_ptr, offs_sq, rows, squares_n, norm_k, norm_eps, QUERIES: tl.constexpr):
    """rsqrt(mean(h^2) + eps) of each of `rows`' tokens (clamped to the step's), from its shares of sum(h^2)."""
    token = tl.minimum(rows, QUERIES - 1)
    shares = tl.load(squares_ptr + offs_sq[None, :] * QUERIES + token[:, None], mask=(offs_sq < squares_n)[None, :],
                     other=0.0)
    return tl.rsqrt(tl.sum(shares, axis=1) / norm_k + norm_eps)


@triton.jit
def _store_new(k_head, v_head, slots, offs_d, k_new, v_new, mask, stride_ks, stride_vs):
    """The new tokens' rotated k and v into the caches at `slots` (a position, or [T, 1] of them under `mask`),
    then a barrier, so that the block's own stores are visible to its loads of the chunk after."""
    tl.store(k_head + slots * stride_ks + offs_d, k_new.to(k_head.dtype.element_ty), mask=mask)
    tl.store(v_head + slots * stride_vs + offs_d, v_new.to(v_head.dtype.element_ty), mask=mask)
    tl.debug_barrier()


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, part_out_ptr, part_lse_ptr,
                  stride_qb, stride_qh, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                  num_kv_heads, num_heads, chunk, sm_scale, stride_qt, stride_nkt, stride_nvt,
                  new_k_ptr, new_v_ptr, inv_freq_ptr, stride_nkb, stride_nvb, out_ptr, counter_ptr,
                  squares_ptr, squares_n, norm_k, norm_eps,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, ROPE: tl.constexpr, COMBINE: tl.constexpr, BLOCK_S: tl.constexpr,
                  PDL: tl.constexpr, SCALED: tl.constexpr = False, SQUARES_P2: tl.constexpr = 1,
                  LOADS_FIRST: tl.constexpr = False, QUERIES: tl.constexpr = 1, BLOCK_T: tl.constexpr = 2,
                  GROUP_P2: tl.constexpr = 1):
    """ROPE: q is the projection's raw output (rotated here), and new_k/new_v ([B, Hkv * D] rows) are the new
    token's k/v, rotated and written at slot `position` by the program whose chunk holds it; otherwise
    q is rotated already and the cache holds the new token. COMBINE: the last split program of this KV head
    to finish combines all splits into out (else `_combine_kernel` does). SCALED (with ROPE): q, k, v are an
    fp32 accumulator of the projection before its RMSNorm's rsqrt, which comes from the `squares_n` shares of
    sum(h^2) at squares_ptr (kernels/triton_int4_accumulate.py): rsqrt(sum / norm_k + norm_eps). LOADS_FIRST (with
    ROPE): every load the keys do not need is requested before any arithmetic (see loads_first). QUERIES: new
    tokens per sequence, query t at positions[t] seeing slots 0..positions[t]; a program's rows are its KV group's
    heads x queries, query-major (row = query * GROUP_P2 + head, BLOCK_G = BLOCK_T * GROUP_P2), so that RoPE's cos
    and sin are computed once a token ([BLOCK_T, D]) and broadcast over its heads: computed a row, the trigonometry
    of 32 rows at T = 6 took 5x the one-token kernel's instructions and spilled (sm_90 SASS). With ROPE new_k/new_v
    hold T rows (stride_nkt, stride_nvt apart), and the program whose chunk holds a token's position writes that
    token's k, v."""
    pdl_start(PDL)
    pdl_wait(PDL)  # q, k, v come from the previous kernel, and the cache grows each step
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    kvh = bh % num_kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    if QUERIES == 1:
        query = offs_g * 0
        heads = kvh * GROUP + offs_g
        g_mask = offs_g < GROUP
        position = tl.load(pos_ptr)
        length = position + 1  # slots 0..position are valid
    else:
        query = offs_g // GROUP_P2
        heads = kvh * GROUP + offs_g % GROUP_P2
        g_mask = (query < QUERIES) & (offs_g % GROUP_P2 < GROUP)
        row_position = tl.load(pos_ptr + query, mask=query < QUERIES, other=-1)  # -1: a padding row sees no key
        length = tl.max(tl.where(g_mask, row_position, 0), axis=0) + 1
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    k_base = k_ptr + b * stride_kb + kvh * stride_kh
    v_base = v_ptr + b * stride_vb + kvh * stride_vh
    q_rows = q_ptr + b * stride_qb + heads[:, None] * stride_qh + query[:, None] * stride_qt
    if ROPE and LOADS_FIRST and QUERIES == 1:  # q, the new k and v (every program: two rows), inv_freq, the shares
        partner_d = (offs_d + D // 2) % D
        q_x = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)
        q_p = tl.load(q_rows + partner_d[None, :], mask=g_mask[:, None], other=0.0)
        new_k_row = new_k_ptr + b * stride_nkb + kvh * D
        k_x = tl.load(new_k_row + offs_d)[None, :]
        k_p = tl.load(new_k_row + partner_d)[None, :]
        v_x = tl.load(new_v_ptr + b * stride_nvb + kvh * D + offs_d)[None, :]
        inv_freq = tl.load(inv_freq_ptr + offs_d % (D // 2))
    scale = 1.0
    token_scale = 1.0
    if SCALED and QUERIES == 1:
        offs_sq = tl.arange(0, SQUARES_P2)
        squares = tl.load(squares_ptr + offs_sq, mask=offs_sq < squares_n, other=0.0)
        scale = tl.rsqrt(tl.sum(squares, axis=0) / norm_k + norm_eps)
    elif SCALED:  # a norm per token: share s of token t at s * QUERIES + t (its q rows, its k and v alike)
        offs_sq = tl.arange(0, SQUARES_P2)
        token_scale = _row_scale(squares_ptr, offs_sq, tl.arange(0, BLOCK_T), squares_n, norm_k, norm_eps,
                                 QUERIES)[:, None]
        scale = token_scale[:, :, None]  # [BLOCK_T, 1, 1]: q's rows as [token, head, D] below
    if ROPE and QUERIES > 1:  # each token rotated by its own position; each held token's k, v rotated and stored
        offs_t = tl.arange(0, BLOCK_T)
        token_position = tl.load(pos_ptr + offs_t, mask=offs_t < QUERIES, other=-1)
        angles = token_position.to(tl.float32)[:, None] * tl.load(inv_freq_ptr + offs_d % (D // 2))[None, :]
        cos = tl.cos(angles).to(k_ptr.dtype.element_ty).to(tl.float32)
        sin = tl.sin(angles).to(k_ptr.dtype.element_ty).to(tl.float32)
        offs_h = tl.arange(0, GROUP_P2)
        q_rows3 = (q_ptr + b * stride_qb + (kvh * GROUP + offs_h)[None, :, None] * stride_qh
                   + offs_t[:, None, None] * stride_qt)
        q_mask3 = ((offs_t < QUERIES)[:, None] & (offs_h < GROUP)[None, :])[:, :, None]
        q = _rotate(q_rows3, offs_d[None, None, :], cos[:, None, :], sin[:, None, :], q_mask3, D, scale, k_ptr,
                    SCALED)
        q = tl.reshape(q, (BLOCK_G, D))  # row query * GROUP_P2 + head, as `query` and `heads` number them
        held = (offs_t < QUERIES) & (token_position >= start) & (token_position < start + chunk)
        if tl.sum(held.to(tl.int32), axis=0) > 0:
            k_rows = new_k_ptr + b * stride_nkb + offs_t[:, None] * stride_nkt + kvh * D
            k_new = _rotate(k_rows, offs_d[None, :], cos, sin, held[:, None], D, token_scale, k_ptr, SCALED)
            v_new = _load_input(new_v_ptr + b * stride_nvb + offs_t[:, None] * stride_nvt + kvh * D + offs_d[None, :],
                                held[:, None], token_scale, k_ptr, SCALED)
            _store_new(k_ptr + b * stride_kb + kvh * stride_kh, v_ptr + b * stride_vb + kvh * stride_vh,
                       token_position[:, None], offs_d[None, :], k_new, v_new, held[:, None], stride_ks, stride_vs)
    elif ROPE and LOADS_FIRST:
        angles = position.to(tl.float32) * inv_freq
        cos = tl.cos(angles).to(k_ptr.dtype.element_ty).to(tl.float32)[None, :]
        sin = tl.sin(angles).to(k_ptr.dtype.element_ty).to(tl.float32)[None, :]
        q = _rotate_loaded(_scaled_input(q_x, scale, k_ptr, SCALED), _scaled_input(q_p, scale, k_ptr, SCALED),
                           offs_d[None, :], cos, sin, D)
        if (position >= start) & (position < start + chunk):  # this program's chunk holds the new token
            k_new = _rotate_loaded(_scaled_input(k_x, scale, k_ptr, SCALED), _scaled_input(k_p, scale, k_ptr, SCALED),
                                   offs_d[None, :], cos, sin, D)
            v_new = _scaled_input(v_x, scale, k_ptr, SCALED)
            _store_new(k_ptr + b * stride_kb + kvh * stride_kh, v_ptr + b * stride_vb + kvh * stride_vh, position,
                       offs_d[None, :], k_new, v_new, None, stride_ks, stride_vs)
    elif ROPE:
        # cos and sin of position * inv_freq as RotaryEmbedding makes them (fp32 angles, rounded to the
        # model's dtype), computed here: as kernel inputs, Inductor built them in two more kernels per layer.
        angles = position.to(tl.float32) * tl.load(inv_freq_ptr + offs_d % (D // 2))
        cos = tl.cos(angles).to(k_ptr.dtype.element_ty).to(tl.float32)[None, :]
        sin = tl.sin(angles).to(k_ptr.dtype.element_ty).to(tl.float32)[None, :]
        q = _rotate(q_rows, offs_d[None, :], cos, sin, g_mask[:, None], D, scale, k_ptr, SCALED)
        if (position >= start) & (position < start + chunk):  # this program's chunk holds the new token
            one = tl.full([1, D], 1, tl.int1)
            k_new = _rotate(new_k_ptr + b * stride_nkb + kvh * D + tl.zeros([1, 1], tl.int32), offs_d[None, :],
                            cos, sin, one, D, scale, k_ptr, SCALED)
            v_new = _load_input(new_v_ptr + b * stride_nvb + kvh * D + offs_d[None, :], one, scale, k_ptr, SCALED)
            _store_new(k_ptr + b * stride_kb + kvh * stride_kh, v_ptr + b * stride_vb + kvh * stride_vh, position,
                       offs_d[None, :], k_new, v_new, None, stride_ks, stride_vs)
    else:
        q = tl.load(q_rows + offs_d[None, :], mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < end
        k = tl.load(k_base + n[:, None] * stride_ks + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(v_base + n[:, None] * stride_vs + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        valid = n_mask[None, :]
        if QUERIES > 1:  # each query its own causal limit
            valid = valid & (n[None, :] <= row_position[:, None])
        m_i, l_i, acc = _attend_block(q, k, v, valid, m_i, l_i, acc, sm_scale, QUERIES > 1)
    has_keys = l_i > 0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, m_i + tl.log(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    rows = ((b * num_heads + heads) * QUERIES + query) * NUM_SPLITS + split
    tl.store(part_out_ptr + rows[:, None] * D + offs_d[None, :], out, mask=g_mask[:, None])
    tl.store(part_lse_ptr + rows, lse, mask=g_mask)
    if COMBINE:
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(counter_ptr + bh, 1, sem="acq_rel")
        if arrived == NUM_SPLITS - 1:
            for g in tl.static_range(GROUP):
                _combine_row(part_out_ptr, part_lse_ptr, out_ptr, b * num_heads + kvh * GROUP + g, NUM_SPLITS,
                             BLOCK_S, D)
            tl.atomic_xchg(counter_ptr + bh, 0)


@triton.jit
def _attend_block(q, k, v, valid, m_i, l_i, acc, sm_scale, EMPTY_ROWS: tl.constexpr = False):
    """Online softmax over one block of keys (`valid` [rows or 1, keys]): the running max, mass and weighted
    values after it. EMPTY_ROWS: a row may have no valid key yet (several queries), whose max stays -inf."""
    s = tl.dot(q, tl.trans(k)) * sm_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_shift = m_new
    if EMPTY_ROWS:  # exp(-inf - -inf) would be NaN: such a row's weights are exp(-inf - 0) = 0, its max stays -inf
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _combine_row(part_out_ptr, part_lse_ptr, out_ptr, row, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                 D: tl.constexpr):
    """out[row] = the splits' outputs weighted by their softmax mass. Loads bypass L1 (.cg): other programs
    wrote the partials."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < NUM_SPLITS
    lse = tl.load(part_lse_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    weights = tl.exp(lse - tl.max(lse, 0))
    weights = weights / tl.sum(weights, 0)
    parts = tl.load(part_out_ptr + (row * NUM_SPLITS + offs_s[:, None]) * D + offs_d[None, :], mask=s_mask[:, None],
                    other=0.0, cache_modifier=".cg")
    out = tl.sum(parts * weights[:, None], 0)
    tl.store(out_ptr + row * D + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _combine_kernel(part_out_ptr, part_lse_ptr, out_ptr, NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                    D: tl.constexpr, PDL: tl.constexpr = 0):
    pdl_start(PDL)
    pdl_wait(PDL)  # it reads the split kernel's partials: wait before any load
    _combine_row(part_out_ptr, part_lse_ptr, out_ptr, tl.program_id(0), NUM_SPLITS, BLOCK_S, D)  # b * H + head


def num_splits_for(batch_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Enough programs for about two waves of the GPU, but never a split with no keys at full length."""
    return max(1, min(math.ceil(2 * num_sms / batch_kv_heads), math.ceil(max_seq_len / BLOCK_N)))


def splits_for(batch_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """How many splits the decode attention over a cache of `max_seq_len` slots runs on this device."""
    return num_splits_for(batch_kv_heads, max_seq_len, torch.cuda.get_device_properties(device).multi_processor_count)


def decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
    """q: [B, H, T, D] (T <= MAX_QUERIES new tokens: a speculative verify step's), rotated; k_cache, v_cache:
    [B, Hkv, S, D] already holding them; positions: [T] int64, query t seeing slots 0..positions[t]. Returns
    [B, H, T, D]."""
    return _decode_attention(q, k_cache, v_cache, positions, ())


def _decode_attention(q, k_cache, v_cache, positions, rope_args: tuple, qkv_norm: tuple | None = None,
                      splits_only: bool = False, row_strides: tuple = (0, 0)):
    B, H, T, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    rope = bool(rope_args)
    assert (T == 1 or (1 <= T <= MAX_QUERIES and (qkv_norm is None or rope) and not splits_only)
            and positions.numel() == T), (q.shape, positions.shape)
    assert H % Hkv == 0, (q.shape, k_cache.shape)
    assert (q.dtype == torch.float32 if qkv_norm else q.dtype == k_cache.dtype) and k_cache.dtype == v_cache.dtype
    assert D in (64, 128), D
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and q.stride(-1) == 1
    if not rope:  # unused pointer arguments of the plain variant
        rope_args = (q, q, q, 0, 0)
    group = H // Hkv
    # the program's rows: its group's heads (one token), or BLOCK_T tokens x GROUP_P2 heads, at least 16 (tl.dot)
    group_p2 = triton.next_power_of_2(group)
    block_g = max(16, group_p2 * (triton.next_power_of_2(T) if T > 1 else 1))
    block_t = block_g // group_p2 if T > 1 else 2
    splits = splits_for(B * Hkv, S, q.device)
    chunk = math.ceil(math.ceil(S / splits) / BLOCK_N) * BLOCK_N
    part_out = torch.empty(B, H, T, splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, T, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, T, D, dtype=k_cache.dtype, device=q.device)
    squares, squares_n, norm_k, norm_eps = qkv_norm or (part_lse, 0, 1, 0.0)
    in_kernel = combine == "in_kernel" and not splits_only and T == 1
    # the split-K arrival counters (zero between launches); unused by the combine kernel's path
    counters = _workspace.get(q.device, 1, B * Hkv)[1] if in_kernel else part_lse
    # PDL where it was measured (kernels/pdl.py): the RoPE variant, between int4 q|k|v and o products
    pdl = launch_mode(q.device) if rope else 0
    block_s = max(2, triton.next_power_of_2(splits))
    _split_kernel[(B * Hkv, splits)](
        q, k_cache, v_cache, positions, part_out, part_lse,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        Hkv, H, chunk, 1.0 / math.sqrt(D), q.stride(2), *row_strides, *rope_args, out, counters, squares, squares_n, norm_k, norm_eps,
        GROUP=group, BLOCK_G=block_g, BLOCK_N=BLOCK_N, D=D, NUM_SPLITS=splits,
        ROPE=rope, COMBINE=in_kernel, BLOCK_S=block_s, PDL=pdl, SCALED=qkv_norm is not None,
        SQUARES_P2=max(2, triton.next_power_of_2(squares_n)), LOADS_FIRST=rope and loads_first,
        # several tokens: 8 warps halve each thread's rows (sm_90: 3648 instructions a thread, 32 spilled stores,
        # against 5624 and 64 on 4 warps at T = 6 for the 3B)
        num_warps=decode_warps if T == 1 else 8,
        QUERIES=T, BLOCK_T=block_t, GROUP_P2=group_p2, launch_pdl=bool(pdl))
    if splits_only:
        return part_out.view(B, H, splits, D), part_lse.view(B, H, splits)
    if not in_kernel:
        _combine_kernel[(B * H * T,)](part_out, part_lse, out, NUM_SPLITS=splits, BLOCK_S=block_s, D=D, PDL=pdl,
                                  num_warps=4, launch_pdl=bool(pdl))
    return out


def decode_attention_rope_triton(qkv: torch.Tensor, num_heads: int, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, positions: torch.Tensor,
                                 qkv_norm: tuple | None = None) -> torch.Tensor:
    """T new tokens per sequence (T <= MAX_QUERIES; several: a speculative verify step), straight from the fused
    projection: qkv [B, T, (H + 2 Hkv) * D] (q, then k, then v) at `positions` [T]; inv_freq: float32 [D / 2], the
    RoPE frequencies (model.rope.RotaryEmbedding's). Rotates q and k, writes k, v into the caches [B, Hkv, S, D] at
    the positions, attends (query t over slots 0..positions[t]). Returns [B, H, T, D] in the caches' dtype. One tensor, not three views of it: given views, Inductor copied each into a buffer of
    its own first. `qkv_norm` (squares, n, K, eps): qkv is the fp32 accumulator of the accumulating decode, each
    token t scaled by rsqrt(sum of its n squares / K + eps), share s of token t at squares[s * T + t]
    (kernels/triton_int4_accumulate.py)."""
    q_heads, rope_args, row_strides = _rope_operands(qkv, num_heads, inv_freq, k_cache)
    return _decode_attention(q_heads, k_cache, v_cache, positions, rope_args, qkv_norm, row_strides=row_strides)


def decode_attention_rope_splits(qkv: torch.Tensor, num_heads: int, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                                 v_cache: torch.Tensor, positions: torch.Tensor,
                                 qkv_norm: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`decode_attention_rope_triton` without its combine kernel: the splits' softmax-normalised outputs [B, H, S,
    D] fp32 and log-sum-exps [B, H, S] (S = `splits_for`), for a product that combines them as it loads them
    (triton_int4_accumulate.frag_accumulate_splits)."""
    q_heads, rope_args, _ = _rope_operands(qkv, num_heads, inv_freq, k_cache)
    return _decode_attention(q_heads, k_cache, v_cache, positions, rope_args, qkv_norm, splits_only=True)


def _rope_operands(qkv: torch.Tensor, num_heads: int, inv_freq: torch.Tensor, k_cache: torch.Tensor):
    """q as [B, H, T, D] heads, the RoPE arguments (new k, new v, inv_freq and their strides) of one tensor, and
    the new k's and v's strides between tokens."""
    B, T, width = qkv.shape
    Hkv, D = k_cache.shape[1], k_cache.shape[-1]
    assert T <= MAX_QUERIES and width == (num_heads + 2 * Hkv) * D and inv_freq.shape == (D // 2,), (
        qkv.shape, inv_freq.shape)
    assert qkv.stride(-1) == 1 and inv_freq.dtype == torch.float32
    q, k, v = qkv.split([num_heads * D, Hkv * D, Hkv * D], dim=-1)
    q_heads = q.view(B, T, num_heads, D).transpose(1, 2)  # a view: strides (stride_b, D, width, 1)
    return q_heads, (k, v, inv_freq.contiguous(), k.stride(0), v.stride(0)), (k.stride(1), v.stride(1))

"""Triton paged attention: one flash-attention kernel for decode, prefill and chunked prefill over a paged cache.

Grid (sequence, row tile, kv head). A sequence's "rows" are (query token, query head of this kv head)
pairs, row r = (token r // G, head kv_head * G + r % G) with G = H // Hkv, so at decode (one token) the G
query heads that share a kv head fill the M side of `tl.dot` and every key block is read once per kv
head (grouped-query attention). Each program walks the keys its rows may see (0..the tile's last
position) in steps of BLOCK_N, gathering each key's block id from the block table, with an online
softmax in fp32 (Dao et al., FlashAttention-2, Alg. 1). int8/fp8 caches are dequantized in registers:
the stored values go into the dots as they are and the per-token scales multiply the score and
probability tiles (a per-key factor commutes out of both dots).
The grid depends only on (S, max_query_len, Hkv), so a CUDA graph captured for one decode batch
replays for any sequence lengths. Reference: `kernels.reference.paged_attention_reference`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax with exp2: exp(x) = 2^(x log2 e), one MUFU instruction
KV_DTYPES_QUANTIZED = (torch.int8, torch.float8_e4m3fn)


@triton.jit
def _attend(acc, l_i, m_i, q, pos, lo, hi, kv_end, block_table_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr,
            stride_cb, stride_cs, stride_sb, stride_ss, score_scale,
            BLOCK_N: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr,
            MASKED: tl.constexpr):
    # Fold keys lo..hi-1 (hi - lo a multiple of BLOCK_N) into the rows' running (acc, l_i, m_i). MASKED: some
    # keys lie past kv_end or after some row's position, so loads and scores are masked; unmasked steps hold
    # only keys that every row may attend to.
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + offs_n
        n_valid = n < kv_end
        # Keys past kv_end may sit in blocks that were never written (NaN in the tests, garbage in a real
        # cache): they are not loaded at all (other=0), since 0 * NaN would still poison the sum.
        if MASKED:
            block = tl.load(block_table_ptr + n // PAGE, mask=n_valid, other=0)
        else:
            block = tl.load(block_table_ptr + n // PAGE)
        cache_row = block.to(tl.int64) * stride_cb + (n % PAGE) * stride_cs  # [BLOCK_N], int64: caches > 2^31 elems
        kv_offsets = cache_row[:, None] + offs_d[None, :]
        if MASKED:
            k = tl.load(k_ptr + kv_offsets, mask=n_valid[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + kv_offsets)
        # Scores in the log2 domain. A per-token key scale is a per-column factor of q·kᵀ, so the int8/fp8
        # values (exact in fp16/bf16) go into the dot as they are and the scale multiplies the scores.
        s = tl.dot(q, tl.trans(k.to(q.dtype)))
        if QUANT != 0:
            scale_row = block.to(tl.int64) * stride_sb + (n % PAGE) * stride_ss
            if MASKED:
                k_scale = tl.load(k_scale_ptr + scale_row, mask=n_valid, other=0.0)
                v_scale = tl.load(v_scale_ptr + scale_row, mask=n_valid, other=0.0)
            else:
                k_scale = tl.load(k_scale_ptr + scale_row)
                v_scale = tl.load(v_scale_ptr + scale_row)
            s = s * (k_scale.to(tl.float32) * score_scale)[None, :]
        else:
            s = s * score_scale
        if MASKED:
            s = tl.where((n[None, :] <= pos[:, None]) & n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptr + kv_offsets, mask=n_valid[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + kv_offsets)
        if QUANT != 0:
            # Likewise a per-token value scale weights that token's probability: p·(v_q * s) = (p * s)·v_q.
            p = p * v_scale.to(tl.float32)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _paged_attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr,
                            block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
                            stride_qn, stride_qh, stride_on, stride_oh,
                            stride_cb, stride_cs, stride_ch, stride_sb, stride_ss, stride_sh, stride_bt,
                            qk_scale,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            PAGE: tl.constexpr, D: tl.constexpr, QUANT: tl.constexpr):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    num_rows = q_len * GROUP
    if tile * BLOCK_M >= num_rows:  # the grid is sized for the longest query chunk of the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    token = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    pos = seq_len - q_len + token  # this row's query position; it sees keys 0..pos
    offs_d = tl.arange(0, D)
    q_offsets = (q_start + token)[:, None].to(tl.int64) * stride_qn + head[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None], other=0.0)
    if QUANT == 2:
        # Both dots of an fp8 cache run in fp16 whatever q's dtype: fp8 -> fp16 is one instruction per pair
        # on Hopper, fp8 -> bf16 goes through fp32 (15% slower at batch-256 decode, measured on an H200).
        # q is pre-scaled into fp16 (|q| * log2(e) / sqrt(D) < 65504: true of any trained Llama's queries).
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        score_scale = 1.0
    else:
        score_scale = qk_scale

    # Keys 0..first_pos are visible to every row of the tile; those up to the tile's last position only to some.
    first_pos = seq_len - q_len + (tile * BLOCK_M) // GROUP
    last_pos = seq_len - q_len + (tl.minimum(tile * BLOCK_M + BLOCK_M, num_rows) - 1) // GROUP
    kv_end = last_pos + 1
    unmasked_end = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    masked_end = tl.cdiv(kv_end, BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    block_table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_ptr = k_cache_ptr + kv_head * stride_ch
    v_ptr = v_cache_ptr + kv_head * stride_ch
    k_scale_ptr = k_scale_ptr + kv_head * stride_sh
    v_scale_ptr = v_scale_ptr + kv_head * stride_sh
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, pos, 0, unmasked_end, kv_end, block_table_ptr, k_ptr, v_ptr,
                            k_scale_ptr, v_scale_ptr, stride_cb, stride_cs, stride_sb, stride_ss, score_scale,
                            BLOCK_N, PAGE, D, QUANT, MASKED=False)
    acc, l_i, m_i = _attend(acc, l_i, m_i, q, pos, unmasked_end, masked_end, kv_end, block_table_ptr, k_ptr, v_ptr,
                            k_scale_ptr, v_scale_ptr, stride_cb, stride_cs, stride_sb, stride_ss, score_scale,
                            BLOCK_N, PAGE, D, QUANT, MASKED=True)
    # Every valid row sees key 0, so l_i >= 1 there; the guard only keeps padding rows finite.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_offsets = (q_start + token)[:, None].to(tl.int64) * stride_on + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


def launch_config(max_query_len: int, group: int) -> dict:
    """Tile sizes: 16 rows (tl.dot's minimum M) when the longest chunk's rows fit in one tile, which is
    every decode batch; 64 rows for prefill, where each key block loaded serves more queries. Chosen by
    `benchmarks/paged_attention_gpu.py --sweep` on an H200 (3B shape): 64 keys, 4 warps, 2 stages was best
    or within 2% of best for bf16 decode at batch 32 and 256 and for a 1024-token prefill."""
    block_m = 16 if max_query_len * group <= 16 else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=2)


def check_paged_attention_inputs(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, query_start_loc):
    """Raise one ValueError naming the first input the kernel cannot take (dtype, shape, stride, device)."""
    def fail(message: str):
        raise ValueError(f"paged_attention (triton): {message}")

    if not q.is_cuda:
        fail(f"q must be on a CUDA device, got {q.device}")
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16):
        fail(f"q must be [N, H, D] float16/bfloat16, got {tuple(q.shape)} {q.dtype}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        fail(f"k_cache and v_cache must be [num_blocks, block_size, Hkv, D] of one dtype, got "
             f"{tuple(k_cache.shape)} {k_cache.dtype} and {tuple(v_cache.shape)} {v_cache.dtype}")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    if head_dim != q.shape[2] or head_dim not in (64, 128):
        fail(f"head_dim must be 64 or 128 and equal in q and the cache, got q {q.shape[2]}, cache {head_dim}")
    if q.shape[1] % num_kv_heads:
        fail(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({num_kv_heads})")
    if k_cache.dtype not in (q.dtype, *KV_DTYPES_QUANTIZED):
        fail(f"the cache dtype must be q's ({q.dtype}), int8 or float8_e4m3fn, got {k_cache.dtype}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        fail(f"k_cache and v_cache need equal strides with a contiguous head_dim (k {k_cache.stride()}, "
             f"v {v_cache.stride()}), and q a contiguous head_dim (q {q.stride()})")
    if k_cache.dtype in KV_DTYPES_QUANTIZED:
        expected = (num_blocks, block_size, num_kv_heads)
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None or scale.dtype != torch.float16 or tuple(scale.shape) != expected:
                got = "None" if scale is None else f"{tuple(scale.shape)} {scale.dtype}"
                fail(f"a {k_cache.dtype} cache needs {name} float16 {expected}, got {got}")
        if k_scale.stride() != v_scale.stride():
            fail(f"k_scale and v_scale need equal strides, got {k_scale.stride()} and {v_scale.stride()}")
    elif k_scale is not None or v_scale is not None:
        fail(f"an unquantized ({k_cache.dtype}) cache takes no scales; pass k_scale=v_scale=None")
    S = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    for name, t, shape in (("block_tables", block_tables, (S, block_tables.shape[-1])), ("seq_lens", seq_lens, (S,)),
                           ("query_start_loc", query_start_loc, (S + 1,))):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or t.stride(-1) != 1:
            fail(f"{name} must be int32 {shape} with a contiguous last dim, got {tuple(t.shape)} {t.dtype}")
    tensors = [k_cache, v_cache, block_tables, seq_lens, query_start_loc, k_scale, v_scale]
    if any(t is not None and t.device != q.device for t in tensors):
        fail("all inputs must be on q's device")


def paged_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           max_query_len: int, max_seq_len: int, config: dict | None = None) -> torch.Tensor:
    """Same contract as `paged_attention_reference`; q [N, H, D] fp16/bf16, head_dim 64/128, kv in q's
    dtype, int8 or float8_e4m3fn. Rows of q outside every sequence's range are left unwritten. max_seq_len
    is not needed by this kernel (a split-K variant would size its splits with it). `config` (BLOCK_M,
    BLOCK_N, num_warps, num_stages) overrides `launch_config`, for benchmark sweeps."""
    check_paged_attention_inputs(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, query_start_loc)
    N, H, D = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    S = seq_lens.shape[0]
    group = H // num_kv_heads
    out = torch.empty_like(q)
    if S == 0 or max_query_len == 0:
        return out
    config = config or launch_config(max_query_len, group)
    quantized = k_cache.dtype in KV_DTYPES_QUANTIZED
    # Unquantized: the scale pointers are never read (QUANT is a constexpr); any tensor will do.
    scale_k, scale_v = (k_scale, v_scale) if quantized else (k_cache, v_cache)
    scale_strides = (k_scale.stride(0), k_scale.stride(1), k_scale.stride(2)) if quantized else (0, 0, 0)
    grid = (S, triton.cdiv(max_query_len * group, config["BLOCK_M"]), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, scale_k, scale_v, out, block_tables, seq_lens, query_start_loc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *scale_strides, block_tables.stride(0),
        LOG2E / math.sqrt(D),
        GROUP=group, PAGE=block_size, D=D, QUANT={torch.int8: 1, torch.float8_e4m3fn: 2}.get(k_cache.dtype, 0),
        **config)
    return out

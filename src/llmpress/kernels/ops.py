"""The op interface the model calls, with a backend switch.

Backends: `torch` (the float32 reference math in `reference.py`), `sdpa` (PyTorch's fused
attention), `triton` (our kernels, CUDA only), `auto` (triton where it applies on CUDA, else sdpa).
Tests force a backend with `use_backend`; nothing here reads the environment at import time.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import NamedTuple

import torch
import torch.nn.functional as F

from llmpress.kernels.reference import (attention_reference, cache_attention_mask, greedy_tokens_reference,
                                       int4_matmul_reference,
                                       int4_matmul_fragments_reference, int4_matmul_rows_reference,
                                       paged_attention_reference, rms_norm_reference, store_kv_paged_reference)

BACKENDS = ("auto", "torch", "sdpa", "triton")
_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the kernel backend for all ops."""
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


# A plain constant (not a cached call) so torch.compile traces the dispatch below without warnings.
HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return HAS_TRITON and torch.cuda.is_available()


def _triton_requested(t: torch.Tensor) -> bool:
    """Whether an op runs its Triton kernel for input `t`: the "triton" backend always (it raises where the kernel
    cannot take the input), "auto" for CUDA tensors when Triton is installed."""
    return _backend == "triton" or (_backend == "auto" and t.is_cuda and HAS_TRITON)


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


# Greedy tokens through kernels/triton_argmax.py on CUDA (torch.argmax of one 128k row is a reduction PyTorch runs
# on a few threads); False keeps torch.argmax, for benchmarks/int4_gpu.py's comparison.
triton_greedy_tokens = True


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """logits: [..., V] -> int64 [...], the index of each row's maximum (the first on ties), like argmax(dim=-1)."""
    if (_triton_requested(logits) and triton_greedy_tokens and logits.is_cuda and logits.shape[-1] > 0
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16)):
        return torch.ops.llmpress.greedy_tokens(logits)
    return greedy_tokens_reference(logits)


@torch.library.custom_op("llmpress::greedy_tokens", mutates_args=())
def _greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    from llmpress.kernels.triton_argmax import greedy_tokens_triton
    return greedy_tokens_triton(logits if logits.stride(-1) == 1 else logits.contiguous())


@_greedy_tokens.register_fake
def _(logits):
    return logits.new_empty(logits.shape[:-1], dtype=torch.int64)


# Rows the one-program ending of `greedy_advance` takes on CUDA; more rows keep torch's ops after greedy_tokens.
GREEDY_ADVANCE_MAX_ROWS = 8


def greedy_advance(logits: torch.Tensor, token: torch.Tensor, produced: torch.Tensor, position: torch.Tensor) -> None:
    """A greedy decode step's ending, in place: token[:, 0] = produced[:, position] = argmax of each row of logits
    [B, V], then position [1] += 1 (token [B, 1] and produced [B, S] int64: generation/greedy_step.py)."""
    if (_triton_requested(logits) and triton_greedy_tokens and logits.is_cuda and logits.dim() == 2
            and logits.shape[0] <= GREEDY_ADVANCE_MAX_ROWS and logits.dtype in (torch.float32, torch.bfloat16,
                                                                              torch.float16)):
        torch.ops.llmpress.greedy_advance(logits, token, produced, position)
        return
    next_token = greedy_tokens(logits)
    produced.index_copy_(1, position, next_token[:, None])
    token.copy_(next_token[:, None])
    position.add_(1)


@torch.library.custom_op("llmpress::greedy_advance", mutates_args=("token", "produced", "position"))
def _greedy_advance(logits: torch.Tensor, token: torch.Tensor, produced: torch.Tensor, position: torch.Tensor) -> None:
    from llmpress.kernels.triton_argmax import greedy_advance_triton
    greedy_advance_triton(logits if logits.stride(-1) == 1 else logits.contiguous(), token, produced, position)


@_greedy_advance.register_fake
def _(logits, token, produced, position):
    return None


# Steps of 2..8 new tokens of one sequence (a speculative verify step) through the Triton decode kernel too
# (triton_attention.decode_attention_triton, each query its own causal limit) instead of SDPA with a mask over the
# whole cache, for every model. Off: timed for the int4 3B's verify step only (H200, compile mode): 2.35 and 2.54 ms
# a step with it (results/speculative_h200_s13{,b}.*) against 2.60 without (verify_probe_h200_s13b.*), each from
# another run; the accumulating verify step takes it by its own switch, int4_accumulate_rows_into_attention.
triton_verify_attention = False


def cached_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     positions: torch.Tensor) -> torch.Tensor:
    """Attention of new tokens over a static cache. q: [B, H, T, D] at `positions` [T];
    k_cache, v_cache: [B, Hkv, S, D] already holding the new tokens. Query at position p sees slots 0..p."""
    use_triton = _triton_requested(q)
    queries = q.shape[2] == 1 or (triton_verify_attention and q.shape[2] <= 8 and q.shape[0] == 1)
    if use_triton and queries and q.shape[-1] in (64, 128):
        return torch.ops.llmpress.decode_attention(q, k_cache, v_cache, positions)
    if _backend == "triton":
        raise ValueError("the triton backend covers one-token decode on CUDA (head_dim 64/128) only")
    return attention(q, k_cache, v_cache, mask=cache_attention_mask(positions, k_cache.shape[2]))


# Registered as a custom op so torch.compile treats the Triton launch as one opaque call (and CUDA
# graphs capture it); the fake implementation gives the output's shape without running it.
@torch.library.custom_op("llmpress::decode_attention", mutates_args=())
def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
    from llmpress.kernels.triton_attention import decode_attention_triton
    return decode_attention_triton(q, k_cache, v_cache, positions)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, positions):
    return torch.empty_like(q)


# When one-token decode over a static cache hands RoPE and the cache write to the attention kernel
# (decode_attention_rope) instead of three small kernels before it: "int4" (after an int4 q|k|v GEMV: +7.9%
# for the 3B's int4 decode on the H200), "always" (bf16 too: -1.6 to -1.8% there, Inductor's own kernels
# around it got slower), "never". benchmarks/decode_gpu.py and int4_gpu.py time them (benchmarks/NOTES.md).
ROPE_FUSION_MODES = ("never", "int4", "always")
fuse_rope_into_attention = "int4"


def rope_attention_applies(qkv: torch.Tensor, cos: torch.Tensor, head_dim: int) -> bool:
    """Whether `cached_attention_rope` runs the fused Triton kernel for this new token's qkv ([B, 1, width]; or
    [1, T <= 8, width] with `triton_verify_attention`) (the caller decides whether its projection is one the mode
    covers)."""
    new_tokens = qkv.shape[1] == 1 or (triton_verify_attention and qkv.shape[0] == 1 and qkv.shape[1] <= 8)
    return (fuse_rope_into_attention != "never" and _backend in ("auto", "triton") and qkv.is_cuda and HAS_TRITON
            and new_tokens and cos.dim() == 2 and head_dim in (64, 128)
            and qkv.dtype in (torch.float16, torch.bfloat16))


def cached_attention_rope(qkv: torch.Tensor, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                          inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          positions: torch.Tensor) -> torch.Tensor:
    """T new tokens per sequence: qkv [B, T, (H + 2 Hkv) * D] as the fused projection gives it (q, k, v), cos,
    sin [T, D] (RotaryEmbedding's, from `inv_freq` [D / 2] at `positions` [T]). Rotates q and k, writes k and v
    into the caches [B, Hkv, S, D] at the positions, attends over slots 0..position. Returns [B, H, T, D]. The
    Triton kernel does it all (`rope_attention_applies`), computing cos and sin itself from inv_freq; the
    composition below is what it replaces (and the reference it is tested against)."""
    if rope_attention_applies(qkv, cos, k_cache.shape[-1]):
        return torch.ops.llmpress.decode_attention_rope(qkv, num_heads, inv_freq, k_cache, v_cache, positions)
    from llmpress.model.rope import apply_rope
    B, T, Hkv, D = qkv.shape[0], qkv.shape[1], k_cache.shape[1], k_cache.shape[-1]
    q, k, v = (t.view(B, T, -1, D).transpose(1, 2) for t in qkv.split([num_heads * D, Hkv * D, Hkv * D], dim=-1))
    k_cache.index_copy_(2, positions, apply_rope(k, cos, sin))
    v_cache.index_copy_(2, positions, v)
    return cached_attention(apply_rope(q, cos, sin), k_cache, v_cache, positions)


@torch.library.custom_op("llmpress::decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def _decode_attention_rope(qkv: torch.Tensor, num_heads: int, inv_freq: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    from llmpress.kernels.triton_attention import decode_attention_rope_triton
    return decode_attention_rope_triton(qkv, num_heads, inv_freq, k_cache, v_cache, positions)


@_decode_attention_rope.register_fake
def _(qkv, num_heads, inv_freq, k_cache, v_cache, positions):
    return qkv.new_empty(qkv.shape[0], num_heads, qkv.shape[1], k_cache.shape[-1])


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                g_idx: torch.Tensor | None, group_size: int, bits: int) -> torch.Tensor:
    """x [M, K] @ W for a weight in the runtime packed layout (quant/format.py). Returns [M, N] in x.dtype.
    Triton for 4-bit on CUDA (fp16/bf16 activations), the dequantize-then-matmul reference otherwise."""
    use_triton = _triton_requested(x)
    if use_triton and bits == 4 and x.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.llmpress.int4_matmul(x.contiguous(), qweight, scales, qzeros, g_idx, group_size)
    if _backend == "triton":
        raise ValueError("the triton backend covers 4-bit weights with fp16/bf16 activations on CUDA only")
    return int4_matmul_reference(x, qweight, scales, qzeros, g_idx, group_size, bits)


@torch.library.custom_op("llmpress::int4_matmul", mutates_args=())
def _int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                 g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor:
    from llmpress.kernels.triton_int4 import int4_matmul_triton
    return int4_matmul_triton(x, qweight, scales, qzeros, g_idx, group_size)


@_int4_matmul.register_fake
def _(x, qweight, scales, qzeros, g_idx, group_size):
    return x.new_empty(x.shape[0], qweight.shape[1])


# Who adds the batch-1 int4 GEMV's per-tile partial sums: "in_kernel" (its last program per row tile) or
# "partials" (PyTorch, below). Timed both ways end to end by benchmarks/int4_gpu.py (variant int4-partials).
int4_batch1_reduce = "in_kernel"


def int4_matmul_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                     group_size: int) -> torch.Tensor:
    """x [M, K] @ Wᵀ for a 4-bit weight in the row layout (quant/format.py `runtime_to_rows`). Returns [M, N] in
    x.dtype. Triton on CUDA (fp16/bf16 activations), the dequantize-then-matmul reference otherwise."""
    use_triton = _triton_requested(x)
    if use_triton and x.dtype in (torch.float16, torch.bfloat16):
        if x.shape[0] == 1 and int4_batch1_reduce == "partials":
            # The batch-1 GEMV's fp32 partial sums, added up here, outside the op, where torch.compile can
            # fuse the sum into what consumes y (it did for silu * up and the residual add + RMSNorm).
            partials = torch.ops.llmpress.int4_gemv_rows_partials(x.contiguous(), qweight, scales, zeros, group_size)
            return partials.sum(0, keepdim=True).to(x.dtype)
        return torch.ops.llmpress.int4_matmul_rows(x.contiguous(), qweight, scales, zeros, group_size)
    if _backend == "triton":
        raise ValueError("the triton backend covers fp16/bf16 activations on CUDA only")
    return int4_matmul_rows_reference(x, qweight, scales, zeros, group_size)


@torch.library.custom_op("llmpress::int4_matmul_rows", mutates_args=())
def _int4_matmul_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
    return int4_matmul_rows_triton(x, qweight, scales, zeros, group_size)


@_int4_matmul_rows.register_fake
def _(x, qweight, scales, zeros, group_size):
    return x.new_empty(x.shape[0], qweight.shape[0])


@torch.library.custom_op("llmpress::int4_gemv_rows_partials", mutates_args=())
def _int4_gemv_rows_partials(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             group_size: int) -> torch.Tensor:
    from llmpress.kernels.triton_int4_rows_split import split_gemv_rows
    return split_gemv_rows(x, qweight, scales, zeros, group_size)


@_int4_gemv_rows_partials.register_fake
def _(x, qweight, scales, zeros, group_size):
    from llmpress.kernels.triton_int4_rows_split import partials_groups
    G = scales.shape[1]
    return x.new_empty(G // partials_groups(G), qweight.shape[0], dtype=torch.float32)


# Which of a decoder layer's steps batch-1 int4 layers take into their GEMV (int4_gemv_rows_fused): "norm" (the
# RMSNorm before q|k|v and gate|up), "silu" (silu * up before down), "residual" (the add after o and down).
# benchmarks/int4_gpu.py times the combinations (variants int4-apart, int4-rope, int4-rope+res, ...).
# Default: norm and residual (3B int4 decode on the H200, one run: none 561.9 tok/s, residual 566.4, residual +
# norm 602.7, all three 567.0: silu * up is recomputed by every thread that shares a column, and costs more
# than the kernel it saves).
INT4_LAYER_STEPS = frozenset({"norm", "silu", "residual"})
int4_fused_steps = frozenset({"norm", "residual"})


def int4_fused_gemv_applies(x: torch.Tensor) -> bool:
    """Whether `int4_gemv_rows_fused` runs the Triton split GEMV (one row of fp16/bf16 x on CUDA) for x [M, K]."""
    return (bool(int4_fused_steps) and int4_batch1_reduce == "in_kernel" and _backend in ("auto", "triton")
            and x.is_cuda and HAS_TRITON and x.shape[0] == 1 and x.dtype in (torch.float16, torch.bfloat16))


def int4_gemv_rows_fused(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                         silu_mul: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y [1, N] = (residual +) W prologue(x) for a 4-bit row-layout weight, in one kernel (where
    `int4_fused_gemv_applies`; QuantLinear.forward_fused composes the steps otherwise). prologue: RMSNorm with
    `norm_weight` [K] and `eps` (x the residual stream [1, K]), or silu(gate) * up (x = gate|up [1, 2K])."""
    return torch.ops.llmpress.int4_gemv_rows_fused(x.contiguous(), qweight, scales, zeros, group_size, norm_weight, eps,
                                                   silu_mul, None if residual is None else residual.contiguous())


@torch.library.custom_op("llmpress::int4_gemv_rows_fused", mutates_args=())
def _int4_gemv_rows_fused(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int, norm_weight: torch.Tensor | None, eps: float, silu_mul: bool,
                          residual: torch.Tensor | None) -> torch.Tensor:
    from llmpress.kernels.triton_int4_rows_split import split_gemv_rows
    prologue = "rmsnorm" if norm_weight is not None else "silu_mul" if silu_mul else None
    return split_gemv_rows(x, qweight, scales, zeros, group_size, reduce="in_kernel", prologue=prologue,
                           norm_weight=norm_weight, eps=eps, residual=residual)


@_int4_gemv_rows_fused.register_fake
def _(x, qweight, scales, zeros, group_size, norm_weight, eps, silu_mul, residual):
    return x.new_empty(1, qweight.shape[0])


# int4 layers that hold tensor-core fragments (quant.linear.use_fragment_layouts) run their products for 1..8 rows
# of x on kernels/triton_int4_frag.py, at batch 1 with the RMSNorm before q|k|v and gate|up and the residual add
# after o and down folded in. Off in the library; the CLI's `--int4-tensor-cores auto` (commands/generate.py) turns
# it on where every product has at most 8 rows, since from 9 rows on the row layout is faster (FRAG_ONE_CALL_MAX_N
# below). Measured (H200): the kernel alone 1.05-1.12 ms over a 3B token's linears against the split GEMV's 1.40, and
# 1.57 ms against 2.16 for the row layout's mma path at 6 rows, a verify step at k = 5 (benchmarks/int4_frag_gpu.py,
# int4_frag_h200_{rows,tiles}.*); 3B int4 decode 576.1 -> 668.8 tok/s, 604.7 -> 724.6 with an int4 head
# (benchmarks/int4_gpu.py variants int4-tc*, int4_h200_tc_default.*).
int4_tensor_core_gemv = False
# With it, q|k|v and gate|up at batch 1 too, their RMSNorm folded into the tensor-core GEMV (correct on the H200:
# tests/kernels/test_int4_rows.py -k fragment). On by default once 4 row tiles per warp made that GEMV the faster
# one there: 3B int4 decode 559.7 -> 661.2 tok/s with it, 600.0 -> 714.7 with an int4 head (int4_h200_tiles.*).
int4_tensor_core_norm = True
# And at 2..8 rows (a verify step) too, the RMSNorm and the residual add folded in as at batch 1 (per-row sum(h^2):
# correct on the H200, tests/kernels/test_int4_rows.py -k each_row, pytest_gpu_frag_prepared_h200.log). Off: slower.
# Speculative int4 + int4 draft (benchmarks/speculative_gpu.py --int4-tensor-cores --int4-swiglu [--int4-fold-rows],
# results/speculative_h200_int4_swiglu{,_fold}.*): verify 2.64 ms a step apart, 2.87 folded (the GEMV at 6 rows with
# the norm: q|k|v 13.0 us against 12.1, gate|up 23.9 against 20.8, int4_frag_h200_verify_tiles.*).
int4_tensor_core_fold_rows = False
# And silu(gate) * up in the fused gate|up GEMV's last step (the first half of each program's warps on gate rows,
# the second on the same up rows), so that the separate SwiGLU kernel and gate|up's round trip through memory go.
# Correct on the H200 (-k swiglu, pytest_gpu_frag_swiglu_h200.log); 3B int4 decode with an int4 head, twice each in
# one run (benchmarks/int4_gpu.py variants int4-tc-only+head, int4-tc-only-swiglu+head, int4_h200_swiglu.*): 721.0 /
# 719.9 tok/s apart, 725.7 / 725.3 in the GEMV (+0.7%: a CUDA-graph launch of a small elementwise kernel is cheap).
int4_tensor_core_swiglu = True
FRAG_MAX_M = 8  # kernels/triton_int4_frag.py: the rows of x are the columns of the mma's B operand
# The most rows of x that go to it (the 2..8-row path passed its CUDA tests on the H200: pytest_gpu_frag_rows_h200.log).
int4_tensor_core_max_rows = FRAG_MAX_M


# With it (the default), `use_fragment_layouts` drops the row layout's copy, so the fragments are the layers' only
# weights: more than 8 rows then go through the same GEMV (9..16, small engine batches) or through one
# dequantizing pass to bf16 and cuBLAS (prefill), `int4_matmul_fragments`. Measured (H200, benchmarks/int4_gpu.py
# variants int4-tc, int4-tc-only, int4_h200_frag_only.*): 3B decode 669.0 tok/s with 2.36 GB allocated, against
# 669.5 with the second copy (3.79 GB) and 610.0 on the row layout alone (2.32 GB).
int4_fragments_only = True


def int4_fragment_gemv_applies(x: torch.Tensor, fragments_only: bool = False) -> bool:
    """Whether `int4_gemv_fragments` runs for x [M, K]: 1..int4_tensor_core_max_rows rows of fp16/bf16 x on CUDA,
    switched on (`int4_tensor_core_gemv`) or on a layer that holds nothing else (`fragments_only`)."""
    return ((int4_tensor_core_gemv or fragments_only) and _backend in ("auto", "triton") and x.is_cuda and HAS_TRITON
            and 1 <= x.shape[0] <= min(int4_tensor_core_max_rows, FRAG_MAX_M)
            and x.dtype in (torch.float16, torch.bfloat16))


def int4_matmul_fragments(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int) -> torch.Tensor:
    """x [M, K] @ Wᵀ -> [M, N] in x.dtype, any M, for a weight held only as tensor-core fragments (scales, zeros
    [G, N]): on CUDA the fragment GEMV up to 16 rows (FRAG_ONE_CALL_MAX_N below), above that the dense weight from
    `dequantize_fragments_triton` and cuBLAS; elsewhere the reference (fragments back to rows, then dequantize)."""
    use_triton = _triton_requested(x)
    if use_triton and x.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.llmpress.int4_matmul_fragments(x.contiguous(), fragments, scales, zeros, group_size)
    if _backend == "triton":
        raise ValueError("the triton backend covers fp16/bf16 activations on CUDA only")
    return int4_matmul_fragments_reference(x, fragments, scales, zeros, group_size)


# 9..16 rows: one call of the two-column-block kernel where N < 16384, else two 8-row calls. Measured on the H200
# (benchmarks/int4_frag_gpu.py --rows 1,6,12,16,512, results/int4_frag_h200_m16.*) at 12 rows: one call 18.4 / 15.4 /
# 35.3 / 22.2 us for q|k|v / o / gate|up / down against 22.2 / 19.8 / 39.1 / 26.7 in two; the 128k-row head 243.8
# against 218.0. (The row layout's tensor-core path is faster still there: 14.0 / 11.1 / 29.1 / 17.7 / 168.7; so is
# it at 512 rows, 7.11 ms a token's linears against 7.72 for dequantize + cuBLAS: why `auto` keeps them to <= 8 rows.)
FRAG_CHUNKED_MAX_M = 2 * FRAG_MAX_M
FRAG_ONE_CALL_MAX_N = 16384


@torch.library.custom_op("llmpress::int4_matmul_fragments", mutates_args=())
def _int4_matmul_fragments(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton, frag_gemv
    M, N = x.shape[0], scales.shape[1]
    if M <= FRAG_MAX_M or (M <= FRAG_CHUNKED_MAX_M and N < FRAG_ONE_CALL_MAX_N):  # one call (never a torch.cat of
        return frag_gemv(x, fragments, scales, zeros, group_size)                # one chunk: that still copies it)
    if M <= FRAG_CHUNKED_MAX_M:
        return torch.cat([frag_gemv(x[i:i + FRAG_MAX_M], fragments, scales, zeros, group_size)
                          for i in range(0, x.shape[0], FRAG_MAX_M)])
    return x @ dequantize_fragments_triton(fragments, scales, zeros, group_size, x.dtype).T


@_int4_matmul_fragments.register_fake
def _(x, fragments, scales, zeros, group_size):
    return x.new_empty(x.shape[0], scales.shape[1])


def int4_gemv_fragments(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                        eps: float = 0.0, swiglu: bool = False) -> torch.Tensor:
    """y [M, N] = (residual +) prologue(x) W^T, x [M <= 8, K], for a 4-bit weight held as tensor-core fragments
    (quant/format.py `rows_to_fragments`) with scales and zeros [G, N] (`fragment_scales_zeros`); prologue: the
    RMSNorm with `norm_weight` [K] and `eps` (x the residual stream), or none. `swiglu` (W a
    fused gate|up [2I, K], no residual): y [M, I] = silu(gate) * up, in the same kernel."""
    return torch.ops.llmpress.int4_gemv_fragments(x.contiguous(), fragments, scales, zeros, group_size,
                                                  None if residual is None else residual.contiguous(), norm_weight, eps,
                                                  swiglu)


@torch.library.custom_op("llmpress::int4_gemv_fragments", mutates_args=())
def _int4_gemv_fragments(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                         group_size: int, residual: torch.Tensor | None, norm_weight: torch.Tensor | None,
                         eps: float, swiglu: bool) -> torch.Tensor:
    from llmpress.kernels.triton_int4_frag import frag_gemv
    return frag_gemv(x, fragments, scales, zeros, group_size, residual=residual, norm_weight=norm_weight, eps=eps,
                     swiglu=swiglu)


@_int4_gemv_fragments.register_fake
def _(x, fragments, scales, zeros, group_size, residual, norm_weight, eps, swiglu):
    return x.new_empty(x.shape[0], scales.shape[1] // 2 if swiglu else scales.shape[1])


# A decoder layer's products after attention at batch 1 (o, gate|up with its norm and SwiGLU ending, down, then the
# next layer's q|k|v or the head) in one persistent kernel, kernels/triton_int4_chain.py, for layers held as
# tensor-core fragments (model/decode_chain.py decides where it applies; `layer_chain` below). Off: correct (the same
# bits as the GEMVs, tests/kernels/test_int4_chain.py on the H200) but slower: 49.2 us a 3B layer against 34.3
# (benchmarks/int4_chain_gpu.py); 3B int4 decode 571.7 tok/s against 783.3 in one run with its first build
# (benchmarks/int4_gpu.py variants int4-tc-only-pdl+head, int4-tc-only-chain+head).
int4_layer_chain = False


class ChainProduct(NamedTuple):
    """One product of a layer chain: a 4-bit weight as tensor-core fragments with its scales and zeros [G, N]
    (quant/format.py), and the RMSNorm folded in before it (weight [K] and eps; None: no norm). A named tuple,
    which torch.compile traces through (the plan is built inside the compiled decode step)."""
    fragments: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    norm_weight: torch.Tensor | None = None
    eps: float = 0.0

    def tensors(self) -> list[torch.Tensor | None]:
        return [self.fragments, self.scales, self.zeros, self.norm_weight]


def layer_chain_applies(x: torch.Tensor) -> bool:
    """Whether `layer_chain` runs the persistent kernel for attention's output x [1, K]."""
    return (int4_layer_chain and _backend in ("auto", "triton") and x.is_cuda and HAS_TRITON and x.shape[0] == 1
            and x.dtype in (torch.float16, torch.bfloat16))


def layer_chain(x: torch.Tensor, residual: torch.Tensor, o: ChainProduct, gate_up: ChainProduct,
                down: ChainProduct, next_product: ChainProduct | None, group_size: int,
                layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From attention's output x [1, K] and the residual stream h [1, H]: h1 = h + o(x),
    h2 = h1 + down(silu(gate) * up) with gate|up = gate_up(norm(h1)), and next = next_product(its norm(h2)).
    Returns (h2, next or None). One kernel on CUDA (`layer_chain_applies`, `layer` picks its flags), else
    `layer_chain_reference`: the same steps one after another."""
    if not layer_chain_applies(x):
        return layer_chain_reference(x, residual, o, gate_up, down, next_product, group_size)
    nxt = [None] * 4 if next_product is None else next_product.tensors()
    h2, out = torch.ops.llmpress.int4_layer_chain(x.contiguous(), residual.contiguous(), *o.tensors()[:3],
                                                  *gate_up.tensors(), *down.tensors()[:3], *nxt, gate_up.eps,
                                                  0.0 if next_product is None else next_product.eps, group_size, layer)
    return h2, (out if next_product is not None else None)


def layer_chain_reference(x, residual, o, gate_up, down, next_product, group_size):
    """`layer_chain` as the model's steps: products through `int4_matmul_fragments`, the norms as RMSNorm."""
    def product(p: ChainProduct, inputs: torch.Tensor) -> torch.Tensor:
        if p.norm_weight is not None:
            inputs = rms_norm_reference(inputs, p.norm_weight, p.eps)
        return int4_matmul_fragments(inputs, p.fragments, p.scales, p.zeros, group_size)
    h1 = residual + product(o, x)
    gate, up = product(gate_up, h1).chunk(2, dim=-1)
    h2 = h1 + product(down, F.silu(gate) * up)
    return h2, (product(next_product, h2) if next_product is not None else None)


@torch.library.custom_op("llmpress::int4_layer_chain", mutates_args=())
def _int4_layer_chain(x: torch.Tensor, residual: torch.Tensor, o_fragments: torch.Tensor, o_scales: torch.Tensor,
                      o_zeros: torch.Tensor, gu_fragments: torch.Tensor, gu_scales: torch.Tensor,
                      gu_zeros: torch.Tensor, gu_norm: torch.Tensor, down_fragments: torch.Tensor,
                      down_scales: torch.Tensor, down_zeros: torch.Tensor, next_fragments: torch.Tensor | None,
                      next_scales: torch.Tensor | None, next_zeros: torch.Tensor | None, next_norm: torch.Tensor | None,
                      gu_eps: float, next_eps: float, group_size: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    from llmpress.kernels.triton_int4_chain import frag_chain
    nxt = None if next_fragments is None else ChainProduct(next_fragments, next_scales, next_zeros, next_norm, next_eps)
    h2, out = frag_chain(x, residual, ChainProduct(o_fragments, o_scales, o_zeros),
                         ChainProduct(gu_fragments, gu_scales, gu_zeros, gu_norm, gu_eps),
                         ChainProduct(down_fragments, down_scales, down_zeros), nxt, group_size, layer)
    return h2, (x.new_empty(0) if out is None else out)  # a custom op's outputs may not alias each other


@_int4_layer_chain.register_fake
def _(x, residual, o_fragments, o_scales, o_zeros, gu_fragments, gu_scales, gu_zeros, gu_norm, down_fragments,
      down_scales, down_zeros, next_fragments, next_scales, next_zeros, next_norm, gu_eps, next_eps, group_size, layer):
    return residual.new_empty(residual.shape), x.new_empty(0 if next_scales is None else (1, next_scales.shape[1]))


# Batch-1 decode with an fp32 residual stream and products whose split-K partials are added by atomics
# (kernels/triton_int4_accumulate.py, model/decode_accumulate.py), for layers held as tensor-core fragments. On by
# default: 3B int4 decode with an int4 head on the H200, each twice in one run (benchmarks/int4_gpu.py variants
# int4-tc-only-pdl+head, int4-tc-only-acc+head, results/int4_h200_acc.*): 785.5 / 784.6 tok/s with the GEMVs'
# last-arrival reduction, 941.4 / 940.2 accumulating (+20%); decode-step logits 4.18e-2 from the reference ops
# against 4.56e-2 (the residual stream no longer rounds to bf16 between products).
int4_accumulate_decode = True
# ... and to steps of 2..8 new tokens of one sequence (a speculative verify step; model/decode_accumulate.py). On: a
# 3B int4 verify step of 6 tokens on the H200 in one run (benchmarks/verify_probe_gpu.py --mode compile,
# results/verify_probe_h200_s13b.*): 2.60 ms as the layers are written, 1.94 accumulating with SDPA, 1.56 with the
# Triton attention below; the int4 + int4-draft speculative decode at alpha 0.8, k 5: 636.2 -> 795.8 tok/s
# (results/speculative_h200_s13b.*). Like the one-token decode its sums land in atomics' order: its logits vary
# from run to run within rounding (2% of the largest logit for random 3B weights, verify_probe_h200_s13f.*).
int4_accumulate_rows = True
# Its attention through the Triton decode kernel over the T queries, reading the q|k|v accumulator itself (each
# token's norm applied as it loads), instead of q|k|v finished by a kernel of its own and SDPA: 1.56 against 1.94 ms
# (the run above).
int4_accumulate_rows_into_attention = True


def int4_accumulate_applies(h: torch.Tensor) -> bool:
    """Whether the accumulating kernels run for the residual stream h [M, H], M <= 8 (else their references do)."""
    return (int4_accumulate_decode and _backend in ("auto", "triton") and h.is_cuda and HAS_TRITON
            and 1 <= h.shape[0] <= 8 and h.dtype == torch.float32)


def int4_accumulate(h: torch.Tensor, x: torch.Tensor, product: ChainProduct, group_size: int) -> torch.Tensor:
    """h [M, N] fp32 += x [M, K] @ Wᵀ in place (the residual add of o and down), and returns h."""
    if int4_accumulate_applies(h):
        torch.ops.llmpress.int4_accumulate(h, x.contiguous(), *product.tensors()[:3], group_size)
        return h
    return h.add_(int4_matmul_fragments(x, *product.tensors()[:3], group_size).float())


def int4_accumulated_norm(h: torch.Tensor, product: ChainProduct, group_size: int, dtype: torch.dtype,
                          swiglu: bool = False, zero_qkv: int = 0) -> torch.Tensor:
    """W rmsnorm(h) in `dtype` for the fp32 residual stream h [M, K] (`product` holds the norm), or
    silu(gate) * up [M, I] for a fused gate|up W (`swiglu`). `zero_qkv`: the width of the q|k|v accumulator that
    `int4_accumulated_attention` left for this kernel to zero (0: none)."""
    if int4_accumulate_applies(h):
        return torch.ops.llmpress.int4_accumulated_norm(h.contiguous(), *product.tensors(), product.eps, group_size,
                                                        swiglu, dtype, zero_qkv)
    normed = rms_norm_reference(h.to(dtype), product.norm_weight, product.eps)
    y = int4_matmul_fragments(normed, *product.tensors()[:3], group_size)
    if swiglu:
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up
    return y


@torch.library.custom_op("llmpress::int4_accumulate", mutates_args=("h",))
def _int4_accumulate(h: torch.Tensor, x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, group_size: int) -> None:
    from llmpress.kernels.triton_int4_accumulate import frag_accumulate
    frag_accumulate(x, fragments, scales, zeros, group_size, h)


@_int4_accumulate.register_fake
def _(h, x, fragments, scales, zeros, group_size):
    return None


@torch.library.custom_op("llmpress::int4_accumulated_norm", mutates_args=())
def _int4_accumulated_norm(h: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           norm_weight: torch.Tensor, eps: float, group_size: int, swiglu: bool,
                           dtype: torch.dtype, zero_qkv: int) -> torch.Tensor:
    from llmpress.kernels.triton_int4_accumulate import frag_accumulated_norm, qkv_accumulator
    zero_after = qkv_accumulator(h.device, zero_qkv) if zero_qkv else None
    return frag_accumulated_norm(h, fragments, scales, zeros, group_size, norm_weight, eps, swiglu, dtype, zero_after)


@_int4_accumulated_norm.register_fake
def _(h, fragments, scales, zeros, norm_weight, eps, group_size, swiglu, dtype, zero_qkv):
    width = scales.shape[1] // 2 if swiglu else scales.shape[1]
    return h.new_empty(h.shape[0], width, dtype=dtype)


# silu(gate) * up made by the down product's tiles from the gate|up accumulator (kernels/frag_swiglu_x.py), not by
# a finishing kernel between them: one kernel a layer fewer in the one-token accumulating decode. On: 3B int4 decode
# with an int4 head on the H200, one run (benchmarks/int4_gpu.py variants int4-tc-only-acc-s11+head,
# int4-tc-only-acc-sd+head, each twice, results/int4_h200_s16.*): 981.4 / 981.0 tok/s with the finishing kernel,
# 1041.9 / 1040.2 without (+6.1%); decode-step logits 4.0e-2 from the reference in both.
int4_swiglu_in_down = True


def int4_accumulated_mlp(h: torch.Tensor, gate_up: ChainProduct, down: ChainProduct, group_size: int,
                         dtype: torch.dtype, layers: int, layer: int, zero_qkv: int = 0) -> torch.Tensor:
    """h [M, H] fp32 += down(silu(gate) * up) of rmsnorm(h) in place (gate_up holds the norm), and returns h, for
    layer `layer` of `layers`: `int4_accumulated_norm` then `int4_accumulate`, or on CUDA at one row
    (`int4_swiglu_in_down`, bf16, two layers or more) in two kernels, down making its own input.
    `zero_qkv` as in `int4_accumulated_norm`."""
    if (int4_swiglu_in_down and int4_accumulate_applies(h) and h.shape[0] == 1 and layers >= 2
            and dtype == torch.bfloat16 and gate_up.scales.dtype == down.scales.dtype == torch.bfloat16):
        torch.ops.llmpress.int4_accumulated_mlp(h, *gate_up.tensors(), gate_up.eps, *down.tensors()[:3], group_size,
                                                layers, layer, zero_qkv)
        return h
    act = int4_accumulated_norm(h, gate_up, group_size, dtype, swiglu=True, zero_qkv=zero_qkv)
    return int4_accumulate(h, act, down, group_size)


@torch.library.custom_op("llmpress::int4_accumulated_mlp", mutates_args=("h",))
def _int4_accumulated_mlp(h: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          norm_weight: torch.Tensor, eps: float, down_fragments: torch.Tensor,
                          down_scales: torch.Tensor, down_zeros: torch.Tensor, group_size: int, layers: int,
                          layer: int, zero_qkv: int) -> None:
    from llmpress.kernels.triton_int4_accumulate import frag_accumulated_mlp, qkv_accumulator
    frag_accumulated_mlp(h, (fragments, scales, zeros), (down_fragments, down_scales, down_zeros), group_size,
                         norm_weight, eps, layers, layer, qkv_accumulator(h.device, zero_qkv) if zero_qkv else None)


@_int4_accumulated_mlp.register_fake
def _(h, fragments, scales, zeros, norm_weight, eps, down_fragments, down_scales, down_zeros, group_size, layers,
      layer, zero_qkv):
    return None


# q|k|v accumulated straight into what attention reads, its norm's rsqrt applied there (one kernel fewer a layer):
# 3B int4 decode on the H200 952.4 / 953.7 tok/s against 935.7 with q|k|v finished by a kernel of its own
# (benchmarks/int4_gpu.py variants int4-tc-only-acc+head, int4-tc-only-acc-apart+head, results/int4_h200_acc_attention.*)
int4_accumulate_into_attention = True


def accumulate_into_attention_applies(h: torch.Tensor, cos: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `int4_accumulated_attention` has the attention kernel read the q|k|v accumulator (see there)."""
    return (int4_accumulate_into_attention and int4_accumulate_applies(h)
            and (h.shape[0] == 1 or triton_verify_attention or int4_accumulate_rows_into_attention)
            and fuse_rope_into_attention != "never"
            and cos.dim() == 2 and k_cache.shape[-1] in (64, 128) and k_cache.dtype in (torch.float16, torch.bfloat16))


def int4_accumulated_attention(h: torch.Tensor, product: ChainProduct, group_size: int, dtype: torch.dtype,
                               num_heads: int, cos: torch.Tensor, sin: torch.Tensor, inv_freq: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Attention of T new tokens whose q|k|v is `product` (with its norm) of the fp32 residual stream h [T, K]
    (T > 1: a verify step): `cached_attention_rope` of `int4_accumulated_norm`'s output. Returns [1, H, T, D]. On
    CUDA with `int4_accumulate_into_attention` (and for T > 1 `int4_accumulate_rows_into_attention` or
    `triton_verify_attention`) the attention kernel
    reads the q|k|v accumulator itself; the caller's next `int4_accumulated_norm` must then be given zero_qkv =
    T x the q|k|v width."""
    if accumulate_into_attention_applies(h, cos, k_cache):
        return torch.ops.llmpress.int4_accumulated_attention(h.contiguous(), *product.tensors(), product.eps,
                                                             group_size, num_heads, inv_freq, k_cache, v_cache,
                                                             positions)
    qkv = int4_accumulated_norm(h, product, group_size, dtype)
    return cached_attention_rope(qkv.view(1, h.shape[0], -1), num_heads, cos, sin, inv_freq, k_cache, v_cache,
                                 positions)


@torch.library.custom_op("llmpress::int4_accumulated_attention", mutates_args=("k_cache", "v_cache"))
def _int4_accumulated_attention(h: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                norm_weight: torch.Tensor, eps: float, group_size: int, num_heads: int,
                                inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                positions: torch.Tensor) -> torch.Tensor:
    from llmpress.kernels.triton_int4_accumulate import frag_accumulated_attention
    return frag_accumulated_attention(h, fragments, scales, zeros, group_size, norm_weight, eps, num_heads, inv_freq,
                                      k_cache, v_cache, positions)


@_int4_accumulated_attention.register_fake
def _(h, fragments, scales, zeros, norm_weight, eps, group_size, num_heads, inv_freq, k_cache, v_cache, positions):
    return k_cache.new_empty(1, num_heads, h.shape[0], k_cache.shape[-1])


# An int4 head in the accumulating decode accumulated as well (`int4_accumulated_norm`, the final norm folded), not
# the head's GEMV after a norm kernel. And the attention's split results combined inside the o product
# (triton_int4_accumulate.frag_accumulate_splits), not by a combine kernel of their own, where a head is a
# quantization group and the cache takes at most 8 splits. 3B int4 decode on the H200, each variant twice in one run
# (benchmarks/int4_gpu.py, results/int4_h200_s11_ab.*): fp32 x's loads first 983.3 / 994.7 tok/s, + the combine in
# o 993.1 / 991.9, + the head 1000.1 / 999.9 (session 10's decode in that run: 989.3 / 980.2).
int4_accumulate_head = True
int4_combine_in_o = True


def int4_accumulated_attention_o(h: torch.Tensor, qkv: ChainProduct, o: ChainProduct, group_size: int,
                                 dtype: torch.dtype, num_heads: int, cos: torch.Tensor, sin: torch.Tensor,
                                 inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 positions: torch.Tensor) -> torch.Tensor:
    """h [1, K] fp32 += o(attention of one new token whose q|k|v is `qkv` (with its norm) of h), in place, and
    returns h: `int4_accumulated_attention` then `int4_accumulate`, or on CUDA (`int4_combine_in_o`, where
    `splits_combine_fits`) with the attention's splits combined inside the o product. Like
    `int4_accumulated_attention`, it leaves the q|k|v accumulator for the next `int4_accumulated_norm` to zero."""
    if int4_combine_in_o and accumulate_into_attention_applies(h, cos, k_cache):
        from llmpress.kernels.triton_int4_accumulate import splits_combine_fits
        if splits_combine_fits(k_cache, o.scales, group_size):
            torch.ops.llmpress.int4_accumulated_attention_o(h, *qkv.tensors(), qkv.eps, group_size, num_heads,
                                                            inv_freq, k_cache, v_cache, positions,
                                                            *o.tensors()[:3])
            return h
    out = int4_accumulated_attention(h, qkv, group_size, dtype, num_heads, cos, sin, inv_freq, k_cache, v_cache,
                                     positions)
    return int4_accumulate(h, out.reshape(1, -1), o, group_size)


@torch.library.custom_op("llmpress::int4_accumulated_attention_o", mutates_args=("h", "k_cache", "v_cache"))
def _int4_accumulated_attention_o(h: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                                  norm_weight: torch.Tensor, eps: float, group_size: int, num_heads: int,
                                  inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  positions: torch.Tensor, o_fragments: torch.Tensor, o_scales: torch.Tensor,
                                  o_zeros: torch.Tensor) -> None:
    from llmpress.kernels.triton_int4_accumulate import frag_accumulated_attention_o
    frag_accumulated_attention_o(h, (fragments, scales, zeros), norm_weight, eps, num_heads, inv_freq, k_cache,
                                 v_cache, positions, (o_fragments, o_scales, o_zeros), group_size)


@_int4_accumulated_attention_o.register_fake
def _(h, fragments, scales, zeros, norm_weight, eps, group_size, num_heads, inv_freq, k_cache, v_cache, positions,
      o_fragments, o_scales, o_zeros):
    return None


def store_kv_paged(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, slot_mapping: torch.Tensor) -> None:
    """Write new tokens' K/V into the paged cache, in place (quantizing for int8/fp8 caches).
    k, v: [N, Hkv, D]; caches: [num_blocks, block_size, Hkv, D]; scales: float16 [num_blocks, block_size, Hkv]
    or None; slot_mapping: int64 [N] (slot = block * block_size + offset). Every backend runs the torch
    code: a few elementwise kernels and an indexed copy per tensor (no host syncs, CUDA-graph capturable)."""
    store_kv_paged_reference(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                    block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                    max_query_len: int, max_seq_len: int) -> torch.Tensor:
    """Causal attention of a step's queries (decode, prefill, chunked prefill mixed) over a paged KV cache.

    q: [N, H, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] holding this step's tokens already
    (model dtype, int8 or float8_e4m3fn with float16 scales [num_blocks, block_size, Hkv], else None);
    block_tables: int32 [S, max_blocks]; seq_lens: int32 [S] (cached tokens including this step's);
    query_start_loc: int32 [S+1]; max_query_len, max_seq_len: Python ints bounding this step's values.
    Returns [N, H, D] in q's dtype. Triton on CUDA (fp16/bf16 q, head_dim 64/128); elsewhere (the CPU
    included) `paged_sdpa`: the keys of every sequence gathered into one padded batch and one SDPA call.
    Backend "torch" runs the reference (a Python loop over sequences with host syncs); "triton" raises on
    inputs the kernel cannot take.
    """
    use_triton = _backend == "triton" or (_backend == "auto" and q.is_cuda and HAS_TRITON
                                          and q.shape[-1] in (64, 128) and q.dtype in (torch.float16, torch.bfloat16))
    if use_triton:
        if not (HAS_TRITON and q.is_cuda):
            raise ValueError("the triton backend's paged attention needs Triton and q on a CUDA GPU")
        return torch.ops.llmpress.paged_attention(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
                                                  query_start_loc, max_query_len, max_seq_len)
    if _backend == "torch":
        return paged_attention_reference(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
                                         query_start_loc, max_query_len, max_seq_len)
    from llmpress.kernels.paged_sdpa import paged_attention_sdpa
    return paged_attention_sdpa(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
                                query_start_loc, max_query_len, max_seq_len)


@torch.library.custom_op("llmpress::paged_attention", mutates_args=())
def _paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                     block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                     max_query_len: int, max_seq_len: int) -> torch.Tensor:
    from llmpress.kernels.triton_paged_attention import paged_attention_triton
    return paged_attention_triton(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens,
                                  query_start_loc, max_query_len, max_seq_len)


@_paged_attention.register_fake
def _(q, k_cache, v_cache, k_scale, v_scale, block_tables, seq_lens, query_start_loc, max_query_len, max_seq_len):
    return torch.empty_like(q)

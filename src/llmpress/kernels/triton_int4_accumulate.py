"""Batch-1 int4 decode whose products add their split-K partial sums with atomics instead of a last-arrival
reduction (the accumulating decode, model/decode_accumulate.py).

Why: the tensor-core GEMV (triton_int4_frag.py) splits K over programs, and the last program of each row tile
adds the others' partials (a release atomic whose answer it waits for, then the partials back from L2, then the
store). Timed on the H200 per 3B product, 112 calls in a row from one CUDA graph (benchmarks/latency_floor_gpu.py
--reductions, results/latency_floor_reductions_h200.*): with that reduction q|k|v, o, gate|up, down take 5.93, 4.70,
14.22, 9.27 us (34.1 us a layer); with every program adding its sums by `red.global.add.f32` and ending at once
3.62, 2.54, 9.62, 6.34 (22.1 us), and a one-program kernel 0.91 us against 2.26. So here:
  - o and down add straight into the residual stream h, kept in fp32 (`frag_accumulate`): no residual step;
  - q|k|v and gate|up (RMSNorm folded, x = h in fp32, rounded to bf16 pairs as it is loaded) add into zeroed
    fp32 workspaces. Attention reads the q|k|v one itself (`frag_accumulated_attention`), applying the norm's
    rsqrt, computed from the programs' shares of sum(h^2), as it loads; a small kernel finishes gate|up
    (`frag_accumulated_norm`: the rsqrt, then silu(gate) * up) and zeroes both workspaces for the next layer.
The sums' order depends on which program's atomic lands first, so the low bits of h vary from run to run, where
the last-arrival reduction gives the same bits every time; both are within bf16 rounding of float64.
Off the GPU, ops.int4_accumulate, int4_accumulated_norm and int4_accumulated_attention run the same steps in
PyTorch (products through the reference dequantize-then-matmul).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpress.kernels.pdl import launch_mode, pdl_start, pdl_wait
from llmpress.kernels import triton_int4_frag
import math

from llmpress.kernels.triton_int4_frag import (FRAG_MAX_M, _finish_swiglu, default_config, frag_gemv_asm, run_tile_asm,
                                            run_tile_asm_three)


X_F32_MAX_REGISTERS: int | None = 128  # None: no cap (latency_floor_gpu.py --sweep-configs --no-register-cap)
# (N, G) -> the cap for that product's fp32-x tile instead (None: no cap), where CONFIGS gives it a wider tile
REGISTER_CAPS: dict[tuple[int, int], int | None] = {}
# (N, G) -> (num_warps, groups per warp, row tiles per warp) where a product does not take the GEMV's default_config.
# Without the last-arrival reduction other tiles win for the 3B's 3072-row products: every tile of every product
# timed on the H200 (benchmarks/latency_floor_gpu.py --sweep-configs, results/latency_floor_sweep_h200.*): o 2.40 us
# on (4, 1, 2) against 2.50 on the default (4, 2, 1), down 5.40 on (4, 2, 2) against 6.27; q|k|v and gate|up keep
# (4, 1, 4). 3B decode with these against the defaults, one run (int4_gpu.py --variants bf16,int4-tc-only-acc+head,
# int4-tc-only-acc-tuned+head --accumulate-configs, results/int4_h200_acc_tuned.*): 985.5 against 967.3 tok/s.
# The 1B's four products, swept the same way (latency_floor_gpu.py --arch llama-3.2-1b --sweep-configs,
# results/latency_floor_sweep_1b_h200.*): 1B decode 2103.1 / 2105.2 against 1983.2 / 1975.8 tok/s on the defaults
# (int4_gpu.py ... int4-tc-only-acc-s11-tuned+head, results/int4_h200_s14.*; the 3B's products have other (N, G)).
CONFIGS: dict[tuple[int, int], tuple[int, int, int]] = {
    (3072, 24): (4, 1, 2), (3072, 64): (4, 2, 2),  # Llama-3.2-3B: o, down
    # Llama-3.2-1B: q|k|v, o, gate|up, down
    (3072, 16): (8, 1, 2), (2048, 16): (4, 1, 1), (16384, 16): (4, 1, 4), (2048, 64): (4, 2, 2)}


def tile_config(N: int, G: int, M: int = 1, must_fit: bool = True) -> tuple[int, int, int] | None:
    """The accumulating product's tile for N outputs, G groups and M rows: CONFIGS' at one row, else the GEMV's
    default; None where none fits (`must_fit`: an assertion instead)."""
    config = (CONFIGS.get((N, G)) if M == 1 else None) or default_config(N, G, M)
    assert config is not None or not must_fit, f"no fragment-GEMV tile fits N={N}, G={G}"
    return config


@triton.jit
def _frag_accumulate(qw_ptr, x_ptr, s_ptr, z_ptr, acc_ptr, nw_ptr, squares_ptr, N, G, ASM: tl.constexpr,
                     NUM_WARPS: tl.constexpr, EXTRA: tl.constexpr, ROWS: tl.constexpr = 1):
    """acc [ROWS, N] fp32 += this program's (row tiles, groups) share of W x; with the norm, squares[pid_k, row] =
    its sum(h^2) share of each row (every row-tile program of a group program writes the same values); with split
    results as x, nw_ptr is their log-sum-exps (EXTRA: either)."""
    run_tile_asm(ASM, qw_ptr, x_ptr, s_ptr, z_ptr, acc_ptr, nw_ptr, squares_ptr + tl.program_id(1) * ROWS, N, G,
                 NUM_WARPS, EXTRA)


def frag_accumulate(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, out: torch.Tensor, norm_weight: torch.Tensor | None = None,
                    squares: torch.Tensor | None = None) -> int:
    """out [M, N] fp32 += x [M, K] @ Wᵀ (M <= 8 rows: batch-1 decode, or a speculative verify step's tokens), for
    W as tensor-core fragments with scales, zeros [G, N] (triton_int4_frag.frag_gemv's layout); x in the weights'
    dtype or fp32. With `norm_weight` [K]: x is the residual stream h and out += W (w * h), not yet scaled by the
    norm's rsqrt; each group program's share of each row's sum(h^2) goes to `squares` [>= SPLIT * M] fp32 (share s
    of row m at s * M + m). Returns SPLIT, the number of shares."""
    G, N = scales.shape
    M = x.shape[0]
    assert 1 <= M <= FRAG_MAX_M and x.shape == (M, G * group_size) and x.is_contiguous(), x.shape
    assert x.dtype in (scales.dtype, torch.float32), x.dtype
    assert out.shape == (M, N) and out.dtype == torch.float32 and out.is_contiguous(), (out.shape, out.dtype)
    norm = norm_weight is not None
    warps, groups_per_warp, tiles = tile_config(N, G, M)
    split = G // groups_per_warp
    assert not norm or (squares is not None and squares.numel() >= split * M and squares.dtype == torch.float32)
    pdl = launch_mode(x.device) if M <= triton_int4_frag.PDL_MAX_ROWS else 0  # read here: benchmarks set it
    x_f32 = x.dtype == torch.float32
    asm = frag_gemv_asm(warps, groups_per_warp, group_size, scales.dtype, M, norm, tiles, False, pdl, atomic=True,
                        x_f32=x_f32)
    # fp32 x takes 8 more registers a thread on (4, 1, 4) (132 for sm_90 with the norm): capped at 128, without
    # spills, it keeps 4 programs of 4 warps per SM instead of 3. Not at several rows: there the cap spills (sm_90,
    # with the norm: 32 bytes of stack on (4, 2, 1) at 6 rows, 168 on (4, 2, 2))
    cap = REGISTER_CAPS.get((N, G), X_F32_MAX_REGISTERS)
    options = {"maxnreg": cap} if x_f32 and M == 1 and cap else {}
    _frag_accumulate[(N // (16 * warps * tiles), split)](
        fragments, x, scales, zeros, out, norm_weight if norm else x, squares if norm else out, N, G, ASM=asm,
        NUM_WARPS=warps, EXTRA=norm, ROWS=M, num_warps=warps, launch_pdl=bool(pdl), **options)
    return split


def frag_accumulate_splits(parts: torch.Tensor, lse: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor, group_size: int, out: torch.Tensor) -> None:
    """out [1, N] fp32 += W x for x the decode attention's output given as its unfinished splits: parts
    [1, H, S, D] fp32 (each split's softmax-normalised output) and lse [1, H, S] (its log-sum-exp), D = group_size,
    S <= 8 (triton_attention.py `decode_attention_rope_splits`). The combine (a kernel of its own there) happens in
    the product: frag_gemv_asm(x_splits=S)."""
    G, N = scales.shape
    _, H, S, D = parts.shape
    assert H == G and D == group_size and 1 <= S <= 8 and lse.shape == (1, H, S), (parts.shape, lse.shape, G)
    assert parts.dtype == lse.dtype == torch.float32 and parts.is_contiguous() and lse.is_contiguous()
    assert out.shape == (1, N) and out.dtype == torch.float32 and out.is_contiguous(), (out.shape, out.dtype)
    warps, groups_per_warp, tiles = tile_config(N, G)
    pdl = launch_mode(parts.device)
    asm = frag_gemv_asm(warps, groups_per_warp, group_size, scales.dtype, S, False, tiles, False, pdl, atomic=True,
                        x_f32=True, x_splits=S)
    _frag_accumulate[(N // (16 * warps * tiles), G // groups_per_warp)](
        fragments, parts, scales, zeros, out, lse, out, N, G, ASM=asm, NUM_WARPS=warps, EXTRA=True, num_warps=warps,
        launch_pdl=bool(pdl))


@triton.jit
def _frag_accumulate_swiglu(qw_ptr, gate_up_ptr, s_ptr, z_ptr, out_ptr, shares_ptr, zero0_ptr, zero1_ptr, N, G,
                            ASM: tl.constexpr, NUM_WARPS: tl.constexpr):
    """out [1, N] fp32 += this program's share of W x, x = silu(r gate) * (r up) made from the gate|up
    accumulator and its shares (frag_gemv_asm(swiglu_x=...)); then the grid's share of the zero stores."""
    run_tile_asm_three(ASM, qw_ptr, gate_up_ptr, s_ptr, z_ptr, out_ptr, shares_ptr, zero0_ptr, zero1_ptr, N, G,
                       NUM_WARPS)


def frag_accumulate_swiglu(gate_up: torch.Tensor, shares: torch.Tensor, split: int, norm_k: int, eps: float,
                           fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                           out: torch.Tensor, zero: tuple[torch.Tensor, ...] = ()) -> None:
    """out [1, N] fp32 += W (silu(r gate) * up r) for the gate|up accumulator gate_up [>= 2K] fp32 (gate|up's
    sums of W_gu (w h), not yet scaled by the norm: gate at [0, K), up at [K, 2K)), r = rsqrt(sum(shares[:split]) /
    norm_k + eps), W as fragments with bf16 scales [G, N], K = G * group_size: the down product of one token
    without gate|up's finishing kernel (kernels/frag_swiglu_x.py). Then zeroes each tensor of `zero` (up to two
    fp32 tensors, sizes multiples of 4), after its PDL wait like every store."""
    G, N = scales.shape
    K = G * group_size
    assert scales.dtype == torch.bfloat16, "the SwiGLU input made in the tile: bf16 weights"
    assert gate_up.dtype == torch.float32 and gate_up.is_contiguous() and gate_up.numel() >= 2 * K, gate_up.shape
    assert shares.dtype == torch.float32 and shares.numel() >= split, (shares.numel(), split)
    assert out.shape == (1, N) and out.dtype == torch.float32 and out.is_contiguous(), (out.shape, out.dtype)
    assert len(zero) <= 2 and all(t.dtype == torch.float32 and t.is_contiguous() for t in zero)
    warps, groups_per_warp, tiles = tile_config(N, G)
    grid = (N // (16 * warps * tiles), G // groups_per_warp)
    threads = grid[0] * grid[1] * 32 * warps
    spans = tuple((t.numel(), math.ceil(t.numel() / (4 * threads))) for t in zero)
    pdl = launch_mode(out.device)
    asm = frag_gemv_asm(warps, groups_per_warp, group_size, scales.dtype, 1, False, tiles, False, pdl, atomic=True,
                        swiglu_x=(split, norm_k, eps), zero_spans=spans)
    targets = list(zero) + [out] * (2 - len(zero))  # unused operands: any address
    _frag_accumulate_swiglu[grid](fragments, gate_up, scales, zeros, out, shares, *targets, N, G, ASM=asm,
                                  NUM_WARPS=warps, num_warps=warps, launch_pdl=bool(pdl))


@triton.jit
def _finish_accumulated(acc_ptr, squares_ptr, y_ptr, N, K, eps, SPLIT, other_ptr, other_n,
                        SPLIT_P2: tl.constexpr, BLOCK: tl.constexpr, SWIGLU: tl.constexpr, PDL: tl.constexpr,
                        ROWS: tl.constexpr = 1, LOADS_FIRST: tl.constexpr = False):
    """y = acc * rsqrt(mean(h^2) + eps) in y's dtype (SWIGLU: acc = gate | up, y = silu(gate) * up), and acc
    zeroed, one BLOCK of one row of y per program (row program_id(1) of ROWS); so is the accumulator at other_ptr
    [other_n] (the q|k|v one that attention read, model/decode_accumulate.py), BLOCK elements a program of row 0 as
    far as there are programs, then again. LOADS_FIRST: every load issued before the shares' reduction (see
    FINISH_LOADS_FIRST)."""
    pdl_start(PDL)
    pdl_wait(PDL)
    offs_s = tl.arange(0, SPLIT_P2)
    if ROWS == 1:  # as the one-token decode was measured and tested on the GPU (sm_90 SASS unchanged by rows)
        shares = tl.load(squares_ptr + offs_s, mask=offs_s < SPLIT, other=0.0)
    else:
        row = tl.program_id(1)
        shares = tl.load(squares_ptr + offs_s * ROWS + row, mask=offs_s < SPLIT, other=0.0)
        acc_ptr += row * N
        y_ptr += row * (N // 2 if SWIGLU else N)
        other_n = tl.where(row > 0, 0, other_n)  # row 0's programs zero it
    if not LOADS_FIRST:
        square_sum = tl.sum(shares, axis=0)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if SWIGLU:
        mask = offs < N // 2
        gate = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        up = tl.load(acc_ptr + N // 2 + offs, mask=mask, other=0.0)
        if LOADS_FIRST:  # gate and the shares made to depend on up and gate
            gate = gate + up * 0.0
            square_sum = tl.sum(shares + tl.sum(gate, axis=0) * 0.0, axis=0)
        _finish_swiglu(gate, up, square_sum, offs, mask, y_ptr, K, eps, True)
        # Every thread's loads done before any zero lands: the compiler gives the zero stores another layout than
        # the loads (another thread owns each element), and without the barrier some loads read zeros (seen on the
        # H200 at several rows: whole rows of y off by 0.4-0.8, benchmarks/results/verify_probe_h200_before_fix.log)
        tl.debug_barrier()
        tl.store(acc_ptr + offs, tl.zeros_like(gate), mask=mask)
        tl.store(acc_ptr + N // 2 + offs, tl.zeros_like(up), mask=mask)
    else:
        mask = offs < N
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
        if LOADS_FIRST:
            square_sum = tl.sum(shares, axis=0)
        tl.store(y_ptr + offs, (acc * tl.rsqrt(square_sum / K + eps)).to(y_ptr.dtype.element_ty), mask=mask)
        tl.debug_barrier()  # as above
        tl.store(acc_ptr + offs, tl.zeros_like(acc), mask=mask)
    for start in range(0, other_n, tl.num_programs(0) * BLOCK):
        other = start + offs
        tl.store(other_ptr + other, tl.zeros([BLOCK], tl.float32), mask=other < other_n)


class _ZeroedWorkspace:
    """Per device and name an fp32 accumulator that is all zeros between products (the kernel that reads it
    zeroes it again), and room for the sum(h^2) shares. Allocated on first use, before any CUDA-graph capture; a
    buffer outgrown by a larger model is kept, since graphs captured with it still use it."""

    def __init__(self):
        self._buffers: dict[tuple[torch.device, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []

    def get(self, device: torch.device, name: str, n: int, shares: int) -> tuple[torch.Tensor, torch.Tensor]:
        acc, squares = self._buffers.get((device, name), (None, None))
        if acc is None or acc.numel() < n or squares.numel() < shares:
            if acc is not None:
                self._outgrown.append((acc, squares))
            acc = torch.zeros(max(n, 0 if acc is None else acc.numel()), dtype=torch.float32, device=device)
            squares = torch.zeros(max(shares, 0 if squares is None else squares.numel()), dtype=torch.float32,
                                  device=device)
            self._buffers[(device, name)] = acc, squares
        return acc, squares


_zeroed = _ZeroedWorkspace()
FINISH_BLOCK = 1024
# The finishing kernel's loads (the shares, gate and up) issued together. As written, ptxas put up's loads after
# silu(gate), or after the shares' reduction: two round trips (sm_90 SASS, compiled on the CPU machine); made to
# depend on each other, all five loads come first. Not timed yet: off.
FINISH_LOADS_FIRST = False


def frag_accumulated_norm(h: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          group_size: int, norm_weight: torch.Tensor, eps: float, swiglu: bool = False,
                          out_dtype: torch.dtype | None = None, zero_after: torch.Tensor | None = None) -> torch.Tensor:
    """y [M, N] = W rmsnorm(h) for the residual stream h [M, K] (fp32 or the weights' dtype, M <= 8 rows) and W
    as fragments; `swiglu` (W a fused gate|up [2I, K]): y [M, I] = silu(gate) * up. In `out_dtype` (default the
    scales'). Two kernels: the accumulating GEMV, then the finishing one, which also zeroes `zero_after` (fp32)
    if given."""
    G, N = scales.shape
    M = h.shape[0]
    acc, squares = _zeroed.get(h.device, "gate_up" if swiglu else "rows", M * N, G * M)
    acc = acc[:M * N].view(M, N)
    split = frag_accumulate(h, fragments, scales, zeros, group_size, acc, norm_weight, squares)
    out_dtype = out_dtype or scales.dtype
    width = N // 2 if swiglu else N
    y = torch.empty(M, width, dtype=out_dtype, device=h.device)
    pdl = launch_mode(h.device) if M <= triton_int4_frag.PDL_MAX_ROWS else 0  # read here: benchmarks set it
    other = acc if zero_after is None else zero_after
    _finish_accumulated[(triton.cdiv(width, FINISH_BLOCK), M)](
        acc, squares, y, N, G * group_size, eps, split, other, 0 if zero_after is None else zero_after.numel(),
        SPLIT_P2=triton.next_power_of_2(split), BLOCK=FINISH_BLOCK, SWIGLU=swiglu, PDL=pdl, ROWS=M,
        LOADS_FIRST=FINISH_LOADS_FIRST, num_warps=4, launch_pdl=bool(pdl))
    return y


def frag_accumulated_mlp(h: torch.Tensor, gate_up: tuple, down: tuple, group_size: int, norm_weight: torch.Tensor,
                         eps: float, layers: int, layer: int, zero_qkv: torch.Tensor | None = None) -> None:
    """h [1, H] fp32 += down(silu(gate) * up) of rmsnorm(h) in place, in two kernels: gate|up (its norm folded)
    accumulated into this layer's own workspace, then down making its input from it (`frag_accumulate_swiglu`)
    and zeroing the previous layer's workspace and `zero_qkv` (the q|k|v accumulator attention read). A workspace
    per layer of a `layers`-layer model, since down's programs all read theirs: layer l's is clean when gate|up uses
    it (layer l + 1's down zeroed it the step before; the last layer's, layer 0's down this step), and the last
    layer's stays dirty between steps. gate_up, down: (fragments, scales, zeros)."""
    assert layers >= 2 and 0 <= layer < layers, (layers, layer)
    G, N = gate_up[1].shape
    acc, squares = _zeroed.get(h.device, f"mlp:{layers}:{layer}", N, G)
    previous = _zeroed.get(h.device, f"mlp:{layers}:{(layer - 1) % layers}", N, G)[0]
    split = frag_accumulate(h, *gate_up, group_size, acc[:N].view(1, N), norm_weight, squares)
    zero = (previous[:N],) + (() if zero_qkv is None else (zero_qkv,))
    frag_accumulate_swiglu(acc, squares, split, G * group_size, eps, *down, group_size, h, zero)


def qkv_accumulator(device: torch.device, n: int) -> torch.Tensor:
    """The zeroed accumulator that `frag_accumulated_attention` fills and the gate|up finishing kernel zeroes."""
    return _zeroed.get(device, "qkv", n, 1)[0][:n]


def frag_accumulated_attention(h: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                               group_size: int, norm_weight: torch.Tensor, eps: float, num_heads: int,
                               inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               positions: torch.Tensor) -> torch.Tensor:
    """Decode attention of T new tokens (h [T, K]; T > 1: a verify step, the Triton decode kernel taking T
    queries) whose q|k|v = W rmsnorm(h) is accumulated into the "qkv" workspace and read by the attention kernel
    itself, each token's norm rsqrt applied as it loads (one kernel fewer than `frag_accumulated_norm` +
    attention). Returns [1, H, T, D] in the caches' dtype. The workspace [T * N] must be zeroed again before the
    next call: the layer's gate|up finishing kernel does it (`zero_after`)."""
    from llmpress.kernels.triton_attention import decode_attention_rope_triton
    qkv, qkv_norm = _accumulated_qkv(h, fragments, scales, zeros, group_size, norm_weight, eps)
    return decode_attention_rope_triton(qkv, num_heads, inv_freq, k_cache, v_cache, positions, qkv_norm)


def _accumulated_qkv(h, fragments, scales, zeros, group_size, norm_weight, eps):
    """q|k|v's accumulator [1, T, N] filled from h [T, K], and the attention kernel's `qkv_norm` for it."""
    G, N = scales.shape
    T = h.shape[0]
    acc = qkv_accumulator(h.device, T * N)
    squares = _zeroed.get(h.device, "qkv_squares", G, G * T)[1]
    split = frag_accumulate(h, fragments, scales, zeros, group_size, acc.view(T, N), norm_weight, squares)
    return acc.view(1, T, N), (squares, split, G * group_size, eps)


def splits_combine_fits(k_cache: torch.Tensor, o_scales: torch.Tensor, group_size: int) -> bool:
    """Whether `frag_accumulated_attention_o` can combine the attention's splits inside the o product: a head
    per quantization group, and at most 8 splits (the mma's columns) over this cache."""
    from llmpress.kernels.triton_attention import splits_for
    B, Hkv, S, D = k_cache.shape
    G, N = o_scales.shape
    return (B == 1 and D == group_size and splits_for(Hkv, S, k_cache.device) <= 8
            and tile_config(N, G, must_fit=False) is not None)


def frag_accumulated_attention_o(h: torch.Tensor, qkv_product: tuple, norm_weight: torch.Tensor, eps: float,
                                 num_heads: int, inv_freq: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 positions: torch.Tensor, o_product: tuple, group_size: int) -> None:
    """h [1, K] fp32 += o(attention(q|k|v(rmsnorm(h)))) in place, in three kernels: q|k|v accumulated
    (`frag_accumulated_attention`), the attention's splits without their combine kernel, and o over the splits,
    combining them as it loads them (`frag_accumulate_splits`; needs `splits_combine_fits`). The q|k|v workspace
    is left for the layer's gate|up finishing kernel to zero, as with `frag_accumulated_attention`. qkv_product,
    o_product: (fragments, scales, zeros)."""
    from llmpress.kernels.triton_attention import decode_attention_rope_splits
    qkv, qkv_norm = _accumulated_qkv(h, *qkv_product, group_size, norm_weight, eps)
    parts, lse = decode_attention_rope_splits(qkv, num_heads, inv_freq, k_cache, v_cache, positions, qkv_norm)
    frag_accumulate_splits(parts, lse, *o_product, group_size, h)

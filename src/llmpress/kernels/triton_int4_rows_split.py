"""Batch-1 W4A16 GEMV over the row layout (kernels/triton_int4_rows.py) as many small loopless tiles.

Why: the looped GEMV (`gemv` in triton_int4_rows.py) keeps one tile of 4-16 KB per program in flight
and waits a DRAM round trip per step; on the H200 it read 15-28% of the copy bandwidth on the 3B's layer
shapes. Little's law asks for ~3 MB in flight over the whole GPU (4.25 TB/s x ~0.7 us). Here every
program loads one [BLOCK_N rows x GROUPS groups] tile at once, with no loop, and the grid holds
(N / BLOCK_N) x (G / GROUPS) programs, so the whole weight is requested in the first wave. With many rows
per tile each thread holds several rows of the same columns, so the x values it prepares are shared by
all of them (the GEMV's x work per weight shrinks with BLOCK_N / threads along N).

Arithmetic per weight, exact as in the GEMV: a LOP3 (mask and OR into the bits of 1.0), an FADD and an
FFMA, written as inline PTX per packed word (`_word_dot_asm`); the zero point and scale are applied per
group: sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z sum_k x_k).

Each program writes its fp32 partial sums [BLOCK_N] of its groups; `reduce` picks who adds them:
- "in_kernel" (what the model runs): the last program to finish a row tile adds the partials, all loaded
  at once, and stores y in x's dtype.
- "partials": the caller gets partials [G / GROUPS, N] and sums them (`.sum(0)`), which torch.compile can
  fuse into the next kernel; it did for silu * up and the residual add + RMSNorm, not for q|k|v (rope).
The kernel can also take the step before and after the product, so that a decoder layer at batch 1 runs
no elementwise kernels between its GEMVs (`prologue`/`residual`, used by QuantLinear.forward_fused):
- "rmsnorm": x is the residual stream h; y = W (g * h) * rsqrt(mean(h^2) + eps). Each program adds up
  its slice's h^2 beside its partial product; the reduction sums both, so the norm costs no extra pass.
- "silu_mul": x is the fused gate|up output [1, 2K]; the input is silu(gate) * up, made per slice.
- residual: y = residual + W x, added by whoever stores y.
Measured on the H200 over a 3B token's linears (benchmarks/NOTES.md, session 4): 1.25 ms in-kernel, 0.93 ms
for the kernel alone, against 1.72 ms for the looped GEMV and 0.61 ms for a read-only kernel on these tiles.
Reference: `kernels.reference.int4_matmul_rows_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpress.kernels import pdl as pdl_module
from llmpress.kernels.pdl import launch_mode, pdl_start, pdl_wait
from llmpress.kernels.tile_tuner import TileTuner
from llmpress.kernels.triton_int4 import INTERPRETED as _INTERPRETED, _workspace

ONE_BITS = tl.constexpr(0x3F800000)  # the fp32 bit pattern of 1.0


def _word_dot_asm() -> str:
    """PTX for one packed word: sum_j level_j * x'_j over its 8 nibbles, 3 instructions per weight (LOP3,
    FADD, FFMA). Written out because the compiler turned (w & mask) | ONE into two LOP3s (both operands
    immediates); here 1.0's bits sit in a register. $1: the word; $2..$9: x_j * 2^(23 - bit_j)."""
    lines = ["{", ".reg .b32 one, hi, t, l, acc;", "mov.b32 one, 0x3F800000;", "shr.u32 hi, $1, 12;"]
    for j in range(8):
        src, bit = ("$1", 4 * j) if j < 5 else ("hi", 4 * j - 12)
        lines.append(f"lop3.b32 t, {src}, {0xF << bit:#x}, one, 0xEA;")  # (src & mask) | one
        lines.append("sub.f32 l, t, 0f3F800000;")  # q * 2^(bit - 23), exact
        lines.append("mul.f32 acc, l, $2;" if j == 0 else f"fma.rn.f32 acc, l, ${j + 2}, acc;")
    lines += ["mov.b32 $0, acc;", "}"]
    return "\n".join(lines)


WORD_DOT_ASM = tl.constexpr(_word_dot_asm())
SPLIT_WORKSPACE = 1 << 22

# (BLOCK_N, GROUPS, num_warps): timed by benchmarks/int4_rows_gpu.py --sweep; the tuner picks per shape.
SPLIT_CONFIGS = [(128, 1, 4), (256, 1, 4), (256, 1, 8), (512, 1, 8), (64, 2, 4), (128, 2, 4), (128, 2, 8),
                 (256, 2, 8), (64, 4, 4), (128, 4, 8)]


def partials_groups(G: int) -> int:
    """Groups per tile when the caller sums the partials: fixed by the shape alone, because the custom op's
    fake implementation must know the partials' shape [G / groups, N] before any tile is timed. Two groups
    per tile were fastest or within 2% at every 3B shape on the H200 (int4_rows_h200_run7.json)."""
    return 2 if G % 2 == 0 else 1


@triton.jit
def load_word_inputs(x_base):
    """The 8 inputs of each packed word (x_base: pointers to input 8w of word w), as fp32."""
    x0 = tl.load(x_base + 0).to(tl.float32)
    x1 = tl.load(x_base + 1).to(tl.float32)
    x2 = tl.load(x_base + 2).to(tl.float32)
    x3 = tl.load(x_base + 3).to(tl.float32)
    x4 = tl.load(x_base + 4).to(tl.float32)
    x5 = tl.load(x_base + 5).to(tl.float32)
    x6 = tl.load(x_base + 6).to(tl.float32)
    x7 = tl.load(x_base + 7).to(tl.float32)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def nibble_level(words, high, J: tl.constexpr):
    """Nibble J of each word (high = words >> 12) as the exact float q * 2^(bit - 23), bit = 4J (J < 5) or
    4J - 12: OR-ing the masked word into 1.0's bits gives 1 + q * 2^(bit - 23), then 1 is subtracted."""
    BIT: tl.constexpr = 4 * J - 12 * (J >= 5)
    if J < 5:
        src = words
    else:
        src = high
    return ((src & (0xF << BIT)) | ONE_BITS).to(tl.float32, bitcast=True) - 1.0


@triton.jit
def tile_pointers(x_ptr, qw_ptr, N, G, words_per_row, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                  GROUP_SIZE: tl.constexpr):
    """Program (pid_n, pid_k)'s [BLOCK_N rows x GROUPS groups] tile: its rows and their mask, its packed
    words' pointers [BLOCK_N, GROUPS, words per group], its scale/zero offsets [BLOCK_N, GROUPS] and the
    pointers to input 8w of each word w [GROUPS, words per group]."""
    WPG: tl.constexpr = GROUP_SIZE // 8  # packed words per group and row
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    offs_w = tl.arange(0, WPG)
    word_ptrs = qw_ptr + offs_n[:, None, None] * words_per_row + offs_g[None, :, None] * WPG + offs_w[None, None, :]
    group_offsets = offs_n[:, None] * G + offs_g[None, :]
    x_base = x_ptr + offs_g[:, None] * GROUP_SIZE + offs_w[None, :] * 8
    return offs_n, offs_n < N, word_ptrs, group_offsets, x_base


PROLOGUES = {None: 0, "rmsnorm": 1, "silu_mul": 2}
# Make the prologue's inputs on one [groups, words, 8] tile per program, then split them apart, instead of in
# the word dot's layout, where every thread sharing a column repeats them. SASS per thread on sm_90, in-kernel
# [128 x 1 group] tile: silu * up 1616 -> 944, RMSNorm 1080 -> 944 (896 without a prologue;
# benchmarks/sass_counts.py). Off until timed on a GPU (benchmarks/int4_gpu.py variants int4-spread*).
spread_prologue = False


@triton.jit
def prologue_input(x_ptr, offs, nw_ptr, K, PROLOGUE: tl.constexpr):
    """Inputs `offs` of the product after the prologue, in fp32, and h^2 for the norm (zeros without one).
    silu(gate) * up is rounded to x's dtype, as the unfused product stored it."""
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + offs).to(tl.float32)
        x = (gate * tl.sigmoid(gate) * tl.load(x_ptr + K + offs).to(tl.float32)).to(x_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        square = tl.zeros_like(x)
    else:
        h = tl.load(x_ptr + offs).to(tl.float32)
        if PROLOGUE == 1:
            x = h * tl.load(nw_ptr + offs).to(tl.float32)
            square = h * h
        else:
            x = h
            square = tl.zeros_like(h)
    return x, square


@triton.jit
def spread_prologue_inputs(x_ptr, x_offs, nw_ptr, K, GROUPS: tl.constexpr, WPG: tl.constexpr,
                           PROLOGUE: tl.constexpr):
    """`prologue_input` for the 8 inputs of every packed word at once, on one [GROUPS, WPG, 8] tile, then split
    into the 8 [GROUPS, WPG] tensors the word dot takes: each input is made once per program instead of once
    per thread that shares its column. Returns x0..x7 and the tile's h^2 per word."""
    offs = x_offs[:, :, None] + tl.arange(0, 8)[None, None, :]
    x, square = prologue_input(x_ptr, offs, nw_ptr, K, PROLOGUE)
    x = tl.reshape(x, [GROUPS, WPG, 2, 2, 2])  # input j = 4a + 2b + c of a word at [a, b, c]
    c0, c1 = tl.split(x)
    b0c0, b1c0 = tl.split(c0)
    b0c1, b1c1 = tl.split(c1)
    x0, x4 = tl.split(b0c0)
    x2, x6 = tl.split(b1c0)
    x1, x5 = tl.split(b0c1)
    x3, x7 = tl.split(b1c1)
    return x0, x1, x2, x3, x4, x5, x6, x7, tl.sum(square, axis=2)


@triton.jit
def finish_output(acc, square_sum, offs_n, n_mask, y_ptr, res_ptr, K, eps, PROLOGUE: tl.constexpr,
                  RESIDUAL: tl.constexpr, RESIDUAL_FROM_L2: tl.constexpr = False):
    """Store y [BLOCK_N] = acc (* the norm's rsqrt) (+ residual) in y's dtype, rounding as the unfused steps do.
    RESIDUAL_FROM_L2: the residual was written by this kernel's other programs (a persistent kernel), so .cg."""
    if PROLOGUE == 1:
        acc = acc * tl.rsqrt(square_sum / K + eps)
    y = acc.to(y_ptr.dtype.element_ty)
    if RESIDUAL:
        if RESIDUAL_FROM_L2:
            residual = tl.load(res_ptr + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
        else:
            residual = tl.load(res_ptr + offs_n, mask=n_mask, other=0.0)
        y = (residual.to(tl.float32) + y.to(tl.float32)).to(y.dtype)
    tl.store(y_ptr + offs_n, y, mask=n_mask)


@triton.jit
def _split_gemv(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, N, G, words_per_row, SPLIT,
                nw_ptr, res_ptr, eps,
                BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, GROUP_SIZE: tl.constexpr, IN_KERNEL: tl.constexpr,
                SPLIT_P2: tl.constexpr, EVEN_N: tl.constexpr, USE_ASM: tl.constexpr, PROLOGUE: tl.constexpr = 0,
                RESIDUAL: tl.constexpr = False, SPREAD_PROLOGUE: tl.constexpr = False, PDL: tl.constexpr = 0):
    """One [BLOCK_N, GROUPS groups] tile: partial y[n] over this program's groups. PDL (kernels/pdl.py): the
    weights are requested before the previous kernel has finished; x, the workspace and y only after."""
    pdl_start(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n, n_mask, word_ptrs, group_offsets, x_base = tile_pointers(x_ptr, qw_ptr, N, G, words_per_row, BLOCK_N,
                                                                     GROUPS, GROUP_SIZE)
    K = words_per_row * 8
    # input index of nibble 0 of each word [GROUPS, words per group] (x_base's offsets, for the prologue's loads)
    x_offs = ((pid_k * GROUPS + tl.arange(0, GROUPS)) * GROUP_SIZE)[:, None] + (tl.arange(0, GROUP_SIZE // 8) * 8)[None, :]
    if EVEN_N:  # no mask: the loads stay 16-byte vectors
        words = tl.load(word_ptrs, eviction_policy="evict_first")
        scale = tl.load(s_ptr + group_offsets).to(tl.float32)
        zero = tl.load(z_ptr + group_offsets).to(tl.float32)
    else:
        words = tl.load(word_ptrs, mask=n_mask[:, None, None], other=0, eviction_policy="evict_first")
        scale = tl.load(s_ptr + group_offsets, mask=n_mask[:, None], other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + group_offsets, mask=n_mask[:, None], other=0).to(tl.float32)
    pdl_wait(PDL)
    if USE_ASM:
        if PROLOGUE == 0:
            x0, x1, x2, x3, x4, x5, x6, x7 = load_word_inputs(x_base)
            squares = tl.zeros(x_offs.shape, dtype=tl.float32)
        elif SPREAD_PROLOGUE:
            x0, x1, x2, x3, x4, x5, x6, x7, squares = spread_prologue_inputs(x_ptr, x_offs, nw_ptr, K, GROUPS,
                                                                             GROUP_SIZE // 8, PROLOGUE)
        else:
            x0, q0 = prologue_input(x_ptr, x_offs + 0, nw_ptr, K, PROLOGUE)
            x1, q1 = prologue_input(x_ptr, x_offs + 1, nw_ptr, K, PROLOGUE)
            x2, q2 = prologue_input(x_ptr, x_offs + 2, nw_ptr, K, PROLOGUE)
            x3, q3 = prologue_input(x_ptr, x_offs + 3, nw_ptr, K, PROLOGUE)
            x4, q4 = prologue_input(x_ptr, x_offs + 4, nw_ptr, K, PROLOGUE)
            x5, q5 = prologue_input(x_ptr, x_offs + 5, nw_ptr, K, PROLOGUE)
            x6, q6 = prologue_input(x_ptr, x_offs + 6, nw_ptr, K, PROLOGUE)
            x7, q7 = prologue_input(x_ptr, x_offs + 7, nw_ptr, K, PROLOGUE)
            squares = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        # x_j scaled by 2^(23 - bit_j), bit_j = 0, 4, 8, 12, 16 (j < 5) and 8, 12, 16 (j >= 5, after >> 12)
        word_dot = tl.inline_asm_elementwise(
            WORD_DOT_ASM, "=r,r,r,r,r,r,r,r,r,r",
            [words, (x0 * 8388608.0)[None], (x1 * 524288.0)[None], (x2 * 32768.0)[None], (x3 * 2048.0)[None],
             (x4 * 128.0)[None], (x5 * 32768.0)[None], (x6 * 2048.0)[None], (x7 * 128.0)[None]],
            dtype=tl.float32, is_pure=True, pack=1)
        dot = tl.sum(word_dot, axis=2)
    elif SPREAD_PROLOGUE and PROLOGUE != 0:  # the plain twin of the branch above (the interpreter checks it)
        high = words >> 12
        x0, x1, x2, x3, x4, x5, x6, x7, squares = spread_prologue_inputs(x_ptr, x_offs, nw_ptr, K, GROUPS,
                                                                         GROUP_SIZE // 8, PROLOGUE)
        x_sum = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        words_dot = (nibble_level(words, high, 0) * (x0 * 8388608.0)[None] + nibble_level(words, high, 1) * (x1 * 524288.0)[None]
                     + nibble_level(words, high, 2) * (x2 * 32768.0)[None] + nibble_level(words, high, 3) * (x3 * 2048.0)[None]
                     + nibble_level(words, high, 4) * (x4 * 128.0)[None] + nibble_level(words, high, 5) * (x5 * 32768.0)[None]
                     + nibble_level(words, high, 6) * (x6 * 2048.0)[None] + nibble_level(words, high, 7) * (x7 * 128.0)[None])
        dot = tl.sum(words_dot, axis=2)
    else:
        high = words >> 12  # nibbles 5, 6, 7 (bits 20..31) land at bits 8..19, inside the mantissa
        words_dot = tl.zeros(words.shape, dtype=tl.float32)
        x_sum = tl.zeros(x_base.shape, dtype=tl.float32)
        squares = tl.zeros(x_base.shape, dtype=tl.float32)
        for j in tl.static_range(8):
            x, square = prologue_input(x_ptr, x_offs + j, nw_ptr, K, PROLOGUE)
            x_sum += x
            squares += square
            words_dot += nibble_level(words, high, j) * (x * (8388608.0 / (1 << (4 * j - 12 * (j >= 5)))))[None, :, :]
        dot = tl.sum(words_dot, axis=2)
    acc = tl.sum(scale * (dot - zero * tl.sum(x_sum, axis=1)[None, :]), axis=1)  # [BLOCK_N]
    square_sum = tl.sum(tl.sum(squares, axis=1), axis=0)  # this slice's share of sum(h^2) (rmsnorm only)
    if not IN_KERNEL:
        tl.store(partial_ptr + pid_k * N + offs_n, acc, mask=n_mask)
    elif SPLIT == 1:
        finish_output(acc, square_sum, offs_n, n_mask, y_ptr, res_ptr, K, eps, PROLOGUE, RESIDUAL)
    else:
        # Every program stores its partial; the last to arrive at this row tile (an atomic counter, reset by
        # it) loads all SPLIT partials in one [SPLIT_P2, BLOCK_N] tile, so the reduction costs one L2 round
        # trip, not one per partial as a loop over them would (~3 us per call on the H200, run 6).
        tl.store(partial_ptr + pid_k * N + offs_n, acc, mask=n_mask)
        squares_ptr = partial_ptr + SPLIT * N + pid_n * SPLIT  # per row tile: each slice's sum(h^2)
        if PROLOGUE == 1:
            tl.store(squares_ptr + pid_k, square_sum)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT - 1:
            offs_s = tl.arange(0, SPLIT_P2)
            parts = tl.load(partial_ptr + offs_s[:, None] * N + offs_n[None, :],
                            mask=(offs_s < SPLIT)[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
            if PROLOGUE == 1:
                square_sum = tl.sum(tl.load(squares_ptr + offs_s, mask=offs_s < SPLIT, other=0.0,
                                            cache_modifier=".cg"), axis=0)
            finish_output(tl.sum(parts, axis=0), square_sum, offs_n, n_mask, y_ptr, res_ptr, K, eps, PROLOGUE,
                          RESIDUAL)
            tl.atomic_xchg(counter_ptr + pid_n, 0)


def split_fits(N: int, G: int, block_n: int, groups: int, in_kernel: bool) -> bool:
    """Groups tile K; with the in-kernel reduction, the partials fit the workspace and the last program's
    [split, BLOCK_N] tile of them stays within 64 fp32 registers per thread (4 warps)."""
    split = G // groups
    return (G % groups == 0 and triton.cdiv(N, block_n) <= 1 << 14
            and (not in_kernel or split == 1 or (split * N + triton.cdiv(N, block_n) * split <= SPLIT_WORKSPACE
                                                  and triton.next_power_of_2(split) * block_n <= 8192)))


# the fastest fitting tile per (device, N, K, group size, dtype, reduce, inline PTX)
_split_tuner = TileTuner()


def split_gemv_rows(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, config: dict | None = None, reduce: str = "partials", prologue: str | None = None,
                    norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                    residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, K] fp16/bf16 @ Wᵀ. reduce="partials": fp32 partial sums [S, N] (S = G / GROUPS, tuned:
    G / partials_groups(G)) for the caller to add up; reduce="in_kernel": y [1, N] in x.dtype. `config` {"BLOCK_N", "GROUPS", "num_warps"}
    skips the tuner; its "USE_ASM" (default: on a GPU) picks the inline-PTX word dot over plain Triton.
    In-kernel only: prologue "rmsnorm" (x is the residual stream; `norm_weight` [K], `eps`) or "silu_mul" (x is
    [1, 2K], gate then up), and `residual` [1, N] added to y. config "SPREAD" overrides `spread_prologue`."""
    M = x.shape[0]
    N, G = scales.shape
    K = G * group_size
    assert M == 1, "the split GEMV takes one row of x"
    assert reduce in ("partials", "in_kernel"), reduce
    assert prologue in PROLOGUES, prologue
    assert x.shape[1] == (2 * K if prologue == "silu_mul" else K), (x.shape, K, prologue)
    assert (norm_weight is not None) == (prologue == "rmsnorm"), prologue
    in_kernel = reduce == "in_kernel"
    assert in_kernel or (prologue is None and residual is None), "prologues and residuals need the in-kernel reduction"
    use_asm = (config or {}).get("USE_ASM", not _INTERPRETED)
    spread = (config or {}).get("SPREAD", spread_prologue)
    pdl = launch_mode(x.device) if pdl_module.split_gemv else 0

    def launch(c: tuple[int, int, int], pdl: int = pdl) -> torch.Tensor:
        block_n, groups, warps = c
        split = G // groups
        if in_kernel:
            out = torch.empty(1, N, dtype=x.dtype, device=x.device)
            partial, counter = _workspace.get(x.device, SPLIT_WORKSPACE, 1 << 14)
        else:
            out = partial = counter = torch.empty(split, N, dtype=torch.float32, device=x.device)  # y, counter unused
        _split_gemv[(triton.cdiv(N, block_n), split)](
            x, qweight, scales, zeros, out, partial, counter, N, G, K // 8, split,
            x if norm_weight is None else norm_weight, x if residual is None else residual, eps,
            BLOCK_N=block_n, GROUPS=groups,
            GROUP_SIZE=group_size, IN_KERNEL=in_kernel, SPLIT_P2=triton.next_power_of_2(split) if in_kernel else 1,
            EVEN_N=N % block_n == 0, USE_ASM=use_asm, PROLOGUE=PROLOGUES[prologue], RESIDUAL=residual is not None,
            SPREAD_PROLOGUE=spread, PDL=pdl, num_warps=warps, launch_pdl=bool(pdl))
        return out

    if config is not None and "BLOCK_N" in config:
        chosen = (config["BLOCK_N"], config["GROUPS"], config["num_warps"])
        assert split_fits(N, G, chosen[0], chosen[1], in_kernel), config
    else:
        table = SPLIT_CONFIGS if in_kernel else [c for c in SPLIT_CONFIGS if c[1] == partials_groups(G)]
        candidates = [c for c in table if split_fits(N, G, c[0], c[1], in_kernel)] or [(128, partials_groups(G), 4)]
        key = (x.device, N, K, group_size, x.dtype, reduce, use_asm, prologue, residual is not None, spread)
        # timed as launches of their own: back-to-back PDL launches of one kernel would overlap each other
        chosen = _split_tuner.pick(key, lambda c: launch(c, pdl=0), candidates)
    return launch(chosen)

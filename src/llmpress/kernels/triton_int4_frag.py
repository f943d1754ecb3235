"""Batch-1 (up to 16 rows) W4A16 GEMV on the tensor cores, over the fragment layout
(quant/format.py `rows_to_fragments`).

Why: the split GEMV (triton_int4_rows_split.py) does its arithmetic on the CUDA cores, ~4.5 instructions per
weight, and is bound by how fast it issues them (1.17 ms over a 3B token's layers on the H200, against 0.61 ms
for a kernel that only loads the same tiles). Here a warp multiplies a 16-row x 16-input block of weights
with x in one mma.m16n8k16 (bf16 or fp16 operands, fp32 sums); the weights reach the operand registers with
one LOP3 per two weights and a shift per two registers:
  - each lane's packed words hold exactly its A-operand nibbles (the fragment layout), so 16-byte loads put
    them in registers with no shuffling;
  - OR-ing a nibble pair (mask 0x000F000F) into the bits of the magic value (128.0 in bf16, 1024.0 in fp16)
    gives (magic + q) for both halves, exact;
  - at batch 1 B holds x in all 8 columns (only column 0 is needed; the tensor core has throughput to spare),
    with M <= 8 rows each column is a row of x (`frag_gemv_asm`);
    lane j loads x[k0 .. k0 + 3] for its two B registers, 16 bytes covering two blocks;
  - a second mma with an all-ones A gives sum(x) per block, so the magic and the zero point come off per
    group in fp32: y_r += s_rg (sum_k (magic + q_rk) x_k - (magic + z_rg) sum_k x_k).
Per lane and 8 weights: 3 SHF + 4 LOP3 + 2 HMMA; with loads, addresses and the reduction's tail, 2.5 SASS
instructions per weight at 4 groups per warp (sm_90, compiled on the CPU machine), against ~4.5 for the split GEMV.
Measured on the H200 (benchmarks/int4_frag_gpu.py, results/int4_frag_h200_tiles.*): 1.05 ms over a 3B token's
linears on each shape's fastest tile against 1.40 ms for the split GEMV; 1.57 ms at 6 rows.

The whole per-warp body is one inline-PTX block that finds its data from %laneid, %tid and %ctaid itself, so
it does not depend on how Triton lays out a tensor over threads; Triton only launches it once per thread
(a [32 * num_warps] tensor) and adds the partial sums of the programs that share a row tile (the last one to
arrive loads them all, as in the split GEMV), with the residual add in the store.
Program (pid_n, pid_k): warp w takes row tiles (pid_n * num_warps + w) * TILES_PER_WARP onwards (16 rows each)
over groups pid_k * GROUPS_PER_WARP onwards. Needs N a multiple of 16 * num_warps * TILES_PER_WARP.
Off the GPU: `kernels.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpress.kernels import frag_swiglu_x
from llmpress.kernels.pdl import launch_mode
from llmpress.kernels.tile_tuner import TileTuner
from llmpress.kernels.triton_int4 import _workspace
from llmpress.kernels.triton_int4_rows_split import SPLIT_WORKSPACE, finish_output

# (num_warps, groups per warp, row tiles per warp). More groups per warp spread a program's fixed instructions
# over more weights, but each group adds 16 x registers (all loaded first; beyond 4 they would spill); more row
# tiles share the x registers, so they put more weight bytes in flight per register (sm_90 registers per thread:
# (4, 2, 1) 80, (4, 1, 2) 72, (4, 1, 4) 120, (4, 2, 2) 113). On the H200 (benchmarks/int4_frag_gpu.py,
# results/int4_frag_h200_tiles.*) 4 tiles per warp won where there are many rows: lm_head 65.0 us (75% of the
# copy bandwidth) against 82.2 for (4, 2, 1), gate|up 12.6 against 13.9, q|k|v 7.3 against 7.6; on o and down
# (3072 rows) every tile was within 0.3 us of (4, 2, 1). The tile tuner, timing one weight that stays in L2, picked
# worse tiles, so the defaults are fixed (`default_config`), and the tuner only decides where they do not fit.
FRAG_CONFIGS = [(4, 1, 1), (4, 2, 1), (4, 4, 1), (8, 4, 1), (4, 1, 2), (8, 1, 2), (4, 2, 2), (4, 1, 4), (2, 1, 4)]
DEFAULT_CONFIG = (4, 2, 1)
WIDE_CONFIG = (4, 1, 4)  # for N >= WIDE_ROWS at one row of x (more rows: not timed with several tiles yet)
WIDE_ROWS = 4096
# 2..8 rows (a verify step): on the H200 at 6 rows (results/int4_frag_h200_verify_tiles.*) (4, 2, 1) was fastest or
# within 0.4 us on the layers' shapes, (4, 2, 2) on the 128k-row head (96.2 us against 107.3) and gate|up (18.9, 19.3)
ROWS_WIDE_CONFIG = (4, 2, 2)  # for N >= ROWS_WIDE_ROWS at 2..8 rows
ROWS_WIDE_ROWS = 16384
TWO_BLOCK_CONFIG = (4, 1, 1)  # 9..16 rows: the fewest registers (96 a thread, sm_90) with x's second column block

# fp32 x: the dependency that makes the first mma wait for every load takes a value from both of each block's two
# x loads. With one (as first built), ptxas issued one of the 16-byte x loads only after the first mma (an L2 round
# trip inside the product, seen in the sm_90 SASS of the accumulating q|k|v and gate|up tiles); False: as first built.
x_f32_loads_first = True
# With the norm folded, the sum(h^2) mma starts from the same dependency as the products' first mma. Without it,
# ptxas issued that mma (which needs only the first group's x) before the loads of the other groups, so at 2 groups
# per warp with fp32 x 16-21 of 36 loads waited for x to arrive (sm_90 SASS of (4, 2, 1), compiled on the CPU
# machine: the 1B's q|k|v tile, and 2..8 rows). False: as built before session 11, measured and GPU-tested. Off:
# with it on, a model decoding through the accumulating path failed its H200 test (results/pytest_gpu_s12.log)
# although the PTX emulator (tests/kernels/test_ptx_emulated.py) finds it exact; not isolated yet.
norm_waits_for_loads = False
SPIN_LIMIT = 1 << 24  # polls of a ready flag before a trap: seconds, where a tile waits microseconds
# per activation dtype: the magic value's bits (both halves), its value, 1.0 in both halves, the mma type
_TYPES = {torch.bfloat16: (0x43004300, 128.0, 0x3F803F80, "bf16"), torch.float16: (0x64006400, 1024.0, 0x3C003C00, "f16")}


def frag_gemv_asm(num_warps: int, groups_per_warp: int, group_size: int, dtype: torch.dtype, rows: int = 1,
                  norm: bool = False, tiles_per_warp: int = 1, paired_halves: bool = False, pdl: int = 0,
                  grid_operands: bool = False, flags: int = 1, atomic: bool = False, x_f32: bool = False,
                  x_splits: int = 0, swiglu_x: tuple[int, int, float] | None = None,
                  zero_spans: tuple[tuple[int, int], ...] = ()) -> str:
    """PTX for one thread's share of a warp's TILES_PER_WARP row tiles over GROUPS_PER_WARP groups, ending in a
    store of the row tiles' partial sums. The tiles of a warp share its x registers and its sum(x) mmas, so more
    tiles put more weight bytes in flight per register than more groups do (16 x registers a group, 8 word
    registers a tile and group). Operands: $0 dummy output; $1 words, $2 x, $3 scales, $4 zeros, $5 partials (u64
    addresses); $6 N, $7 G (u32).

    `rows` (M) rows of x, up to 16: B's column n is x row n (rows past M repeat row M - 1), so D's column n is
    y row n, and lane (i, j) ends with rows 2j, 2j + 1 of y at weight rows r0 and r0 + 8; it stores those below M
    into partials [SPLIT, M, N]. At M = 1 every column is x, and lanes with j = 0 store. Past 8 rows a second
    column block (x rows 8..15, its own B registers, accumulators and sum(x)) reuses each unpacked A operand.

    `norm` (M <= 8): x is the residual stream h, $8 the RMSNorm weight w [K], $9 where this program's shares of
    sum(h^2) go (one per row). The B operand is h * w in x's dtype (one packed multiply per two inputs), and
    sum(h^2) comes from one more mma with A = B = h (a lane's A registers at a block's inputs are its B registers,
    A's rows r and r + 8 both x row r): D[r][n] = h_r . h_n, whose diagonal holds each row's sum (at M = 1 every
    element does). The caller multiplies y's row r by rsqrt(mean(h_r^2) + eps) once all shares are in. Rows past 1
    passed on the H200 too (tests/kernels/test_int4_rows.py -k each_row).

    `paired_halves` (a fused gate|up weight, N = 2I): the first half of a program's warps takes row tiles of the
    first N/2 rows, the second half the same tiles of the last N/2, so that one program holds both gate and up of
    its outputs and can finish with silu(gate) * up.

    `pdl` (kernels/pdl.py: 1 early, 2 late trigger): the weights, scales, zeros and norm weight (which no kernel
    writes) are requested first, then `griddepcontrol.wait` for the previous kernel, then x; every store comes
    after the wait. Launched with PDL, the loads of this matrix overlap the previous kernel's tail.
    3: the wait without a trigger; 4: instead of the wait, lane 0 of each warp spins (acquire loads, at most
    SPIN_LIMIT polls each, then a trap rather than a hang) until each of the `flags` consecutive u32 from $a on
    reaches $b, where a, b are the operands after the grid's two (below): the ready flags of the row tiles that
    produced this tile's x, in a persistent kernel (triton_int4_chain.py).

    `grid_operands`: the program's (row-tile program, group program) come from the two operands after the
    others ($8, $9; $10, $11 with `norm`) instead of %ctaid.x and %ctaid.y, for a persistent kernel that walks
    the tiles itself; x is then loaded with .cg (L2 only), since other programs of the same kernel wrote it.

    `atomic`: each lane adds its sums into [M, N] fp32 at $5 with `red.global.add.f32` (no answer awaited) instead
    of storing its program's slice of the partials, for the accumulating decode (kernels/triton_int4_accumulate.py;
    what that saves: benchmarks/latency_floor_gpu.py --reductions).

    `x_f32` (up to 8 rows): x is fp32 (that decode's residual stream), loaded as 8 floats per 16 bytes of
    operands and rounded to `dtype` pairs (`cvt.rn.bf16x2.f32` / `.f16x2`) before anything uses it.

    `x_splits` = S (1..8, with `atomic` and `x_f32`; group_size = the attention's head size): x is decode
    attention's unfinished split results (triton_attention.py, flash-decoding without its combine kernel): $2 the
    splits' outputs [H, S, D] fp32, $8 their log-sum-exps [H, S]. Group g is head g, and B's column n is its split
    n, so one mma multiplies the weights by every split at once (at one row the 8 columns were copies of x); each
    column's sums are then weighted by that split's share of the head's softmax mass, exp(lse_n - max) / sum, and
    the lanes' columns added by two shuffles: y = W (sum_n w_n out_n), the combine done inside the o product.

    `swiglu_x` = (shares, K of gate|up, eps) (one row, bf16, with `atomic`): x is made in the tile from the fp32
    gate|up accumulator [2K] at $2, x = silu(r gate) * (r up) with r = rsqrt(sum of the `shares` floats at $8 / K +
    eps), as gate|up's finishing kernel made it (kernels/frag_swiglu_x.py). `zero_spans` (with `swiglu_x`): after
    the products the grid stores zeros into these (n floats, rounds) spans at $9, $10, ...

    Every load comes first. ptxas otherwise issued a lane's second 16-byte word load, and the scale and zero
    loads, only after the first mmas had used the first words: three DRAM round trips in a row instead of
    one. So the first group's accumulators start as 0 * (a sum of one value from each load): the same zeros
    (every such value is finite), but the first mma now waits for every load, so all are issued before it."""
    assert not norm or rows <= 8, "the RMSNorm prologue takes up to 8 rows of x (one column block)"
    assert pdl != 4 or grid_operands, "the flag wait is for persistent kernels"
    assert not x_f32 or rows <= 8, "fp32 x: up to 8 rows (one column block)"
    assert not x_splits or (rows == x_splits <= 8 and x_f32 and atomic and not norm and not grid_operands
                            and not paired_halves), "x_splits: S rows of fp32 split results, atomics, no norm"
    assert not swiglu_x or (rows == 1 and atomic and dtype == torch.bfloat16 and not (norm or x_f32 or x_splits
                            or grid_operands or paired_halves)), "swiglu_x: one row of bf16 from the accumulator"
    assert not zero_spans or swiglu_x, "zero_spans: with swiglu_x"
    extra = 10 if norm else 8  # the first operand after the fixed ones
    cta_x, cta_y = (f"${extra}", f"${extra + 1}") if grid_operands else ("%ctaid.x", "%ctaid.y")
    magic, magic_value, ones, mma_type = _TYPES[dtype]
    words_per_lane = group_size // 16  # per group: 2 blocks of 16 inputs per 32
    blocks32 = group_size // 32
    groups, tiles = range(groups_per_warp), range(tiles_per_warp)
    words = [[[f"w{g}_{t}_{m}" for m in range(words_per_lane)] for t in tiles] for g in groups]
    cbs = range((rows + 7) // 8)  # column blocks: B holds 8 rows of x, so 9..16 rows take a second mma per A
    xs_regs = [[[f"x{g}_{cb}_{v}" for v in range(4 * blocks32)] for cb in cbs] for g in groups]
    norm_regs = [[f"n{g}_{v}" for v in range(4 * blocks32)] for g in groups] if norm else [[] for g in groups]
    per_gt = lambda names: ", ".join(f"{n}{g}_{t}" for g in groups for t in tiles for n in names)  # noqa: E731
    accs = [[[f"acc{t}_{cb}_{n}" for n in range(4)] for cb in cbs] for t in tiles]
    ys = [[[f"y{t}_{cb}_{n}" for n in range(4)] for cb in cbs] for t in tiles]
    sums = [[f"xs{cb}_{n}" for n in range(4)] for cb in cbs]  # sum(x) of each column, from the all-ones mma
    def flat(nested) -> list[str]:
        return [nested] if isinstance(nested, str) else sum((flat(x) for x in nested), [])
    L = ["{",
         ".reg .pred p;" if (rows == 1 or not norm) and pdl != 4 else ".reg .pred p, q;",
         ".reg .b32 lane, warp, i, j, tile, grp, t32, e0, e4, e8, e12, tmp, magic, one, "
         + ", ".join([f"r0_{t}" for t in tiles] + flat(words) + flat(xs_regs) + flat(norm_regs)) + ";",
         ".reg .b64 wa, xa, na, sa, za, pa, off;",
         ".reg .f32 sq0, sq1, sq2, sq3;",
         *([".reg .f32 " + ", ".join(f"xf{g}_{b}_{e}" for g in groups for b in range(blocks32) for e in range(8))
            + ";"] if x_f32 else []),
         *([".reg .f32 lmax, lsum, " + ", ".join(f"ls{g}_{n}" for g in groups for n in range(x_splits + 2)) + ";"]
           if x_splits else []),
         *(frag_swiglu_x.registers(groups, group_size) if swiglu_x else []),
         f".reg .b16 zero16, {per_gt(['s0h', 's1h'])};",
         ".reg .b32 kk, " + ", ".join(f"nrow{cb}" for cb in cbs) + ";",
         ".reg .f32 t0, t1, dep, " + ", ".join(flat(sums) + flat(accs) + flat(ys))
         + f", {per_gt(['sc0_', 'sc1_', 'zf0_', 'zf1_'])};",
         f"mov.b32 magic, {magic:#x};",
         f"mov.b32 one, {ones:#x};",
         "mov.b16 zero16, 0;",
         "mov.u32 lane, %laneid;",
         "mov.u32 warp, %tid.x;",
         "shr.u32 warp, warp, 5;",
         "shr.u32 i, lane, 2;",
         "and.b32 j, lane, 3;",
         f"mov.u32 tile, {cta_x};",
         *([f"mad.lo.u32 tile, tile, {num_warps}, warp;",
            f"mul.lo.u32 tile, tile, {tiles_per_warp};"] if not paired_halves else  # the warp's first row tile
           [f"and.b32 tmp, warp, {num_warps // 2 - 1};",  # gate warps 0..W/2-1, up warps W/2..W-1
            f"mad.lo.u32 tile, tile, {num_warps // 2}, tmp;",
            f"mul.lo.u32 tile, tile, {tiles_per_warp};",
            f"shr.u32 tmp, warp, {(num_warps // 2).bit_length() - 1};",  # 1 for the up warps
            "shr.u32 t32, $6, 5;",  # N / 32: the tiles of one half
            "mad.lo.u32 tile, tmp, t32, tile;"]),
         *[f"mad.lo.u32 r0_{t}, tile, 16, {16 * t};" for t in tiles],
         *[f"add.u32 r0_{t}, r0_{t}, i;" for t in tiles],  # rows r0 and r0 + 8 of each tile
         *[f"mov.f32 {y}, 0f00000000;" for y in flat(ys)],
         # x row of this lane's B column (groupID i) in each column block, clamped to the last row; K = G * group_size
         *[f"add.u32 nrow{cb}, i, {8 * cb};" for cb in cbs],
         *[f"min.u32 nrow{cb}, nrow{cb}, {rows - 1};" for cb in cbs],
         f"mul.lo.u32 kk, $7, {group_size};"]
    if pdl == 1:
        L.append("griddepcontrol.launch_dependents;")
    for g in groups:  # loads of what no kernel writes: the weights, their scales and zeros, the norm weight
        L += [f"mov.u32 grp, {cta_y};",
              f"mad.lo.u32 grp, grp, {groups_per_warp}, {g};"]
        for t in tiles:
            # words [tile, grp, chunk, lane, 4]: ((tile * G + grp) * chunks * 32 + lane) * 16 bytes, chunk v 512 on
            L += [f"add.u32 t32, tile, {t};",
                  "mad.lo.u32 t32, t32, $7, grp;",
                  f"mad.lo.u32 t32, t32, {32 * (words_per_lane // 4)}, lane;",
                  "mul.wide.u32 off, t32, 16;",
                  "add.u64 wa, $1, off;"]
            for v in range(words_per_lane // 4):
                L.append(f"ld.global.nc.v4.b32 {{{', '.join(words[g][t][4 * v:4 * v + 4])}}}, [wa+{512 * v}];")
        if norm:  # the norm weight at the inputs of this lane's x (of a [K] vector: no row offset)
            L += [f"mul.lo.u32 t32, grp, {group_size};", "mad.lo.u32 t32, j, 8, t32;", "mul.wide.u32 off, t32, 2;",
                  "add.u64 na, $8, off;"]
            for b in range(blocks32):
                L.append(f"ld.global.nc.v4.b32 {{{', '.join(norm_regs[g][4 * b:4 * b + 4])}}}, [na+{64 * b}];")
        for t in tiles:
            # scale and zero of rows r0, r0 + 8 in this group, [G, N]: index grp * N + r (a group's rows side by side)
            L += [f"mad.lo.u32 t32, grp, $6, r0_{t};",
                  "mul.wide.u32 off, t32, 2;",
                  "add.u64 sa, $3, off;",
                  f"ld.global.nc.b16 s0h{g}_{t}, [sa];",
                  f"ld.global.nc.b16 s1h{g}_{t}, [sa+16];",  # 8 rows further, 2 bytes each
                  "cvt.u64.u32 off, t32;",
                  "add.u64 za, $4, off;",
                  "ld.global.nc.u8 tmp, [za];",
                  f"cvt.rn.f32.u32 zf0_{g}_{t}, tmp;",
                  "ld.global.nc.u8 tmp, [za+8];",
                  f"cvt.rn.f32.u32 zf1_{g}_{t}, tmp;"]
    if pdl:  # x is the previous kernel's output. ptxas hoists an unconditional wait above the loads, so it is
        # predicated on the OR of every loaded value with G (>= 1: p is always true, but ptxas cannot know it):
        # the wait then comes once every weight load has arrived, and x is requested after it.
        L.append("mov.b32 e0, $7;")
        for g in groups:
            for t in tiles:
                L += [f"or.b32 e0, e0, {w};" for w in words[g][t]]
                L += [f"cvt.u32.u16 e4, s0h{g}_{t};", "or.b32 e0, e0, e4;",
                      f"cvt.u32.u16 e4, s1h{g}_{t};", "or.b32 e0, e0, e4;",
                      f"mov.b32 e4, zf0_{g}_{t};", "or.b32 e0, e0, e4;",
                      f"mov.b32 e4, zf1_{g}_{t};", "or.b32 e0, e0, e4;"]
            L += [f"or.b32 e0, e0, {n};" for n in norm_regs[g]]
        L.append("setp.ne.u32 p, e0, 0;")
        if pdl != 4:
            L.append("@p griddepcontrol.wait;")
        else:  # lane 0 spins; bar.warp.sync then orders the other lanes' loads after its acquire
            flag, target = f"${extra + 2}", f"${extra + 3}"
            L += ["setp.eq.and.u32 p, lane, 0, p;", "@!p bra $$SPIN_DONE${:uid};"]
            for f in range(flags):
                L += ["mov.u32 e4, 0;",
                      f"$$SPIN{f}_${{:uid}}:",
                      f"ld.acquire.gpu.global.u32 tmp, [{flag}+{4 * f}];",
                      f"setp.ge.u32 q, tmp, {target};",
                      f"@q bra $$SPUN{f}_${{:uid}};",
                      "nanosleep.u32 32;",  # fewer polls of flags that many warps read
                      "add.u32 e4, e4, 1;",
                      f"setp.lt.u32 q, e4, {SPIN_LIMIT};",
                      f"@q bra $$SPIN{f}_${{:uid}};",
                      "trap;",
                      f"$$SPUN{f}_${{:uid}}:"]
            L += ["$$SPIN_DONE${:uid}:", "bar.warp.sync 0xffffffff;"]
    if pdl == 2:
        L.append("@p griddepcontrol.launch_dependents;")
    if swiglu_x:
        shares, norm_k, eps = swiglu_x
        L += frag_swiglu_x.loads(groups, groups_per_warp, group_size, cta_y, shares)
        L += frag_swiglu_x.operands(groups, group_size, norm_k, eps, [xs_regs[g][0] for g in groups])
    for g in groups if not swiglu_x else ():  # x: element grp * group_size + 8 j (2 bytes each), then 32 elements
        # per block of 32 inputs
        L += [f"mov.u32 grp, {cta_y};",
              f"mad.lo.u32 grp, grp, {groups_per_warp}, {g};"]
        for cb in cbs:
            if x_splits:  # split nrow of head grp: [H, S, D] with D = group_size
                L += [f"mad.lo.u32 t32, grp, {x_splits}, nrow{cb};",
                      f"mul.lo.u32 t32, t32, {group_size};",
                      "mad.lo.u32 t32, j, 8, t32;"]
            else:
                L += [f"mul.lo.u32 t32, grp, {group_size};",
                      "mad.lo.u32 t32, j, 8, t32;"]
            if rows > 1 and not x_splits:
                L.append(f"mad.lo.u32 t32, nrow{cb}, kk, t32;")
            L += [f"mul.wide.u32 off, t32, {4 if x_f32 else 2};",
                  "add.u64 xa, $2, off;"]
            for b in range(blocks32):
                if x_f32:  # x[k .. k + 7] as floats, then pairs (k + 1 in the upper half, as bf16x2 holds them)
                    fl = [f"xf{g}_{b}_{e}" for e in range(8)]
                    L += [f"ld.global{'.cg' if grid_operands else ''}.v4.f32 {{{', '.join(fl[4 * h:4 * h + 4])}}}, "
                          f"[xa+{128 * b + 16 * h}];" for h in (0, 1)]
                    L += [f"cvt.rn.{mma_type}x2.f32 {xs_regs[g][cb][4 * b + e]}, {fl[2 * e + 1]}, {fl[2 * e]};"
                          for e in range(4)]
                else:
                    L.append(f"ld.global{'.cg' if grid_operands else ''}.v4.b32 "
                             f"{{{', '.join(xs_regs[g][cb][4 * b:4 * b + 4])}}}, [xa+{64 * b}];")
        if x_splits:  # the head's S log-sum-exps, then those of this lane's columns 2j, 2j + 1 (clamped to S - 1)
            L += [f"mul.lo.u32 t32, grp, {x_splits};", "mul.wide.u32 off, t32, 4;", "add.u64 xa, $8, off;"]
            L += [f"ld.global.f32 ls{g}_{n}, [xa+{4 * n}];" for n in range(x_splits)]
            for c in (0, 1):
                L += [f"mad.lo.u32 t32, j, 2, {c};", f"min.u32 t32, t32, {x_splits - 1};",
                      "mul.wide.u32 off, t32, 4;", "add.u64 pa, xa, off;",
                      f"ld.global.f32 ls{g}_{x_splits + c}, [pa];"]
    for g in groups:  # scales to fp32, zero points plus the magic value
        for t in tiles:
            gt = f"{g}_{t}"
            if dtype == torch.bfloat16:
                L += [f"mov.b32 tmp, {{zero16, s0h{gt}}};", f"mov.b32 sc0_{gt}, tmp;",
                      f"mov.b32 tmp, {{zero16, s1h{gt}}};", f"mov.b32 sc1_{gt}, tmp;"]
            else:
                L += [f"cvt.f32.f16 sc0_{gt}, s0h{gt};", f"cvt.f32.f16 sc1_{gt}, s1h{gt};"]
            L += [f"add.f32 zf{h}_{gt}, zf{h}_{gt}, {_f32(magic_value)};" for h in (0, 1)]
    # dep: one value from every load (see the docstring)
    L += ["mov.f32 dep, 0f00000000;"]
    for g in groups:
        for t in tiles:
            for v in range(words_per_lane // 4):
                L += [f"cvt.rn.f32.u32 t0, {words[g][t][4 * v]};", "add.f32 dep, dep, t0;"]
        for b in range(blocks32):
            lse = [f"ls{g}_{n}" for n in range(x_splits + 2)] if x_splits and b == 0 else []
            # fp32 x: a pair from each of the block's two loads (x_f32_loads_first)
            xs = [xs_regs[g][cb][4 * b + e] for cb in cbs for e in ((0, 2) if x_f32 and x_f32_loads_first else (0,))]
            for reg in xs + ([norm_regs[g][4 * b]] if norm else []) + lse:
                L += [f"mov.b32 t0, {reg};", "abs.f32 t0, t0;", "min.f32 t0, t0, 0f3F800000;",
                      "add.f32 dep, dep, t0;"]  # any bits, even NaN's, become a finite number (min of NaN gives 1.0)
        for t in tiles:
            L += [f"add.f32 dep, dep, sc0_{g}_{t};", f"add.f32 dep, dep, sc1_{g}_{t};",
                  f"add.f32 dep, dep, zf0_{g}_{t};", f"add.f32 dep, dep, zf1_{g}_{t};"]
    if norm:  # the sum(h^2) mma waits for every load too: it came first and, waiting for group 0's x, held the rest
        L += [f"mul.f32 sq{n}, dep, 0f00000000;" if norm_waits_for_loads else f"mov.f32 sq{n}, 0f00000000;"
              for n in range(4)]
    zero = "0f00000000"
    for g in groups:  # the products
        if norm:  # B = h * w, in place of the weight's registers
            L += [f"mul.rn.{mma_type}x2 {n}, {x}, {n};" for x, n in zip(xs_regs[g][0], norm_regs[g])]
        init = [f"mul.f32 {r}, dep, {zero};" if g == 0 else f"mov.f32 {r}, {zero};"
                for r in flat(accs) + flat(sums)]
        L += init
        operands = [norm_regs[g]] if norm else xs_regs[g]  # B of each column block
        for m in range(words_per_lane):
            b, h = divmod(m, 2)
            bs = [(operand[4 * b + 2 * h], operand[4 * b + 2 * h + 1]) for operand in operands]
            if norm:  # sum(h^2): A's registers at this block's inputs are B's, rows r0 and r0 + 8 alike
                h0, h1 = xs_regs[g][0][4 * b + 2 * h], xs_regs[g][0][4 * b + 2 * h + 1]
                L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{sq0, sq1, sq2, sq3}}, "
                         f"{{{h0}, {h0}, {h1}, {h1}}}, {{{h0}, {h1}}}, {{sq0, sq1, sq2, sq3}};")
            for t in tiles:
                w = words[g][t][m]
                L += [f"lop3.b32 e0, {w}, 0x000F000F, magic, 0xEA;",
                      f"shr.u32 tmp, {w}, 4;", "lop3.b32 e4, tmp, 0x000F000F, magic, 0xEA;",
                      f"shr.u32 tmp, {w}, 8;", "lop3.b32 e8, tmp, 0x000F000F, magic, 0xEA;",
                      f"shr.u32 tmp, {w}, 12;", "lop3.b32 e12, tmp, 0x000F000F, magic, 0xEA;"]
                for cb, (b0, b1) in zip(cbs, bs):  # one A operand, every column block's B
                    acc = ", ".join(accs[t][cb])
                    # D = C in place; columns 1 (acc1, acc3) repeat column 0, as every B column is x (M = 1)
                    L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{{acc}}}, "
                             f"{{e0, e4, e8, e12}}, {{{b0}, {b1}}}, {{{acc}}};")
            for cb, (b0, b1) in zip(cbs, bs):  # sum(x) over the block, once for all the warp's tiles
                total = ", ".join(sums[cb])
                L.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{mma_type}.{mma_type}.f32 {{{total}}}, "
                         f"{{one, one, one, one}}, {{{b0}, {b1}}}, {{{total}}};")
        if x_splits:  # the softmax weights of columns 2j, 2j + 1 (0 past S): ls{g}_S, ls{g}_{S+1} become them
            ls = [f"ls{g}_{n}" for n in range(x_splits)]
            L += [f"mov.f32 lmax, {ls[0]};", *[f"max.f32 lmax, lmax, {r};" for r in ls[1:]], "mov.f32 lsum, 0f00000000;"]
            for r in ls + [f"ls{g}_{x_splits}", f"ls{g}_{x_splits + 1}"]:
                L += [f"sub.f32 {r}, {r}, lmax;", f"mul.f32 {r}, {r}, {_f32(1.4426950408889634)};",
                      f"ex2.approx.f32 {r}, {r};"]
            L += [f"add.f32 lsum, lsum, {r};" for r in ls]
            for c in (0, 1):
                w = f"ls{g}_{x_splits + c}"
                L += [f"div.rn.f32 {w}, {w}, lsum;", f"mad.lo.u32 t32, j, 2, {c};",
                      f"setp.lt.u32 p, t32, {x_splits};", f"selp.f32 {w}, {w}, 0f00000000, p;"]
        for t in tiles:
            gt = f"{g}_{t}"
            L += [f"neg.f32 zf0_{gt}, zf0_{gt};", f"neg.f32 zf1_{gt}, zf1_{gt};"]
            for cb in cbs:
                a, y, xs = accs[t][cb], ys[t][cb], sums[cb]
                # y0, y1: rows r0, r0 + 8 of y's column 2j; y2, y3: of column 2j + 1 (M > 1 only)
                outputs = [(y[0], a[0], xs[0], "zf0", "sc0"), (y[1], a[2], xs[2], "zf1", "sc1"),
                           (y[2], a[1], xs[1], "zf0", "sc0"), (y[3], a[3], xs[3], "zf1", "sc1")]
                for n, (yr, ar, x_sum, zf, sc) in enumerate(outputs[:2 if rows == 1 else 4]):
                    L.append(f"fma.rn.f32 t0, {zf}_{gt}, {x_sum}, {ar};")
                    if x_splits:  # column 2j (n < 2) or 2j + 1, weighted by its split's share
                        L += [f"mul.f32 t1, {sc}_{gt}, ls{g}_{x_splits + n // 2};", f"fma.rn.f32 {yr}, t1, t0, {yr};"]
                    else:
                        L.append(f"fma.rn.f32 {yr}, {sc}_{gt}, t0, {yr};")
    if x_splits:  # the columns (splits) summed: a lane's two, then across the four lanes j of each groupID i
        for t in tiles:
            y = ys[t][0]
            L += [f"add.f32 {y[0]}, {y[0]}, {y[2]};", f"add.f32 {y[1]}, {y[1]}, {y[3]};"]
            for r in y[:2]:
                for mask in (1, 2):
                    L += [f"shfl.sync.bfly.b32 t0, {r}, {mask}, 0x1f, 0xffffffff;", f"add.f32 {r}, {r}, t0;"]
        rows = 1  # one row of y, stored by the lanes j = 0
    # partials[pid_k, m, r] for y rows m = 8 cb + 2j (y0, y1 at r0, r0 + 8) and 8 cb + 2j + 1 (y2, y3) below M
    store = "red.global.add.f32" if atomic else "st.global.f32"
    for t in tiles:
        for cb in cbs:
            y = ys[t][cb]
            L += [f"mov.u32 t32, {0 if atomic else cta_y};",
                  f"mul.lo.u32 t32, t32, {rows};",
                  "mad.lo.u32 t32, j, 2, t32;",
                  *([f"add.u32 t32, t32, {8 * cb};"] if cb else []),
                  "mul.lo.u32 t32, t32, $6;",
                  f"add.u32 t32, t32, r0_{t};",
                  "mul.wide.u32 off, t32, 4;",
                  "add.u64 pa, $5, off;",
                  f"setp.lt.u32 p, j, {(rows - 8 * cb + 1) // 2};",  # 8 cb + 2j < M
                  f"@p {store} [pa], {y[0]};",
                  f"@p {store} [pa+32], {y[1]};"]
            if rows > 1:
                L += ["mul.wide.u32 off, $6, 4;",  # the next row of y: N floats further
                      "add.u64 pa, pa, off;",
                      f"setp.lt.u32 p, j, {(rows - 8 * cb) // 2};",  # 8 cb + 2j + 1 < M
                      f"@p {store} [pa], {y[2]};",
                      f"@p {store} [pa+32], {y[3]};"]
    if norm and rows == 1:  # one thread per program stores its share of sum(h^2); every warp has the same
        L += ["mov.u32 tmp, %tid.x;", "setp.eq.u32 p, tmp, 0;", "@p st.global.f32 [$9], sq0;"]
    elif norm:  # D = x_r . x_n: row r's share is D[r][r], at lane (r, r / 2), element r % 2; warp 0 stores them
        L += ["setp.eq.u32 p, warp, 0;",
              "shr.u32 t32, i, 1;",
              "setp.eq.and.u32 p, j, t32, p;",
              f"setp.lt.and.u32 p, i, {rows}, p;",
              "and.b32 t32, i, 1;",
              "setp.eq.u32 q, t32, 0;",
              "selp.f32 t0, sq0, sq1, q;",
              "mul.wide.u32 off, i, 4;",
              "add.u64 na, $9, off;",
              "@p st.global.f32 [na], t0;"]
    L += frag_swiglu_x.zero_stores(zero_spans, 9)
    L += ["mov.b32 $0, 0;", "}"]
    return "\n".join(L)


def _f32(value: float) -> str:
    import struct
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


@triton.jit
def _finish_swiglu(gate, up, square_sum, offs, mask, y_ptr, K, eps, NORM: tl.constexpr):
    """Store silu(gate) * up [BLOCK] in y's dtype, gate and up (* the norm's rsqrt) rounded to it first, as the
    unfused steps (gate|up product, then model.llama.swiglu) round."""
    if NORM:
        inv_rms = tl.rsqrt(square_sum / K + eps)
        gate, up = gate * inv_rms, up * inv_rms
    dtype = y_ptr.dtype.element_ty
    gate, up = gate.to(dtype).to(tl.float32), up.to(dtype).to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
    tl.store(y_ptr + offs, (silu * up).to(dtype), mask=mask)


@triton.jit
def run_tile_asm(ASM: tl.constexpr, qw_ptr, x_ptr, s_ptr, z_ptr, out_ptr, nw_ptr, shares_ptr, N, G,
                 NUM_WARPS: tl.constexpr, EXTRA: tl.constexpr):
    """One `frag_gemv_asm` block per thread: its operands $1..$7 (words, x, scales, zeros, out, N, G), and with
    EXTRA two more: the norm weight ($8) and where this program's sum(h^2) share goes ($9) for `norm`, the split
    results' log-sum-exps ($8, $9 unused) for `x_splits`."""
    lanes = tl.zeros([32 * NUM_WARPS], dtype=tl.int64)
    operands = [lanes + qw_ptr.to(tl.int64), lanes + x_ptr.to(tl.int64), lanes + s_ptr.to(tl.int64),
                lanes + z_ptr.to(tl.int64), lanes + out_ptr.to(tl.int64), lanes.to(tl.int32) + N,
                lanes.to(tl.int32) + G]
    if EXTRA:
        tl.inline_asm_elementwise(ASM, "=r,l,l,l,l,l,r,r,l,l",
                                  operands + [lanes + nw_ptr.to(tl.int64), lanes + shares_ptr.to(tl.int64)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(ASM, "=r,l,l,l,l,l,r,r", operands, dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def run_tile_asm_three(ASM: tl.constexpr, qw_ptr, x_ptr, s_ptr, z_ptr, out_ptr, a_ptr, b_ptr, c_ptr, N, G,
                       NUM_WARPS: tl.constexpr):
    """`run_tile_asm` with three more operands, $8, $9, $10 (for `swiglu_x`: the shares and two zero spans)."""
    lanes = tl.zeros([32 * NUM_WARPS], dtype=tl.int64)
    operands = [lanes + qw_ptr.to(tl.int64), lanes + x_ptr.to(tl.int64), lanes + s_ptr.to(tl.int64),
                lanes + z_ptr.to(tl.int64), lanes + out_ptr.to(tl.int64), lanes.to(tl.int32) + N,
                lanes.to(tl.int32) + G, lanes + a_ptr.to(tl.int64), lanes + b_ptr.to(tl.int64),
                lanes + c_ptr.to(tl.int64)]
    tl.inline_asm_elementwise(ASM, "=r,l,l,l,l,l,r,r,l,l,l", operands, dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _frag_gemv(qw_ptr, x_ptr, s_ptr, z_ptr, y_ptr, partial_ptr, counter_ptr, res_ptr, nw_ptr, eps, N, G, SPLIT,
               ASM: tl.constexpr, NUM_WARPS: tl.constexpr, SPLIT_P2: tl.constexpr, RESIDUAL: tl.constexpr,
               ROWS: tl.constexpr = 1, NORM: tl.constexpr = False, GROUP_SIZE: tl.constexpr = 128,
               TILES: tl.constexpr = 1, SWIGLU: tl.constexpr = False, FINISH: tl.constexpr = True):
    """Partials [SPLIT, ROWS, N], then (NORM) each program's sum(h^2) shares, [SPLIT * ROWS * N + (pid_n * SPLIT +
    pid_k) * ROWS + row]. SWIGLU: N = 2I rows of a fused gate|up weight, y [ROWS, I] = silu(gate) * up; program
    pid_n holds gate and up rows pid_n * BLOCK_N / 2 onwards (ASM built with paired_halves)."""
    pid_n = tl.program_id(0)
    squares_ptr = partial_ptr + SPLIT * ROWS * N + pid_n * SPLIT * ROWS
    run_tile_asm(ASM, qw_ptr, x_ptr, s_ptr, z_ptr, partial_ptr, nw_ptr, squares_ptr + tl.program_id(1) * ROWS, N, G,
                 NUM_WARPS, NORM)
    if FINISH:  # else (a measurement) the partials, or the atomic sums, are left where the asm put them
        finish_row_tile(partial_ptr, squares_ptr, counter_ptr, y_ptr, res_ptr, eps, pid_n, N, G, SPLIT, SPLIT_P2,
                        16 * NUM_WARPS * TILES, RESIDUAL, ROWS, NORM, GROUP_SIZE, SWIGLU)


@triton.jit
def finish_row_tile(partial_ptr, squares_ptr, counter_ptr, y_ptr, res_ptr, eps, pid_n, N, G, SPLIT,
                    SPLIT_P2: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr, ROWS: tl.constexpr,
                    NORM: tl.constexpr, GROUP_SIZE: tl.constexpr, SWIGLU: tl.constexpr):
    """After a program's partials of row tile pid_n are stored: the last of its SPLIT programs to arrive adds them
    all up and stores y (see _frag_gemv), then resets the tile's counter."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    tl.debug_barrier()  # every lane's partial is written before the counter says so
    arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")
    if arrived == SPLIT - 1:
        add_partials(partial_ptr, squares_ptr, y_ptr, res_ptr, eps, pid_n, offs_n, n_mask, N, G, SPLIT, SPLIT_P2,
                     BLOCK_N, RESIDUAL, ROWS, NORM, GROUP_SIZE, SWIGLU, False)
        tl.atomic_xchg(counter_ptr + pid_n, 0)


@triton.jit
def add_partials(partial_ptr, squares_ptr, y_ptr, res_ptr, eps, pid_n, offs_n, n_mask, N, G, SPLIT,
                 SPLIT_P2: tl.constexpr, BLOCK_N: tl.constexpr, RESIDUAL: tl.constexpr, ROWS: tl.constexpr,
                 NORM: tl.constexpr, GROUP_SIZE: tl.constexpr, SWIGLU: tl.constexpr, PERSISTENT: tl.constexpr):
    """y of row tile pid_n (its outputs offs_n, n_mask) from its SPLIT partials [SPLIT, ROWS, N] (and sum(h^2)
    shares): the sum, then the norm's rsqrt, the SwiGLU ending or the residual add. PERSISTENT: the residual was
    written by this kernel's other programs (triton_int4_chain.py), so it is read from L2."""
    offs_s = tl.arange(0, SPLIT_P2)
    for m in tl.static_range(ROWS):
        square_sum = 0.0
        if NORM:
            square_sum = tl.sum(tl.load(squares_ptr + offs_s * ROWS + m, mask=offs_s < SPLIT, other=0.0,
                                        cache_modifier=".cg"), axis=0)
        if SWIGLU:
            offs_h = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            h_mask = offs_h < N // 2
            split_mask = (offs_s < SPLIT)[:, None] & h_mask[None, :]
            gate_ptrs = partial_ptr + (offs_s[:, None] * ROWS + m) * N + offs_h[None, :]
            gate = tl.sum(tl.load(gate_ptrs, mask=split_mask, other=0.0, cache_modifier=".cg"), axis=0)
            up = tl.sum(tl.load(gate_ptrs + N // 2, mask=split_mask, other=0.0, cache_modifier=".cg"), axis=0)
            _finish_swiglu(gate, up, square_sum, offs_h, h_mask, y_ptr + m * (N // 2), G * GROUP_SIZE, eps, NORM)
        else:
            parts = tl.load(partial_ptr + (offs_s[:, None] * ROWS + m) * N + offs_n[None, :],
                            mask=(offs_s < SPLIT)[:, None] & n_mask[None, :], other=0.0, cache_modifier=".cg")
            finish_output(tl.sum(parts, axis=0), square_sum, offs_n, n_mask, y_ptr + m * N, res_ptr + m * N,
                          G * GROUP_SIZE, eps, 1 if NORM else 0, RESIDUAL, PERSISTENT)


FRAG_MAX_M = 8  # rows of x: the columns of the mma's B operand
# 9..16 rows: a second B operand (column block) per A operand, the weights unpacked once for both (correct on the
# H200: tests/kernels/test_int4_rows.py -k sixteen; where ops sends them: ops.FRAG_ONE_CALL_MAX_N).
FRAG_KERNEL_MAX_M = 16
# Rows of x up to which the GEMV launches under PDL: one (batch-1 decode), as tested and timed on the H200. 2..8 rows
# (a verify step) are correct under it too (-k pdl runs 1 and 6 rows with this raised to 8: passed on the H200,
# results/pytest_gpu_chain_pdl_rows_h200.log) but not faster: 3B int4 speculative with the int4 1B draft at k = 5,
# verify step 2.86 ms at 1 against 2.84 at 8 (benchmarks/speculative_gpu.py --pdl-rows, one repeat each,
# results/speculative_h200_pdl_rows{1,8}.*), so it stays at 1.
PDL_MAX_ROWS = 1
FRAG_WORKSPACE_MAX = 1 << 24  # fp32 partial sums [split, M, N]: up to 64 MB (the 128k-vocab head at M = 8)


def frag_fits(N: int, G: int, num_warps: int, groups_per_warp: int, tiles_per_warp: int = 1, M: int = 1) -> bool:
    split, block_n = G // groups_per_warp, 16 * num_warps * tiles_per_warp
    return (N % block_n == 0 and G % groups_per_warp == 0
            and split * M * N + N // block_n * split * M <= FRAG_WORKSPACE_MAX
            and triton.next_power_of_2(split) * block_n <= 8192 and N // block_n <= 1 << 14)


_frag_tuner = TileTuner()


def default_config(N: int, G: int, M: int = 1) -> tuple[int, int, int] | None:
    """The default tile for a product of M rows with N outputs and G groups (measured best at 1 and 6 rows; 9..16
    rows: the fewest registers), None where none fits."""
    preferred = ([WIDE_CONFIG] if N >= WIDE_ROWS and M == 1 else [TWO_BLOCK_CONFIG] if M > FRAG_MAX_M
                 else [ROWS_WIDE_CONFIG] if N >= ROWS_WIDE_ROWS and M > 1 else [])
    for config in preferred + [DEFAULT_CONFIG]:
        if frag_fits(N, G, *config, M=M):
            return config
    return None


def frag_gemv(x: torch.Tensor, fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              config: tuple[int, int, int] | None = None, residual: torch.Tensor | None = None,
              norm_weight: torch.Tensor | None = None, eps: float = 0.0, swiglu: bool = False,
              reduction: str = "last") -> torch.Tensor:
    """x [M, K] bf16/fp16 (M <= 16, see FRAG_KERNEL_MAX_M) @ Wᵀ (+ residual [M, N]) -> [M, N] in
    x.dtype. fragments: int32
    [N/16, G, group_size/64, 32, 4] (`rows_to_fragments`); scales [G, N] (x's dtype) and zeros uint8 [G, N]: the
    row layout's transposed, so that a group's 16 rows are side by side (quant/format.py `fragment_scales_zeros`).
    `config`: (num_warps, groups per warp, row tiles per warp); default `default_config` where it fits, else the
    tuner's pick.
    M = 2..8 (a speculative verify step, small batches): the same mmas, ~1.4x the time of M = 1 at M = 6.
    `norm_weight` [K]: x is the residual stream h and each row of y = W (w * h) * rsqrt(mean(h^2) + eps), the RMSNorm
    before q|k|v and gate|up folded in (1..8 rows, correct on the H200).
    `swiglu`: the weight is a fused gate|up [2I, K]; returns silu(gate) * up [M, I] (no residual), saving the
    separate SwiGLU kernel and the round trip of gate|up through memory.
    At one row it launches with programmatic dependent launch where kernels/pdl.py says so (the default on Hopper):
    its weight loads overlap the previous kernel's tail.
    `reduction` (a measurement of what the cross-program reduction costs, benchmarks/latency_floor_gpu.py): "last"
    (the model's: the last program of a row tile adds the partials and finishes), "none" (returns the partials
    [SPLIT, M, N], unfinished) or "atomic" (every program adds its sums into fp32 [M, N] with red.global.add and
    returns it; it is the workspace, which the caller zeroes first to read a sum)."""
    assert reduction in ("last", "none", "atomic"), reduction
    M = x.shape[0]
    G, N = scales.shape
    assert 1 <= M <= FRAG_KERNEL_MAX_M and x.shape[1] == G * group_size, (x.shape, G, group_size)
    assert zeros.shape == (G, N) and scales.is_contiguous() and zeros.is_contiguous(), (zeros.shape, N, G)
    assert x.dtype in _TYPES and scales.dtype == x.dtype, (x.dtype, scales.dtype)
    assert fragments.shape == (N // 16, G, group_size // 64, 32, 4) and group_size % 64 == 0, fragments.shape
    assert residual is None or residual.shape == (M, N), (None if residual is None else residual.shape)
    assert norm_weight is None or (M <= FRAG_MAX_M and norm_weight.shape == (x.shape[1],) and norm_weight.dtype == x.dtype)
    x = x.contiguous()
    norm = norm_weight is not None
    assert not swiglu or (residual is None and N % 32 == 0), "swiglu: a fused gate|up weight, no residual"

    pdl = launch_mode(x.device) if M <= PDL_MAX_ROWS else 0

    def launch(c: tuple[int, int, int], pdl: int = pdl) -> torch.Tensor:
        warps, groups_per_warp, tiles_per_warp = c
        split = G // groups_per_warp
        y = torch.empty(M, N // 2 if swiglu else N, dtype=x.dtype, device=x.device)
        # the split GEMV's workspace, grown where M rows of partials need more (first call: before any graph capture)
        programs = N // (16 * warps * tiles_per_warp)
        partial, counter = _workspace.get(x.device, max(SPLIT_WORKSPACE, split * M * N + programs * split * M),
                                          1 << 14)
        _frag_gemv[(programs, split)](
            fragments, x, scales, zeros, y, partial, counter, x if residual is None else residual.contiguous(),
            norm_weight.contiguous() if norm else x, eps, N, G, split,
            ASM=frag_gemv_asm(warps, groups_per_warp, group_size, x.dtype, M, norm, tiles_per_warp, swiglu, pdl,
                              atomic=reduction == "atomic"),
            NUM_WARPS=warps, SPLIT_P2=triton.next_power_of_2(split), RESIDUAL=residual is not None, ROWS=M, NORM=norm,
            GROUP_SIZE=group_size, TILES=tiles_per_warp, SWIGLU=swiglu, FINISH=reduction == "last", num_warps=warps,
            launch_pdl=bool(pdl))
        if reduction == "none":
            return partial[:split * M * N].view(split, M, N)
        return partial[:M * N].view(M, N) if reduction == "atomic" else y

    if config is None:
        config = default_config(N, G, M)
    if config is not None:
        assert frag_fits(N, G, *config, M=M), config
        return launch(config)
    candidates = [c for c in FRAG_CONFIGS if frag_fits(N, G, *c, M=M)]
    assert candidates, f"no fragment-GEMV tile fits N={N}, G={G}, M={M}"
    # timed as launches of their own: back-to-back PDL launches of one kernel would overlap each other
    return launch(_frag_tuner.pick((x.device, N, G, group_size, x.dtype, M, residual is not None, norm, swiglu),
                                   lambda c: launch(c, pdl=0), candidates))


@triton.jit
def _dequantize_fragments(fr_ptr, s_ptr, z_ptr, w_ptr, N, K, G, GROUP_SIZE: tl.constexpr):
    """W [N, K] in w's dtype from the fragment layout, one [16 rows, GROUP_SIZE] tile (row tile t, group g) per
    program. Each weight is gathered from where `rows_to_fragments` put it: lane 4i + j, word m = 2s + h (chunk
    m // 4, place m % 4), nibble (r1?) + 2 (c // 2) + 4 (c % 2) for row 16t + 8 (r1?) + i and input
    GROUP_SIZE g + 32 s + 8 j + 4 h + c."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    r = tl.arange(0, 16)
    kk = tl.arange(0, GROUP_SIZE)
    half, i = r // 8, r % 8
    s, j, h, c = kk // 32, (kk % 32) // 8, (kk % 8) // 4, kk % 4
    lane = 4 * i[:, None] + j[None, :]
    word = 2 * s + h
    nibble = half[:, None] + (2 * (c // 2) + 4 * (c % 2))[None, :]
    chunks: tl.constexpr = GROUP_SIZE // 64
    words = tl.load(fr_ptr + (((t * G + g) * chunks + word[None, :] // 4) * 32 + lane) * 4 + word[None, :] % 4)
    levels = (words >> (4 * nibble)) & 0xF
    rows = 16 * t + r
    scale = tl.load(s_ptr + g * N + rows).to(tl.float32)
    zero = tl.load(z_ptr + g * N + rows).to(tl.float32)
    w = (levels.to(tl.float32) - zero[:, None]) * scale[:, None]
    tl.store(w_ptr + rows[:, None] * K + (g * GROUP_SIZE + kk)[None, :], w.to(w_ptr.dtype.element_ty))


def dequantize_fragments_triton(fragments: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                                dtype: torch.dtype) -> torch.Tensor:
    """The dense weight [N, K] in `dtype` (nn.Linear's layout) from the fragment layout, with scales and zeros
    [G, N] as `frag_gemv` takes them: what a prefill step multiplies by when the fragments are a layer's only
    copy (ops.int4_matmul_fragments, above 16 rows)."""
    G, N = scales.shape
    assert fragments.shape == (N // 16, G, group_size // 64, 32, 4), fragments.shape
    w = torch.empty(N, G * group_size, dtype=dtype, device=fragments.device)
    _dequantize_fragments[(N // 16, G)](fragments, scales, zeros, w, N, G * group_size, G, GROUP_SIZE=group_size,
                                        num_warps=4)
    return w

"""PTX pieces of `triton_int4_frag.frag_gemv_asm` for a down product that makes its own input from the gate|up
accumulator: x = silu(r gate) * (r up), with r = rsqrt(mean(h^2) + eps) of the RMSNorm before gate|up, and for
the zero stores that clear the accumulators earlier kernels of the layer left behind.

Why: in the accumulating decode (triton_int4_accumulate.py) gate|up adds its sums into an fp32 workspace, and a
small finishing kernel turned them into silu(gate) * up for down and zeroed the workspaces. That kernel is one
kernel boundary a layer (a wait for the whole previous kernel, then an L2 round trip) for 8192 values of work.
Here down's programs compute their own inputs after their PDL wait instead:
  - lane (i, j) needs x[k], x[k + 1] pairs for k = 32 b + 8 j + 2 e (b < group_size / 32, e < 4) of each of its
    warp's groups, the same pairs as the other 7 lanes with its j. So each of those 8 lanes computes a different
    eighth of them (`pairs` pairs: its own contiguous 2 * pairs inputs) and the pairs are exchanged with
    `shfl.sync.idx`, one per B register: 8x less arithmetic than every lane computing all of them;
  - the rsqrt's sum(h^2) comes from gate|up's per-program shares, a share per lane, added by butterfly shuffles;
  - the roundings are those of the finishing kernel (`triton_int4_frag._finish_swiglu`): r gate and r up to bf16,
    silu to bf16, the product to bf16. sigmoid is 1 / (1 + 2^(-g log2 e)) with ex2.approx and rcp.approx, their
    .ftz forms (one MUFU each; without .ftz ptxas wraps each in subnormal checks and rescaling).
The workspace can no longer be zeroed by its reader, since every row-tile program of down reads it; so each layer
has its own (triton_int4_accumulate.frag_accumulated_mlp), and layer l's down zeroes layer l - 1's and the q|k|v
accumulator that attention read (`zero_stores`), all after its wait.
"""

from __future__ import annotations

import math

LOG2E = 1.4426950408889634
ONE = "0f3F800000"
SOURCE_LANES = 8  # lanes (i, j) with i = 0..7 share their j's pairs


def f32(value: float) -> str:
    import struct
    return "0f%08X" % struct.unpack("<I", struct.pack("<f", value))[0]


def pairs_per_lane(group_size: int) -> int:
    """B registers (input pairs) of a group that each lane computes: a lane holds 2 * group_size / 16 of them."""
    pairs = group_size // 64
    assert group_size % 64 == 0 and pairs in (1, 2, 4), f"swiglu x: group size 64, 128 or 256, not {group_size}"
    return pairs


def registers(groups: range, group_size: int) -> list[str]:
    """Declarations of this lane's gate and up inputs, its computed pairs and the temporaries."""
    pairs = pairs_per_lane(group_size)
    floats = [f"sg{g}_{v}" for g in groups for v in range(2 * pairs)] + [f"su{g}_{v}" for g in groups
                                                                         for v in range(2 * pairs)]
    return [".reg .b32 own, pk, " + ", ".join([f"sl{q}" for q in range(SOURCE_LANES)]
                                             + [f"sc{g}_{p}" for g in groups for p in range(pairs)]) + ";",
            ".reg .b64 upoff;",
            ".reg .f32 ssum, sv, rinv, zf, " + ", ".join(floats) + ";"]


def loads(groups: range, groups_per_warp: int, group_size: int, cta_y: str, shares: int) -> list[str]:
    """After the wait: this lane's 2 * pairs gate inputs of each group ($2: the accumulator [2K] fp32, up K floats
    after gate; kk holds K) and as many up inputs, then its shares of sum(h^2) ($8: `shares` floats)."""
    pairs = pairs_per_lane(group_size)
    width = {1: "v2", 2: "v4", 4: "v4"}[pairs]
    L = [f"mul.lo.u32 t32, i, {pairs};",  # the lane's first pair: register P i of the group's 4 * blocks
         "shr.u32 tmp, t32, 2;",  # its block of 32 inputs
         "and.b32 t32, t32, 3;",
         "mul.lo.u32 own, t32, 2;",
         "mad.lo.u32 own, tmp, 32, own;",
         "mad.lo.u32 own, j, 8, own;",  # input 32 b + 8 j + 2 e of the group
         "mul.wide.u32 upoff, kk, 4;"]
    for g in groups:
        L += ["mov.u32 grp, " + cta_y + ";",
              f"mad.lo.u32 grp, grp, {groups_per_warp}, {g};",
              f"mad.lo.u32 t32, grp, {group_size}, own;",
              "mul.wide.u32 off, t32, 4;",
              "add.u64 xa, $2, off;",
              "add.u64 pa, xa, upoff;"]
        for name, base in ((f"sg{g}", "xa"), (f"su{g}", "pa")):
            regs = [f"{name}_{v}" for v in range(2 * pairs)]
            for start in range(0, 2 * pairs, 4):
                chunk = regs[start:start + 4]
                L.append(f"ld.global.{width}.f32 {{{', '.join(chunk)}}}, [{base}+{4 * start}];")
    L.append("mov.f32 ssum, 0f00000000;")
    for r in range(math.ceil(shares / 32)):
        L += [f"add.u32 t32, lane, {32 * r};",
              f"setp.lt.u32 p, t32, {shares};",
              "mov.f32 sv, 0f00000000;",
              "mul.wide.u32 off, t32, 4;",
              "add.u64 sa, $8, off;",
              "@p ld.global.f32 sv, [sa];",
              "add.f32 ssum, ssum, sv;"]
    return L


def _round_pair(low: str, high: str) -> list[str]:
    """low and high rounded to bf16 and back to fp32, in place."""
    return [f"cvt.rn.bf16x2.f32 pk, {high}, {low};", f"shl.b32 {low}, pk, 16;", f"and.b32 {high}, pk, 0xFFFF0000;"]


def _silu(value: str) -> list[str]:
    return [f"mul.f32 sv, {value}, {f32(-LOG2E)};", "ex2.approx.ftz.f32 sv, sv;", f"add.f32 sv, sv, {ONE};",
            "rcp.approx.ftz.f32 sv, sv;", f"mul.f32 {value}, {value}, sv;"]


def operands(groups: range, group_size: int, norm_k: int, eps: float, xs_regs: list[list[str]]) -> list[str]:
    """From the loaded inputs: the rsqrt, this lane's pairs of silu(r gate) * (r up) as bf16x2, then every B
    register of each group (xs_regs[g]) from the lane that computed it."""
    pairs = pairs_per_lane(group_size)
    L = []
    for mask in (16, 8, 4, 2, 1):
        L += [f"shfl.sync.bfly.b32 t0, ssum, {mask}, 0x1f, 0xffffffff;", "add.f32 ssum, ssum, t0;"]
    # mean = sum * (1 / K): div.rn would add a slow-path call (the finishing kernel's `/` is an approximate divide)
    L += [f"mul.f32 ssum, ssum, {f32(1.0 / norm_k)};", f"add.f32 ssum, ssum, {f32(eps)};",
          "rsqrt.approx.ftz.f32 rinv, ssum;"]
    for g in groups:
        for p in range(pairs):
            g0, g1, u0, u1 = f"sg{g}_{2 * p}", f"sg{g}_{2 * p + 1}", f"su{g}_{2 * p}", f"su{g}_{2 * p + 1}"
            L += [f"mul.f32 {r}, {r}, rinv;" for r in (g0, g1, u0, u1)]
            L += _round_pair(g0, g1) + _round_pair(u0, u1) + _silu(g0) + _silu(g1) + _round_pair(g0, g1)
            L += [f"mul.f32 {g0}, {g0}, {u0};", f"mul.f32 {g1}, {g1}, {u1};",
                  f"cvt.rn.bf16x2.f32 sc{g}_{p}, {g1}, {g0};"]
    L += [f"add.u32 sl{q}, j, {4 * q};" for q in range(SOURCE_LANES)]  # lane (q, j)
    for g in groups:
        L += [f"shfl.sync.idx.b32 {reg}, sc{g}_{r % pairs}, sl{r // pairs}, 0x1f, 0xffffffff;"
              for r, reg in enumerate(xs_regs[g])]
    return L


def zero_stores(spans: tuple[tuple[int, int], ...], first_operand: int) -> list[str]:
    """Zeros into `spans` ((n floats, rounds) at operands $first_operand on), n a multiple of 4: thread t of the
    grid's T stores 16 bytes at float 4 (t + T r) for r < rounds where that is below n (rounds = n / 4T rounded up,
    from the caller's grid)."""
    if not spans:
        return []
    L = ["mov.u32 t32, %nctaid.x;", "mov.u32 tmp, %ctaid.y;", "mov.u32 e0, %ctaid.x;",
         "mad.lo.u32 t32, tmp, t32, e0;",  # this program's index
         "mov.u32 tmp, %ntid.x;", "mov.u32 e0, %tid.x;", "mad.lo.u32 t32, t32, tmp, e0;",  # this thread's
         "mov.u32 e4, %nctaid.x;", "mov.u32 e8, %nctaid.y;", "mul.lo.u32 e4, e4, e8;",
         "mul.lo.u32 e4, e4, tmp;",  # threads in the grid
         "mov.f32 zf, 0f00000000;"]
    for s, (n, rounds) in enumerate(spans):
        assert n % 4 == 0, n
        for r in range(rounds):
            L += [f"mad.lo.u32 e8, e4, {r}, t32;", "mul.lo.u32 e8, e8, 4;", f"setp.lt.u32 p, e8, {n};",
                  "mul.wide.u32 off, e8, 4;", f"add.u64 pa, ${first_operand + s}, off;",
                  "@p st.global.v4.f32 [pa], {zf, zf, zf, zf};"]
    return L

"""A decoder layer's batch-1 products after attention, in one persistent kernel: o (+ residual), gate|up (RMSNorm,
SwiGLU ending), down (+ residual), then the next layer's q|k|v (RMSNorm), or the final norm and the head.

Why: at batch 1 each tensor-core GEMV (triton_int4_frag.py) is a kernel of a few microseconds, and about half of
that is its fixed cost: launch, a first DRAM round trip, the last program's reduction, the grid's end. On the H200
the 3B's o, gate|up, down and q|k|v GEMVs take 35.4 us a layer against 20.3 for copies of the same bytes, and a
token's 113 of them 1.05 ms (benchmarks/NOTES.md, session 8). Here one launch of as many programs as fit on the GPU
at once walks the four products' tiles in turn. A grid barrier separates them: each program counts its arrival
on a flag per phase, and the next phase's first tile of each warp requests its weights, scales and zeros before
it spins on that flag (triton_int4_frag.py `frag_gemv_asm`, pdl=4), so the next matrix streams in while the
last tiles of this one finish, which is what PDL does between kernels, here without the launch. The last group
program of a row tile adds its partials (spinning on the tile's counter); the others count their arrival and go on.

Measured slower than what it replaces (H200, benchmarks/int4_chain_gpu.py, results/int4_chain_h200.*): 48.7 us a 3B
layer against 34.3 for the four GEMVs under PDL; 3B int4 decode 571.7 tok/s against 783.3 (results/int4_h200_chain.*,
an earlier build: 50.4 us a layer). On 1, 2, 3 programs per SM a layer took 81.7, 58.4, 48.7 us: about 35 us that
more programs do not shorten (each phase's barrier, its last tiles' reductions, its first loads) plus 47 us / programs
per SM. So it is off (ops.int4_layer_chain); what it would take is in benchmarks/NOTES.md (session 9).

Every tile is computed by the same PTX as the standalone GEMV, and the partials of a row tile are added in the same
order (`add_partials`), so the outputs are the same bits as four `frag_gemv` calls
(tests/kernels/test_int4_chain.py). The grid must be co-resident (programs spin on each other), so it is sized
from the compiled kernel's registers and shared memory. CUDA only; elsewhere model/decode_chain.py runs the
four products one after another.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from llmpress.kernels.ops import ChainProduct
from llmpress.kernels.pdl import gdc_wait, launch_mode, pdl_start
from llmpress.kernels.triton_int4 import _workspace
from llmpress.kernels.triton_int4_frag import SPIN_LIMIT, add_partials, default_config, frag_fits, frag_gemv_asm
from llmpress.kernels.triton_int4_rows_split import SPLIT_WORKSPACE

FINISH_SPIN_LIMIT = tl.constexpr(SPIN_LIMIT)  # polls of a tile's counter by the program adding its partials

PHASES = 4
FLAG_SLOTS = 256  # layers whose chains may be in flight at once, each with its own PHASES arrival flags
MAX_PROGRAMS_PER_SM = 4  # more resident programs than this did not fit the union kernel's registers anyway
# L2 prefetches of each phase's weights two phases ahead (`_prefetch`). Off: slower in both runs that timed it on the
# H200 (benchmarks/int4_chain_gpu.py, 3B layer: 50.4 against 48.1 us, then 48.7 against 46.7, results/int4_chain_h200.*)
prefetch = False


@triton.jit
def _phase(qw_ptr, x_ptr, s_ptr, z_ptr, y_ptr, res_ptr, nw_ptr, eps, N, G, SPLIT, partial_ptr, counter_ptr,
           wait_ptr, pid, programs, ASM: tl.constexpr, NUM_WARPS: tl.constexpr, TILES: tl.constexpr,
           SPLIT_P2: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
           GROUP_SIZE: tl.constexpr):
    """This program's tiles of one product: (row-tile program, group program) pairs pid, pid + programs, ...
    The first phase's tiles wait for the previous kernel (griddepcontrol), the others for every program's arrival
    on wait_ptr (the previous phase's flag)."""
    BLOCK_N: tl.constexpr = 16 * NUM_WARPS * TILES
    tiles_n = N // BLOCK_N
    lanes = tl.zeros([32 * NUM_WARPS], dtype=tl.int64)
    for item in range(pid, tiles_n * SPLIT, programs):
        pid_n = item % tiles_n
        pid_k = item // tiles_n
        squares_ptr = partial_ptr + SPLIT * N + pid_n * SPLIT
        operands = [lanes + qw_ptr.to(tl.int64), lanes + x_ptr.to(tl.int64), lanes + s_ptr.to(tl.int64),
                    lanes + z_ptr.to(tl.int64), lanes + partial_ptr.to(tl.int64), lanes.to(tl.int32) + N,
                    lanes.to(tl.int32) + G]
        grid = [lanes.to(tl.int32) + pid_n, lanes.to(tl.int32) + pid_k, lanes + wait_ptr.to(tl.int64),
                lanes.to(tl.int32) + programs]
        if NORM:
            tl.inline_asm_elementwise(ASM, "=r,l,l,l,l,l,r,r,l,l,r,r,l,r",
                                      operands + [lanes + nw_ptr.to(tl.int64),
                                                  lanes + (squares_ptr + pid_k).to(tl.int64)] + grid,
                                      dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(ASM, "=r,l,l,l,l,l,r,r,r,r,l,r", operands + grid, dtype=tl.int32,
                                      is_pure=False, pack=1)
        # N through an asm block with side effects: the finishing step's [SPLIT, BLOCK_N] offsets from N then cannot
        # be hoisted out of the loop, where they would stay live through the tile's asm (+76 registers at gate|up).
        # Declared a multiple of 16, as the standalone kernel's N is specialized: without it Triton laid the partials
        # out differently and added them in another order (1 element of h2 in 1024 differed, H200)
        n_here = tl.multiple_of(tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [N], dtype=tl.int32,
                                                          is_pure=False, pack=1), 16)
        tl.debug_barrier()  # every lane's partial is written before the counter says so
        if pid_k == SPLIT - 1:
            # The tile's last group program adds its partials (not the last to arrive, as in the standalone kernel):
            # the others then only count their arrival and go on, without waiting for the atomic's answer. These
            # are each program's last tiles of the phase (pid_k is the slow index), so what they wait for comes
            # earlier in every program's walk: no program waits on one that waits on it.
            polls = 0
            while tl.atomic_add(counter_ptr + pid_n, 0, sem="acquire") < SPLIT - 1 and polls < FINISH_SPIN_LIMIT:
                polls += 1
            if polls == FINISH_SPIN_LIMIT:  # a trap rather than a hang
                tl.inline_asm_elementwise("trap; mov.b32 $0, 0;", "=r,r", [polls], dtype=tl.int32, is_pure=False,
                                          pack=1)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            add_partials(partial_ptr, squares_ptr, y_ptr, res_ptr, eps, pid_n, offs_n, offs_n < n_here, n_here, G,
                         SPLIT, SPLIT_P2, BLOCK_N, RESIDUAL, 1, NORM, GROUP_SIZE, SWIGLU, True)
            tl.atomic_xchg(counter_ptr + pid_n, 0)
        else:
            tl.atomic_add(counter_ptr + pid_n, 1, sem="release")


@triton.jit
def _arrive(arrive_ptr, FIRST: tl.constexpr):
    """This program's arrival on a phase's flag, once its tiles are stored; returns the arrivals before it."""
    if FIRST:  # a program without tiles there has not waited yet: no flag moves before the previous kernel is done
        gdc_wait()
    tl.debug_barrier()  # every store of this program's tiles before its arrival
    return tl.atomic_add(arrive_ptr, 1, sem="release")


@triton.jit
def _prefetch(qw_ptr, N, G, SPLIT, pid, programs, NUM_WARPS: tl.constexpr, TILES: tl.constexpr,
              GROUPS_PER_WARP: tl.constexpr, GROUP_SIZE: tl.constexpr, PAIRED: tl.constexpr, ON: tl.constexpr):
    """Ask L2 for the weight words of this program's tiles of one product (cp.async.bulk.prefetch, which takes no
    registers and returns nothing): a tile's loads then wait on L2 rather than DRAM, and the DRAM queue holds a whole
    phase's requests instead of what the resident programs' registers have room for. A tile (pid_n, pid_k) reads
    NUM_WARPS * TILES row tiles (gate|up: half of them from each half), GROUPS_PER_WARP groups of each: one
    contiguous run of words per row tile."""
    if not ON:
        return
    ROW_TILES: tl.constexpr = NUM_WARPS * TILES
    WORDS_PER_GROUP: tl.constexpr = GROUP_SIZE // 64 * 128  # int32 of one row tile's group: chunks x 32 lanes x 4
    t = tl.arange(0, 32 * NUM_WARPS)  # thread t < ROW_TILES asks for row tile t
    tiles_n = N // (16 * ROW_TILES)
    for item in range(pid, tiles_n * SPLIT, programs):
        pid_n = item % tiles_n
        pid_k = item // tiles_n
        if PAIRED:
            row_tile = pid_n * (ROW_TILES // 2) + t % (ROW_TILES // 2) + (t // (ROW_TILES // 2)) * (N // 32)
        else:
            row_tile = pid_n * ROW_TILES + t
        words = qw_ptr + (row_tile.to(tl.int64) * G + pid_k * GROUPS_PER_WARP) * WORDS_PER_GROUP
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; "
            f"@p cp.async.bulk.prefetch.L2.global [$1], {GROUPS_PER_WARP * WORDS_PER_GROUP * 4}; mov.b32 $0, 0; }}",
            "=r,l,r", [words.to(tl.int64), (t < ROW_TILES).to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _chain(x0_ptr, res0_ptr, qw0, s0, z0, y0_ptr,
           qw1, s1, z1, nw1, y1_ptr,
           qw2, s2, z2, y2_ptr,
           qw3, s3, z3, nw3, y3_ptr,
           eps1, eps3, N0, G0, SPLIT0, N1, G1, SPLIT1, N2, G2, SPLIT2, N3, G3, SPLIT3,
           partial_ptr, counter_ptr, flag_ptr,
           ASM0: tl.constexpr, ASM1: tl.constexpr, ASM2: tl.constexpr, ASM3: tl.constexpr,
           TILES0: tl.constexpr, TILES1: tl.constexpr, TILES2: tl.constexpr, TILES3: tl.constexpr,
           SPLIT_P2_0: tl.constexpr, SPLIT_P2_1: tl.constexpr, SPLIT_P2_2: tl.constexpr, SPLIT_P2_3: tl.constexpr,
           GPW0: tl.constexpr, GPW1: tl.constexpr, GPW2: tl.constexpr, GPW3: tl.constexpr, PREFETCH: tl.constexpr,
           NUM_WARPS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_NEXT: tl.constexpr, PDL: tl.constexpr):
    """y0 = res0 + o(x0); y1 = swiglu(gate_up(norm1(y0))); y2 = y0 + down(y1); (HAS_NEXT) y3 = next(norm3(y2)).
    L2 prefetches run two phases ahead of the tiles (at most gate|up and down, ~38 MB at the 3B's shapes)."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    _prefetch(qw0, N0, G0, SPLIT0, pid, programs, NUM_WARPS, TILES0, GPW0, GROUP_SIZE, False, PREFETCH)
    _prefetch(qw1, N1, G1, SPLIT1, pid, programs, NUM_WARPS, TILES1, GPW1, GROUP_SIZE, True, PREFETCH)
    _phase(qw0, x0_ptr, s0, z0, y0_ptr, res0_ptr, x0_ptr, 0.0, N0, G0, SPLIT0, partial_ptr, counter_ptr,
           flag_ptr, pid, programs, ASM0, NUM_WARPS, TILES0, SPLIT_P2_0, True, False, False, GROUP_SIZE)
    _prefetch(qw2, N2, G2, SPLIT2, pid, programs, NUM_WARPS, TILES2, GPW2, GROUP_SIZE, False, PREFETCH)
    _arrive(flag_ptr, True)
    _phase(qw1, y0_ptr, s1, z1, y1_ptr, y0_ptr, nw1, eps1, N1, G1, SPLIT1, partial_ptr, counter_ptr,
           flag_ptr, pid, programs, ASM1, NUM_WARPS, TILES1, SPLIT_P2_1, False, True, True, GROUP_SIZE)
    if HAS_NEXT:
        _prefetch(qw3, N3, G3, SPLIT3, pid, programs, NUM_WARPS, TILES3, GPW3, GROUP_SIZE, False, PREFETCH)
    _arrive(flag_ptr + 1, False)
    _phase(qw2, y1_ptr, s2, z2, y2_ptr, y0_ptr, y1_ptr, 0.0, N2, G2, SPLIT2, partial_ptr, counter_ptr,
           flag_ptr + 1, pid, programs, ASM2, NUM_WARPS, TILES2, SPLIT_P2_2, True, False, False, GROUP_SIZE)
    last = _arrive(flag_ptr + 2, False)
    if HAS_NEXT:
        _phase(qw3, y2_ptr, s3, z3, y3_ptr, y2_ptr, nw3, eps3, N3, G3, SPLIT3, partial_ptr, counter_ptr,
               flag_ptr + 2, pid, programs, ASM3, NUM_WARPS, TILES3, SPLIT_P2_3, False, True, False, GROUP_SIZE)
        last = _arrive(flag_ptr + 3, False)
    if last == programs - 1:  # every program has passed every wait: the flags are free for this layer's next step
        for phase in tl.static_range(4):
            tl.atomic_xchg(flag_ptr + phase, 0)


_flags: dict[torch.device, torch.Tensor] = {}
_grid_sizes: dict[tuple, int] = {}


def _phase_setup(product: ChainProduct, x: torch.Tensor, group_size: int, norm: bool, swiglu: bool, pdl: int):
    G, N = product.scales.shape
    config = default_config(N, G, 1)
    assert config is not None and config[0] == 4 and frag_fits(N, G, *config), (N, G, config)
    warps, groups_per_warp, tiles = config
    split = G // groups_per_warp
    asm = frag_gemv_asm(warps, groups_per_warp, group_size, x.dtype, 1, norm, tiles, swiglu, pdl, grid_operands=True)
    return N, G, split, asm, tiles, triton.next_power_of_2(split), groups_per_warp


def frag_chain(x: torch.Tensor, residual: torch.Tensor, o: ChainProduct, gate_up: ChainProduct, down: ChainProduct,
               next_product: ChainProduct | None, group_size: int, layer: int = 0,
               programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: attention's output [1, K], residual: the stream h [1, H]. Returns (h2, next) with h1 = h + o(x),
    h2 = h1 + down(silu(gate) * up) over gate|up(norm(h1)), next = next_product(its norm(h2)) (None without it).
    `layer` picks the arrival flags (layers in flight at once need their own); `programs` overrides the grid (at
    most `chain_grid`, what is co-resident)."""
    args, constants, h2, out = _launch_arguments(x, residual, o, gate_up, down, next_product, group_size, layer)
    resident = co_resident_programs(args, constants, x.device)
    grid = resident if programs is None else min(programs, resident)
    _chain[(grid,)](*args, **constants, launch_pdl=bool(constants["PDL"]))
    return h2, (out if next_product is not None else None)


def chain_grid(x: torch.Tensor, residual: torch.Tensor, o: ChainProduct, gate_up: ChainProduct, down: ChainProduct,
               next_product: ChainProduct | None, group_size: int) -> int:
    """The programs `frag_chain` launches for these shapes by default (compiles the kernel if it is not yet)."""
    args, constants, _, _ = _launch_arguments(x, residual, o, gate_up, down, next_product, group_size, 0)
    return co_resident_programs(args, constants, x.device)


def _launch_arguments(x, residual, o, gate_up, down, next_product, group_size, layer):
    """The kernel's arguments and constants, with its output tensors h2 and next (h2 itself without a next)."""
    assert x.shape[0] == 1 and residual.shape[0] == 1 and x.is_cuda, (x.shape, residual.shape)
    assert gate_up.norm_weight is not None and (next_product is None or next_product.norm_weight is not None)
    pdl = launch_mode(x.device)
    phase0 = _phase_setup(o, x, group_size, False, False, 3 if pdl else 0)
    phase1 = _phase_setup(gate_up, x, group_size, True, True, 4)
    phase2 = _phase_setup(down, x, group_size, False, False, 4)
    phase3 = _phase_setup(next_product, x, group_size, True, False, 4) if next_product is not None else phase2
    phases = (phase0, phase1, phase2, phase3)
    H, inner = phase0[0], phase1[0] // 2
    assert residual.shape[1] == H and down.scales.shape[1] == H and down.scales.shape[0] * group_size == inner
    h1 = torch.empty(1, H, dtype=x.dtype, device=x.device)
    act = torch.empty(1, inner, dtype=x.dtype, device=x.device)
    h2 = torch.empty(1, H, dtype=x.dtype, device=x.device)
    out = torch.empty(1, phase3[0], dtype=x.dtype, device=x.device) if next_product is not None else h2
    need = max(split * N + N // (64 * tiles) * split for N, _, split, _, tiles, _, _ in phases)
    partial, counter = _workspace.get(x.device, max(SPLIT_WORKSPACE, need), 1 << 14)
    flags = _flags.get(x.device)
    if flags is None:
        flags = _flags[x.device] = torch.zeros(FLAG_SLOTS * PHASES, dtype=torch.int32, device=x.device)
    nxt = next_product or down
    args = (x.contiguous(), residual.contiguous(), o.fragments, o.scales, o.zeros, h1,
            gate_up.fragments, gate_up.scales, gate_up.zeros, gate_up.norm_weight, act,
            down.fragments, down.scales, down.zeros, h2,
            nxt.fragments, nxt.scales, nxt.zeros, nxt.norm_weight if next_product is not None else gate_up.norm_weight,
            out, gate_up.eps, nxt.eps, *[v for phase in phases for v in phase[:3]],
            partial, counter, flags[(layer % FLAG_SLOTS) * PHASES:])
    constants = dict(ASM0=phase0[3], ASM1=phase1[3], ASM2=phase2[3], ASM3=phase3[3],
                     TILES0=phase0[4], TILES1=phase1[4], TILES2=phase2[4], TILES3=phase3[4],
                     SPLIT_P2_0=phase0[5], SPLIT_P2_1=phase1[5], SPLIT_P2_2=phase2[5], SPLIT_P2_3=phase3[5],
                     GPW0=phase0[6], GPW1=phase1[6], GPW2=phase2[6], GPW3=phase3[6], PREFETCH=prefetch,
                     NUM_WARPS=4, GROUP_SIZE=group_size, HAS_NEXT=next_product is not None, PDL=pdl, num_warps=4)
    return args, constants, h2, out


def co_resident_programs(args: tuple, constants: dict, device: torch.device) -> int:
    """How many programs of this build of the kernel fit on the GPU at once (registers, shared memory, threads):
    the persistent grid, which must not exceed it (its programs wait for each other)."""
    key = (device, tuple(sorted((k, v) for k, v in constants.items())))
    if key not in _grid_sizes:
        kernel = _chain.warmup(*args, **constants, grid=(1,), launch_pdl=bool(constants["PDL"]))
        kernel._init_handles()  # n_regs is known once the binary is loaded
        props = torch.cuda.get_device_properties(device)
        threads = 32 * constants["num_warps"]
        # (Hopper's values where an older torch does not report them)
        by_registers = getattr(props, "regs_per_multiprocessor", 65536) // max(1, kernel.n_regs * threads)
        shared = kernel.metadata.shared
        by_shared = (getattr(props, "shared_memory_per_multiprocessor", 228 << 10) // shared if shared
                     else MAX_PROGRAMS_PER_SM)
        by_threads = getattr(props, "max_threads_per_multi_processor", 2048) // threads
        per_sm = max(1, min(MAX_PROGRAMS_PER_SM, by_registers, by_shared, by_threads))
        _grid_sizes[key] = per_sm * props.multi_processor_count
    return _grid_sizes[key]

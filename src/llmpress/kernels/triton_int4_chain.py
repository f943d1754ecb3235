"""A decoder layer's batch-1 products after attention, in one persistent kernel: o (+ residual), gate|up (RMSNorm,
SwiGLU ending), down (+ residual), then the next layer's q|k|v (RMSNorm), or the final norm and the head.

Why: at batch 1 each tensor-core GEMV (triton_int4_frag.py) is a kernel of a few microseconds, and about half of
that is its fixed cost: launch, a first DRAM round trip, the last program's reduction, the grid's end. On the H200
the 3B's o, gate|up, down and q|k|v GEMVs take 34.3 us a layer under PDL, where copies of the same bytes in four
kernels take 20.3 (benchmarks/NOTES.md, sessions 8-9). Here one launch of as many programs as fit on the GPU at once
walks the four products' tiles in turn, and no product waits for the whole previous one: a tile of down, say, reads
the 256 inputs of its groups, made by two row tiles of gate|up, and waits only for those two tiles' ready flags
(its PTX spins on them after its weights, scales and zeros are requested: triton_int4_frag.py `frag_gemv_asm`,
pdl=4). The RMSNorm needs no grid-wide step: each tile's PTX makes its own share of sum(h^2), and the rsqrt comes
after the reduction. A row tile's last group program adds the tile's partials (spinning on its counter), then sets
the tile's ready flag; the other group programs count their arrival and go on.

Every tile is computed by the same PTX as the standalone GEMV, and the partials of a row tile are added in the same
order (`add_partials`), so the outputs are the same bits as four `frag_gemv` calls
(tests/kernels/test_int4_chain.py). The grid must be co-resident (programs spin on each other), so it is sized
from the compiled kernel's registers and shared memory. CUDA only; elsewhere model/decode_chain.py runs the
four products one after another (ops.layer_chain_reference).

Measured slower than what it replaces, so off (ops.int4_layer_chain). H200, benchmarks/int4_chain_gpu.py, a 3B
layer: 49.2 us (46.5 with 128 registers a thread, 4 programs per SM instead of 3: `max_registers`) against 34.3 for
the four GEMVs under PDL (results/int4_chain_flags_h200.*). The first build, with a grid barrier between the products
(commit 7e3424e and before), took 48.7 (results/int4_chain_h200.*; 3B int4 decode through it 571.7 tok/s against
783.3, int4_h200_chain.*). So the barriers were not what cost: on 1, 2, 3 programs per SM a layer takes 81.8, 56.9,
49.2 us, about 2.5-4 us per round of tiles a program walks (12 rounds at 3 per SM), since a program's next tile
requests its weights only after the last one is done, where the hardware overlapped independent GEMV programs
(benchmarks/NOTES.md, session 9).
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

SPIN_POLLS = tl.constexpr(SPIN_LIMIT)  # polls of a counter or flag by the program adding a tile's partials

PRODUCTS = 4
TILES_PER_PRODUCT = 1024  # row tiles of one product (ready flags and reduction counters each): the 128k head has 501
PHASES, MAX_TILES = tl.constexpr(PRODUCTS), tl.constexpr(TILES_PER_PRODUCT)  # the same, for the kernel
FLAG_SLOTS = 64  # layers whose chains may be in flight at once, each with its own flags
# per slot: each product's ready flags, then the count of programs done (padded: every slot 64-byte aligned, so all
# layers run one specialization of the kernel)
SLOT = PRODUCTS * TILES_PER_PRODUCT + 16
MAX_PROGRAMS_PER_SM = 4  # more resident programs than this did not fit the union kernel's registers anyway
# ptxas's register cap (None: its choice, 132 a thread at the 3B's shapes, 3 programs per SM; 128 fits 4, with a few
# spills: 46.5 against 49.2 us a 3B layer, results/int4_chain_flags_h200.*; its bits were not checked on the GPU)
max_registers: int | None = None


@triton.jit
def _spin_until_at_least(flag_ptr, target):
    """Wait (acquire) until the u32 at flag_ptr reaches `target` (a trap after SPIN_POLLS polls, not a hang)."""
    polls = 0
    while tl.atomic_add(flag_ptr, 0, sem="acquire") < target and polls < SPIN_POLLS:
        polls += 1
    if polls == SPIN_POLLS:
        tl.inline_asm_elementwise("trap; mov.b32 $0, 0;", "=r,r", [polls], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _phase(qw_ptr, x_ptr, s_ptr, z_ptr, y_ptr, res_ptr, nw_ptr, eps, N, G, SPLIT, partial_ptr, counter_ptr,
           ready_ptr, wait_ptr, res_wait_ptr, pid, programs, ASM: tl.constexpr, NUM_WARPS: tl.constexpr,
           TILES: tl.constexpr, GROUPS_PER_WARP: tl.constexpr, IN_TILE: tl.constexpr, RES_TILE: tl.constexpr,
           SPLIT_P2: tl.constexpr, RESIDUAL: tl.constexpr, NORM: tl.constexpr, SWIGLU: tl.constexpr,
           GROUP_SIZE: tl.constexpr):
    """This program's tiles of one product: (row-tile program, group program) pairs pid, pid + programs, ...
    A tile reads x inputs pid_k * GROUPS_PER_WARP * GROUP_SIZE onwards, made by the previous product's row tiles of
    IN_TILE outputs each: its PTX waits for their ready flags (from wait_ptr; the first product's waits for the
    previous kernel instead). The row tile's last group program adds the partials, after the ready flags of the
    residual's rows (RES_TILE a tile, from res_wait_ptr; 0: none to wait for), and sets the tile's ready flag."""
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
        first_input_tile = pid_k * (GROUPS_PER_WARP * GROUP_SIZE) // IN_TILE
        grid = [lanes.to(tl.int32) + pid_n, lanes.to(tl.int32) + pid_k,
                lanes + (wait_ptr + first_input_tile).to(tl.int64), lanes.to(tl.int32) + 1]
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
            # are each program's last tiles of the product (pid_k is the slow index), and every wait is for tiles
            # of earlier products or earlier in every program's walk: no program waits on one that waits on it.
            _spin_until_at_least(counter_ptr + pid_n, SPLIT - 1)
            if RES_TILE:  # the ready flags of the residual's rows
                for f in tl.static_range(max(1, BLOCK_N // RES_TILE)):
                    _spin_until_at_least(res_wait_ptr + pid_n * BLOCK_N // RES_TILE + f, 1)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            add_partials(partial_ptr, squares_ptr, y_ptr, res_ptr, eps, pid_n, offs_n, offs_n < n_here, n_here, G,
                         SPLIT, SPLIT_P2, BLOCK_N, RESIDUAL, 1, NORM, GROUP_SIZE, SWIGLU, True)
            tl.atomic_xchg(counter_ptr + pid_n, 0)
            tl.debug_barrier()  # every lane's outputs are stored before the flag says so
            tl.atomic_xchg(ready_ptr + pid_n, 1, sem="release")
        else:
            tl.atomic_add(counter_ptr + pid_n, 1, sem="release")


@triton.jit
def _chain(x0_ptr, res0_ptr, qw0, s0, z0, y0_ptr,
           qw1, s1, z1, nw1, y1_ptr,
           qw2, s2, z2, y2_ptr,
           qw3, s3, z3, nw3, y3_ptr,
           eps1, eps3, N0, G0, SPLIT0, N1, G1, SPLIT1, N2, G2, SPLIT2, N3, G3, SPLIT3,
           partial0, partial1, partial2, partial3, counter_ptr, flag_ptr,
           ASM0: tl.constexpr, ASM1: tl.constexpr, ASM2: tl.constexpr, ASM3: tl.constexpr,
           TILES0: tl.constexpr, TILES1: tl.constexpr, TILES2: tl.constexpr, TILES3: tl.constexpr,
           SPLIT_P2_0: tl.constexpr, SPLIT_P2_1: tl.constexpr, SPLIT_P2_2: tl.constexpr, SPLIT_P2_3: tl.constexpr,
           GPW0: tl.constexpr, GPW1: tl.constexpr, GPW2: tl.constexpr, GPW3: tl.constexpr,
           NUM_WARPS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_NEXT: tl.constexpr, PDL: tl.constexpr):
    """y0 = res0 + o(x0); y1 = swiglu(gate_up(norm1(y0))); y2 = y0 + down(y1); (HAS_NEXT) y3 = next(norm3(y2)).
    No product waits for the whole previous one: each tile waits for the row tiles its inputs come from."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    B0: tl.constexpr = 16 * NUM_WARPS * TILES0
    B1: tl.constexpr = 16 * NUM_WARPS * TILES1 // 2  # silu(gate) * up outputs of one gate|up row tile
    B2: tl.constexpr = 16 * NUM_WARPS * TILES2
    ready0, ready1, ready2, ready3 = flag_ptr, flag_ptr + MAX_TILES, flag_ptr + 2 * MAX_TILES, flag_ptr + 3 * MAX_TILES
    _phase(qw0, x0_ptr, s0, z0, y0_ptr, res0_ptr, x0_ptr, 0.0, N0, G0, SPLIT0, partial0, counter_ptr, ready0,
           ready0, ready0, pid, programs, ASM0, NUM_WARPS, TILES0, GPW0, GROUP_SIZE, 0, SPLIT_P2_0, True, False,
           False, GROUP_SIZE)
    gdc_wait()  # a program without tiles there has not waited yet: no flag is read before the previous kernel is done
    _phase(qw1, y0_ptr, s1, z1, y1_ptr, y0_ptr, nw1, eps1, N1, G1, SPLIT1, partial1, counter_ptr + MAX_TILES,
           ready1, ready0, ready0, pid, programs, ASM1, NUM_WARPS, TILES1, GPW1, B0, 0, SPLIT_P2_1, False, True,
           True, GROUP_SIZE)
    _phase(qw2, y1_ptr, s2, z2, y2_ptr, y0_ptr, y1_ptr, 0.0, N2, G2, SPLIT2, partial2, counter_ptr + 2 * MAX_TILES,
           ready2, ready1, ready0, pid, programs, ASM2, NUM_WARPS, TILES2, GPW2, B1, B0, SPLIT_P2_2, True, False,
           False, GROUP_SIZE)
    if HAS_NEXT:
        _phase(qw3, y2_ptr, s3, z3, y3_ptr, y2_ptr, nw3, eps3, N3, G3, SPLIT3, partial3, counter_ptr + 3 * MAX_TILES,
               ready3, ready2, ready2, pid, programs, ASM3, NUM_WARPS, TILES3, GPW3, B2, 0, SPLIT_P2_3, False, True,
               False, GROUP_SIZE)
    tl.debug_barrier()
    done = tl.atomic_add(flag_ptr + PHASES * MAX_TILES, 1, sem="acq_rel")
    if done == programs - 1:  # every program is past every wait: the flags are free for this layer's next step
        offs = tl.arange(0, MAX_TILES)
        for phase in tl.static_range(PHASES):
            tl.store(flag_ptr + phase * MAX_TILES + offs, tl.zeros([MAX_TILES], dtype=tl.int32))
        tl.atomic_xchg(flag_ptr + PHASES * MAX_TILES, 0)


_flags: dict[torch.device, torch.Tensor] = {}
_grid_sizes: dict[tuple, int] = {}


def _phase_setup(product: ChainProduct, x: torch.Tensor, group_size: int, norm: bool, swiglu: bool, pdl: int,
                 input_tile: int | None):
    """A product's shapes, tile and PTX; `input_tile`: outputs per row tile of the product its x comes from (None:
    x comes from the previous kernel)."""
    G, N = product.scales.shape
    config = default_config(N, G, 1)
    assert config is not None and config[0] == 4 and frag_fits(N, G, *config), (N, G, config)
    warps, groups_per_warp, tiles = config
    assert N // (16 * warps * tiles) <= TILES_PER_PRODUCT, N
    split = G // groups_per_warp
    inputs = groups_per_warp * group_size  # of one tile
    flags = 1 if input_tile is None else max(1, inputs // input_tile)
    assert input_tile is None or inputs % input_tile == 0 or input_tile % inputs == 0, (inputs, input_tile)
    asm = frag_gemv_asm(warps, groups_per_warp, group_size, x.dtype, 1, norm, tiles, swiglu, pdl, grid_operands=True,
                        flags=flags)
    return N, G, split, asm, tiles, triton.next_power_of_2(split), groups_per_warp


def frag_chain(x: torch.Tensor, residual: torch.Tensor, o: ChainProduct, gate_up: ChainProduct, down: ChainProduct,
               next_product: ChainProduct | None, group_size: int, layer: int = 0,
               programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: attention's output [1, K], residual: the stream h [1, H]. Returns (h2, next) with h1 = h + o(x),
    h2 = h1 + down(silu(gate) * up) over gate|up(norm(h1)), next = next_product(its norm(h2)) (None without it).
    `layer` picks the flags (layers in flight at once need their own); `programs` overrides the grid (at most
    `chain_grid`, what is co-resident)."""
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
    phase0 = _phase_setup(o, x, group_size, False, False, 3 if pdl else 0, None)
    phase1 = _phase_setup(gate_up, x, group_size, True, True, 4, 64 * phase0[4])
    phase2 = _phase_setup(down, x, group_size, False, False, 4, 32 * phase1[4])
    phase3 = (_phase_setup(next_product, x, group_size, True, False, 4, 64 * phase2[4]) if next_product is not None
              else phase2)
    phases = (phase0, phase1, phase2, phase3)
    H, inner = phase0[0], phase1[0] // 2
    assert residual.shape[1] == H and down.scales.shape[1] == H and down.scales.shape[0] * group_size == inner
    h1 = torch.empty(1, H, dtype=x.dtype, device=x.device)
    act = torch.empty(1, inner, dtype=x.dtype, device=x.device)
    h2 = torch.empty(1, H, dtype=x.dtype, device=x.device)
    out = torch.empty(1, phase3[0], dtype=x.dtype, device=x.device) if next_product is not None else h2
    # each product its own partials and sum(h^2) shares, since they overlap in time
    sizes = [split * N + N // (64 * tiles) * split for N, _, split, _, tiles, _, _ in phases]
    starts = [sum(sizes[:i]) for i in range(PRODUCTS)]
    partial, counter = _workspace.get(x.device, max(SPLIT_WORKSPACE, sum(sizes)), PRODUCTS * TILES_PER_PRODUCT)
    flags = _flags.get(x.device)
    if flags is None:
        flags = _flags[x.device] = torch.zeros(FLAG_SLOTS * SLOT, dtype=torch.int32, device=x.device)
    nxt = next_product or down
    args = (x.contiguous(), residual.contiguous(), o.fragments, o.scales, o.zeros, h1,
            gate_up.fragments, gate_up.scales, gate_up.zeros, gate_up.norm_weight, act,
            down.fragments, down.scales, down.zeros, h2,
            nxt.fragments, nxt.scales, nxt.zeros, nxt.norm_weight if next_product is not None else gate_up.norm_weight,
            out, gate_up.eps, nxt.eps, *[v for phase in phases for v in phase[:3]],
            *[partial[start:] for start in starts], counter, flags[(layer % FLAG_SLOTS) * SLOT:])
    constants = dict(ASM0=phase0[3], ASM1=phase1[3], ASM2=phase2[3], ASM3=phase3[3],
                     TILES0=phase0[4], TILES1=phase1[4], TILES2=phase2[4], TILES3=phase3[4],
                     SPLIT_P2_0=phase0[5], SPLIT_P2_1=phase1[5], SPLIT_P2_2=phase2[5], SPLIT_P2_3=phase3[5],
                     GPW0=phase0[6], GPW1=phase1[6], GPW2=phase2[6], GPW3=phase3[6],
                     NUM_WARPS=4, GROUP_SIZE=group_size, HAS_NEXT=next_product is not None, PDL=pdl, num_warps=4)
    if max_registers is not None:
        constants["maxnreg"] = max_registers
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

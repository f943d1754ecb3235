"""Triton W4A16 matmul: y = x @ dequant(W), 4-bit weights in the GPTQ runtime layout, dequantized in registers.

Layout (see quant/format.py): qweight int32 [K/8, N], 8 input rows per word, row k at bits 4*(k % 8);
scales [G, N]; qzeros int32 [G, N/8] holding the real zero points (no GPTQ v1 offset), column n at
bits 4*(n % 8); g_idx int32 [K] (act-order) or None (group of row k = k // group_size).

Three kernels, one per regime:
- `gemv` (M <= GEMV_MAX_M, groups of whole blocks): decode is a stream of the packed weights, and at
  4 bits per weight the dequantization arithmetic, not the tensor cores, limits how fast that stream
  can be consumed. So it uses CUDA-core FMAs with no padding to a 16-row MMA, turns a nibble into a
  float with a bit trick instead of a (quarter-rate) conversion instruction, and applies the zero
  point and scale once per block of a group instead of once per weight.
- `gemm` (larger M, groups of whole blocks): prefill is bound by the matrix units; each block of
  packed rows is unpacked into a [BLOCK_K, BLOCK_N] tile and multiplied with one tl.dot.
- `general` (act-order g_idx, or groups that do not tile K): per-row group lookup; correct everywhere.
Split-K (small M) spreads K over programs to fill every SM; the last program of a tile sums the
partials, so no output zeroing or cast kernel is needed around the launch.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 4
SPLIT_K_MAX_M = 16  # split-K only where a tile's partial sums are small (decode and small batches)
MAX_SPLIT_K = 8

# (BLOCK_M or None for "M rounded up", BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)
GEMV_CONFIGS = [(None, n, k, s, w, st) for n, k, s, w, st in
                [(32, 128, 1, 4, 4), (64, 128, 1, 4, 4), (64, 128, 2, 4, 4), (128, 128, 2, 4, 3), (64, 128, 4, 4, 3),
                 (128, 128, 4, 4, 3), (256, 128, 4, 8, 3), (128, 128, 8, 4, 3), (32, 128, 2, 4, 4), (64, 64, 4, 4, 4),
                 (128, 64, 8, 4, 4), (256, 128, 8, 8, 3)]]
GEMM_CONFIGS = [(m, n, k, s, w, st) for m, n, k, s, w, st in
                [(16, 64, 128, 2, 4, 4), (16, 128, 128, 4, 4, 3), (16, 64, 128, 4, 4, 4), (32, 64, 128, 2, 4, 3),
                 (64, 64, 128, 1, 4, 3), (64, 128, 128, 1, 4, 3), (128, 128, 128, 1, 8, 3), (128, 256, 64, 1, 8, 3),
                 (128, 128, 64, 1, 4, 4)]]
GENERAL_CONFIGS = [(m, n, k, s, w, st) for m, n, k, s, w, st in
                   [(16, 64, 128, 1, 4, 3), (16, 64, 128, 4, 4, 3), (16, 128, 128, 2, 4, 3), (16, 64, 256, 8, 4, 3),
                    (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3), (128, 256, 64, 1, 8, 3)]]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # the Triton interpreter runs no inline PTX
FP32_MAGIC = tl.constexpr(0x4B000000)  # the fp32 bit pattern of 2**23: OR a nibble q into its mantissa to get 2**23 + q


def _configs(table):
    """triton.Config objects; BLOCK_M None (the gemv) means the kernel takes M rounded up to a power of 2."""
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s, **({"BLOCK_M": m} if m else {})},
                          num_warps=w, num_stages=st) for m, n, k, s, w, st in table]


@triton.jit
def _write_output(acc, y_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_ym, tile, pid_k, SPLIT_K):
    """Store a [BLOCK_M, BLOCK_N] fp32 tile. With split-K, every program stores its partial sum and the
    last one to arrive at this tile (an atomic counter, reset by that program) adds them up and stores.
    SPLIT_K may be a constexpr (a static branch) or a runtime value (fewer compiled variants)."""
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tile_offsets = offs_m[:, None] * N + offs_n[None, :]
        tl.store(partial_ptr + pid_k * M * N + tile_offsets, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the counter says so
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            total = tl.zeros_like(acc)
            for s in range(SPLIT_K):  # .cg: read from L2, where the other SMs' partials are
                total += tl.load(partial_ptr + s * M * N + tile_offsets, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counter_ptr + tile, 0)


@triton.jit
def _load_group(scales_ptr, qz_ptr, group, offs_n, N, n_mask):
    """Scale (fp32) and zero point (int32) vectors [BLOCK_N] of one quantization group."""
    scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zero = (tl.load(qz_ptr + group * (N // 8) + offs_n // 8, mask=n_mask, other=0) >> ((offs_n % 8) * 4)) & 0xF
    return scale, zero


@triton.jit
def _w4a16_gemv_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                     stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    """Each BLOCK_K slice of K lies inside one group (group_size % BLOCK_K == 0). Per block and column,
    sum_k x_k (q_k - z) s = s * sum_k x_k (q_k - z): the FMAs see exact integers q - z, the scale comes after."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 8)  # packed rows of the block
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        packed = tl.load(qw_ptr + (k0 // 8 + offs_p)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0,
                         eviction_policy="evict_first")  # streamed once: leave L2 to the activations
        scale, zero = _load_group(scales_ptr, qz_ptr, k0 // group_size, offs_n, N, n_mask)
        magic_zero = zero.to(tl.float32) + 8388608.0  # 2**23 + z
        block = tl.zeros([BLOCK_M, BLOCK_K // 8, BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(8):  # nibble j of packed row p is input row k0 + 8p + j
            levels = (((packed >> (4 * j)) & 0xF) | FP32_MAGIC).to(tl.float32, bitcast=True)  # 2**23 + q, exact
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 8 * offs_p + j)[None, :], mask=m_mask[:, None],
                        other=0.0).to(tl.float32)
            block += x[:, :, None] * (levels - magic_zero[None, :])[None, :, :]
        acc += tl.sum(block, axis=1) * scale[None, :]
    _write_output(acc, y_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_ym, pid_n, pid_k, SPLIT_K)


@triton.jit
def _w4a16_gemm_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                     stride_xm, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr):
    """Each BLOCK_K slice lies inside one group; its packed rows [BLOCK_K/8, BLOCK_N] unpack to a
    [BLOCK_K/8, 8, BLOCK_N] tile whose row-major reshape is exactly rows k0 .. k0 + BLOCK_K - 1."""
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid_mn // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_mn % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_K // 8)
    offs_k = tl.arange(0, BLOCK_K)
    shifts = tl.arange(0, 8) * 4
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        packed = tl.load(qw_ptr + (k0 // 8 + offs_p)[:, None] * N + offs_n[None, :], mask=n_mask[None, :], other=0)
        scale, zero = _load_group(scales_ptr, qz_ptr, k0 // group_size, offs_n, N, n_mask)
        levels = (packed[:, None, :] >> shifts[None, :, None]) & 0xF
        levels = tl.reshape(levels, (BLOCK_K, BLOCK_N))
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_mask[:, None], other=0.0)
        w = ((levels - zero[None, :]).to(tl.float32) * scale[None, :]).to(x.dtype)
        acc += tl.dot(x, w)
    _write_output(acc, y_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_ym, pid_mn, pid_k, SPLIT_K)


@triton.jit
def _w4a16_general_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K,
                        group_size, stride_xm, stride_ym, HAS_GIDX: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """Any group layout: each row's group is looked up (g_idx) or computed, so scales and zeros are
    gathered per element. The path for act-order checkpoints and groups that do not tile K."""
    pid_mn = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid_mn // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_mn % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    zero_shift = (offs_n % 8) * 4
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        kn_mask = k_mask[:, None] & n_mask[None, :]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # Each int32 holds 8 consecutive rows: 8 threads read the same word, served from L1.
        packed = tl.load(qw_ptr + (offs_k[:, None] // 8) * N + offs_n[None, :], mask=kn_mask, other=0)
        levels = (packed >> ((offs_k[:, None] % 8) * 4)) & 0xF
        if HAS_GIDX:
            groups = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
        else:
            groups = offs_k // group_size
        scales = tl.load(scales_ptr + groups[:, None] * N + offs_n[None, :], mask=kn_mask, other=0.0)
        zeros = (tl.load(qz_ptr + groups[:, None] * (N // 8) + offs_n[None, :] // 8, mask=kn_mask, other=0)
                 >> zero_shift[None, :]) & 0xF
        w = ((levels - zeros).to(tl.float32) * scales.to(tl.float32)).to(x.dtype)
        acc += tl.dot(x, w)
    _write_output(acc, y_ptr, partial_ptr, counter_ptr, offs_m, offs_n, M, N, stride_ym, pid_mn, pid_k, SPLIT_K)


def _prune_split_k(configs, named_args, **kwargs):
    """Split-K only for small M (its partials live in a workspace sized for that), and never more
    splits than K has blocks."""
    M, K = named_args["M"], named_args["K"]
    kept = [c for c in configs if c.kwargs["SPLIT_K"] == 1 or
            (M <= SPLIT_K_MAX_M and K >= c.kwargs["BLOCK_K"] * c.kwargs["SPLIT_K"])]
    return kept or configs[:1]


_PRUNE = {"early_config_prune": _prune_split_k}


@triton.autotune(configs=_configs(GEMV_CONFIGS), key=["M", "N", "K"], prune_configs_by=_PRUNE)
@triton.jit
def _w4a16_gemv(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                stride_xm, stride_ym, M_POW2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                SPLIT_K: tl.constexpr):
    _w4a16_gemv_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                     stride_xm, stride_ym, M_POW2, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.autotune(configs=_configs(GEMM_CONFIGS), key=["M_BUCKET", "N", "K"], prune_configs_by=_PRUNE)
@triton.jit
def _w4a16_gemm(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                stride_xm, stride_ym, M_BUCKET, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    _w4a16_gemm_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                     stride_xm, stride_ym, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


@triton.autotune(configs=_configs(GENERAL_CONFIGS), key=["M_BUCKET", "N", "K"], prune_configs_by=_PRUNE)
@triton.jit
def _w4a16_general(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K, group_size,
                   stride_xm, stride_ym, M_BUCKET, HAS_GIDX: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    _w4a16_general_body(x_ptr, qw_ptr, scales_ptr, qz_ptr, gidx_ptr, y_ptr, partial_ptr, counter_ptr, M, N, K,
                        group_size, stride_xm, stride_ym, HAS_GIDX, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)


class _SplitKWorkspace:
    """Per device: fp32 partial sums [MAX_SPLIT_K, M, N] and one arrival counter per output tile.
    Counters start at zero and every split-K launch leaves them at zero, so one zeroing at
    allocation serves every later call (and CUDA-graph replays). Shared by every call on the device:
    split-K launches must not run concurrently on two streams (ours run on one)."""

    def __init__(self):
        self._buffers: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        partial, counter = self._buffers.get(device, (None, None))
        if partial is None or partial.numel() < numel or counter.numel() < tiles:
            partial = torch.empty(max(numel, 1 << 20), dtype=torch.float32, device=device)
            counter = torch.zeros(max(tiles, 1 << 14), dtype=torch.int32, device=device)
            self._buffers[device] = (partial, counter)
        return partial, counter


_workspace = _SplitKWorkspace()


def kernel_family(M: int, K: int, group_size: int, has_gidx: bool, block_k: int = 128) -> str:
    """Which kernel serves this call: gemv, gemm (both need groups that tile K) or general."""
    if has_gidx or group_size % block_k or K % block_k:
        return "general"
    return "gemv" if M <= GEMV_MAX_M else "gemm"


def int4_matmul_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
                       g_idx: torch.Tensor | None, group_size: int, config: dict | None = None) -> torch.Tensor:
    """x: [M, K] fp16/bf16; qweight: int32 [K/8, N]; scales: [G, N]; qzeros: int32 [G, N/8]. Returns [M, N] in x.dtype.

    `config` (benchmarks) bypasses the autotuner: {"family", "BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K",
    "num_warps", "num_stages"}."""
    M, K = x.shape
    N = qweight.shape[1]
    assert x.dtype in (torch.float16, torch.bfloat16), x.dtype
    assert qweight.dtype == torch.int32 and qweight.shape[0] * 8 == K and qzeros.shape[1] * 8 == N, (qweight.shape, qzeros.shape)
    assert scales.shape == (qzeros.shape[0], N) and N % 8 == 0, (scales.shape, N)
    assert x.stride(1) == 1 and qweight.is_contiguous() and scales.is_contiguous() and qzeros.is_contiguous()
    has_gidx = g_idx is not None
    family = config["family"] if config else kernel_family(M, K, group_size, has_gidx)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    partial, counter = _workspace.get(x.device, MAX_SPLIT_K * min(M, SPLIT_K_MAX_M) * N,
                                      triton.cdiv(min(M, SPLIT_K_MAX_M), 16) * triton.cdiv(N, 16))
    args = (x, qweight, scales, qzeros)
    tail = (y, partial, counter, M, N, K, group_size, x.stride(0), y.stride(0))
    if family == "gemv":
        assert M <= GEMV_MAX_M
        launch, extra = _w4a16_gemv, dict(M_POW2=triton.next_power_of_2(M))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
    else:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])
        tail = tail + (min(triton.next_power_of_2(M), 4096),)  # M_BUCKET: the autotuner's key
        if family == "gemm":
            launch, extra = _w4a16_gemm, {}
        else:
            launch, extra = _w4a16_general, dict(HAS_GIDX=has_gidx)
            args = args + (g_idx if has_gidx else qweight,)  # any int32 tensor: never read without HAS_GIDX
    if config is None:
        launch[grid](*args, *tail, **extra)
    else:
        meta = {k: config[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "SPLIT_K") if k in config}
        if meta["SPLIT_K"] > 1:
            assert M <= SPLIT_K_MAX_M and meta["SPLIT_K"] <= MAX_SPLIT_K, config
        launch.fn[grid(meta)](*args, *tail, **extra, **meta, num_warps=config["num_warps"],
                              num_stages=config["num_stages"])
    return y

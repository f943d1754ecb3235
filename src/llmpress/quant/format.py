"""The one file that knows bit layouts: GPTQ (v1) and AutoAWQ GEMM checkpoints, and our runtime layout.

`QuantizedWeight` (scheme.py) holds unpacked levels in the Hugging Face orientation [out, in]. Packed
layouts store the transpose, [in, out], in int32 words; level k of a word sits at bit offset bits * k.

GPTQ v1 (AutoGPTQ / GPTQModel `checkpoint_format: gptq`, read by vLLM, transformers, AutoGPTQ):
  qweight int32 [in*bits/32, out]     input row j -> word j // (32/bits), bit offset bits * (j % (32/bits))
  qzeros  int32 [groups, out*bits/32] same packing along the OUTPUT dim, holding zero - 1 (loaders add 1 back)
  scales  fp16  [groups, out]
  g_idx   int32 [in]                  group of each input row
  2/4/8 bits only: 3-bit words straddle int32 boundaries (10⅔ levels a word).
AutoAWQ GEMM (`quant_method: awq`, `version: gemm`), 4-bit only:
  qweight int32 [in, out/8]           packed along OUTPUT; nibble k of word c holds column 8c + AWQ_PACK_ORDER[k]
  qzeros  int32 [groups, out/8]       same packing, the real zero points (no offset)
  scales  fp16  [groups, out]
Runtime (QuantLinear buffers and `kernels.ops.int4_matmul`): GPTQ packing with the REAL zero points:
  qweight int32 [in*bits/32, out], scales [groups, out] in the model dtype,
  qzeros int32 [groups, out*bits/32], g_idx int32 [in] or None when g_idx[i] == i // group_size.
Row layout (`runtime_to_rows`, the CUDA decode kernels): qweight int32 [out, in/8], word w of row n holding input
  8w + j at bits 4j; scales [out, groups]; zeros uint8 [out, groups].
Fragment layout (`rows_to_fragments`, kernels/triton_int4_frag.py): each lane's tensor-core operand, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError
from llmpress.quant.scheme import QuantizedWeight, QuantScheme

GPTQ_BITS = (2, 4, 8)
AWQ_BITS = (4,)
# AutoAWQ's GEMM kernel dequantizes 8 nibbles with shifts that pair columns (0,4), (1,5), ...; the packer
# therefore stores column order[k] at nibble k (awq/modules/linear/gemm.py, `order_map`).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # inverse permutation: column c lives at nibble AWQ_UNPACK_ORDER[c]


# -- bit packing of int32 words -------------------------------------------------------------------

def _levels_per_word(bits: int) -> int:
    assert 32 % bits == 0, f"{bits}-bit levels do not tile an int32 word"
    return 32 // bits


def _as_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in [0, 2^32) -> int32 with the same bits (two's complement)."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _check_levels(levels: torch.Tensor, bits: int, what: str) -> None:
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) >= 2 ** bits):
        raise ValueError(f"{what} must lie in 0..{2 ** bits - 1} for {bits}-bit packing, "
                         f"got {int(levels.min())}..{int(levels.max())}")


def pack_rows(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """levels [R, C] in 0..2^bits-1 -> int32 [R*bits/32, C], packing consecutive ROWS into one word."""
    per_word = _levels_per_word(bits)
    R, C = levels.shape
    assert R % per_word == 0, f"{R} rows do not fill {bits}-bit words of {per_word}"
    shifts = torch.arange(per_word, device=levels.device, dtype=torch.int64) * bits
    words = (levels.to(torch.int64).view(R // per_word, per_word, C) << shifts.view(1, -1, 1)).sum(dim=1)
    return _as_int32(words)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [W, C] -> int32 levels [W*32/bits, C]; inverse of `pack_rows`."""
    per_word = _levels_per_word(bits)
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    # Arithmetic right shift drags the sign bit along; the mask drops it.
    levels = (words.unsqueeze(1) >> shifts.view(1, -1, 1)) & (2 ** bits - 1)
    return levels.reshape(words.shape[0] * per_word, words.shape[1])


def pack_columns(levels: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """levels [R, C] -> int32 [R, C*bits/32], packing consecutive COLUMNS; slot k holds column order[k] of its block."""
    per_word = _levels_per_word(bits)
    R, C = levels.shape
    assert C % per_word == 0, f"{C} columns do not fill {bits}-bit words of {per_word}"
    blocks = levels.to(torch.int64).view(R, C // per_word, per_word)
    if order is not None:
        blocks = blocks[:, :, list(order)]
    shifts = torch.arange(per_word, device=levels.device, dtype=torch.int64) * bits
    return _as_int32((blocks << shifts).sum(dim=-1))


def unpack_columns(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, W] -> int32 levels [R, W*32/bits]; inverse of `pack_columns` with the same `order`."""
    per_word = _levels_per_word(bits)
    shifts = torch.arange(0, 32, bits, device=words.device, dtype=torch.int32)
    slots = (words.unsqueeze(-1) >> shifts) & (2 ** bits - 1)  # [R, W, per_word], slot k
    if order is not None:
        inverse = [0] * per_word
        for slot, column in enumerate(order):
            inverse[column] = slot
        slots = slots[:, :, inverse]
    return slots.reshape(words.shape[0], words.shape[1] * per_word)


def trivial_g_idx(in_features: int, group_size: int, device=None) -> torch.Tensor:
    """int32 [in]: i // group_size, the group map without act-order."""
    return (torch.arange(in_features, device=device) // group_size).to(torch.int32)


def is_trivial_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    return torch.equal(g_idx.to(torch.int32), trivial_g_idx(g_idx.numel(), group_size, g_idx.device))


def _check_g_idx(g_idx: torch.Tensor, in_features: int, groups: int) -> None:
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx has shape {tuple(g_idx.shape)}, expected ({in_features},)")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise ValueError(f"g_idx holds groups {int(g_idx.min())}..{int(g_idx.max())} but there are only {groups}")


def _refuse_unpackable_bits(bits: int, supported: tuple[int, ...], fmt: str) -> None:
    if bits not in supported:
        names = " or ".join(", ".join(str(b) for b in supported).rsplit(", ", 1))
        raise LlmpressError(f"{bits}-bit weights can be evaluated with fake quantization but not packed: "
                            f"the {fmt} layout holds {names}-bit levels only; choose --bits {names} "
                            "to pack or save them.")


# -- GPTQ v1 --------------------------------------------------------------------------------------

def pack_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """GPTQ v1 checkpoint tensors {qweight, qzeros, scales, g_idx} for one linear layer."""
    bits = qw.scheme.bits
    _refuse_unpackable_bits(bits, GPTQ_BITS, "GPTQ")
    out_features, in_features = qw.qweight.shape
    per_word = 32 // bits
    if in_features % per_word or out_features % per_word:
        raise LlmpressError(f"a {out_features}x{in_features} weight cannot be packed in {bits}-bit GPTQ words: "
                            f"both sizes must be multiples of {per_word}.")
    _check_levels(qw.qweight, bits, "qweight levels")
    _check_levels(qw.zeros, bits, "zero points")
    if bool((qw.zeros == 0).any()):
        # v1 stores zero - 1 and every reader adds 1 back after masking, so 0 would read as 2^bits.
        raise LlmpressError(f"{int((qw.zeros == 0).sum())} groups have zero point 0, which the GPTQ v1 format "
                            "(zero - 1 stored unsigned) cannot hold; save with --format awq or quantize with --sym.")
    _check_g_idx(qw.g_idx, in_features, qw.scales.shape[1])
    return {
        "qweight": pack_rows(qw.qweight.T, bits),
        "qzeros": pack_columns(qw.zeros.T.to(torch.int64) - 1, bits),
        "scales": qw.scales.T.to(torch.float16).contiguous(),
        "g_idx": qw.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                sym: bool = False, act_order: bool = False) -> QuantizedWeight:
    """QuantizedWeight from GPTQ v1 tensors (g_idx optional: i // group_size when absent)."""
    _refuse_unpackable_bits(bits, GPTQ_BITS, "GPTQ")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features, out_features = qweight.shape[0] * 32 // bits, qweight.shape[1]
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym, act_order=act_order)
    groups = scheme.groups(in_features)
    if scales.shape != (groups, out_features) or qzeros.shape != (groups, out_features * bits // 32):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match {groups} groups "
                         f"of a {in_features}x{out_features} {bits}-bit weight (group size {group_size})")
    zeros = unpack_columns(qzeros, bits) + 1  # v1 off-by-one
    if bool((zeros == 2 ** bits).any()):
        raise ValueError(f"qzeros stores zero point {2 ** bits} (all bits set), which {bits}-bit levels cannot hold; "
                         "the checkpoint was packed from a zero point of 0")
    g_idx = tensors.get("g_idx")
    g_idx = trivial_g_idx(in_features, scheme.group_size_for(in_features), qweight.device) if g_idx is None \
        else g_idx.to(torch.int32)
    _check_g_idx(g_idx, in_features, groups)
    return QuantizedWeight(qweight=unpack_rows(qweight, bits).T.to(torch.uint8).contiguous(),
                           scales=scales.T.float().contiguous(), zeros=zeros.T.to(torch.uint8).contiguous(),
                           g_idx=g_idx, scheme=scheme)


# -- AutoAWQ GEMM ---------------------------------------------------------------------------------

def pack_awq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """AutoAWQ GEMM checkpoint tensors {qweight, qzeros, scales} for one linear layer."""
    bits = qw.scheme.bits
    _refuse_unpackable_bits(bits, AWQ_BITS, "AWQ GEMM")
    out_features, in_features = qw.qweight.shape
    if out_features % 8:
        raise LlmpressError(f"a weight with {out_features} output features cannot be packed in AWQ words of 8 levels.")
    groups = qw.scales.shape[1]
    group_size = in_features // groups
    if groups * group_size != in_features or not is_trivial_g_idx(qw.g_idx, group_size):
        raise LlmpressError("act-order (desc_act) weights have no AWQ layout, which has no g_idx; "
                            "save with --format gptq.")
    _check_levels(qw.qweight, bits, "qweight levels")
    _check_levels(qw.zeros, bits, "zero points")
    return {
        "qweight": pack_columns(qw.qweight.T, bits, AWQ_PACK_ORDER),
        "qzeros": pack_columns(qw.zeros.T, bits, AWQ_PACK_ORDER),
        "scales": qw.scales.T.to(torch.float16).contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor], group_size: int, bits: int = 4, sym: bool = False) -> QuantizedWeight:
    """QuantizedWeight from AutoAWQ GEMM tensors."""
    _refuse_unpackable_bits(bits, AWQ_BITS, "AWQ GEMM")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 32 // bits
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    groups = scheme.groups(in_features)
    if scales.shape != (groups, out_features) or qzeros.shape != (groups, qweight.shape[1]):
        raise ValueError(f"scales {tuple(scales.shape)} / qzeros {tuple(qzeros.shape)} do not match {groups} groups "
                         f"of a {in_features}x{out_features} {bits}-bit weight (group size {group_size})")
    levels = unpack_columns(qweight, bits, AWQ_PACK_ORDER)  # [in, out]
    zeros = unpack_columns(qzeros, bits, AWQ_PACK_ORDER)  # [groups, out]
    return QuantizedWeight(qweight=levels.T.to(torch.uint8).contiguous(), scales=scales.T.float().contiguous(),
                           zeros=zeros.T.to(torch.uint8).contiguous(),
                           g_idx=trivial_g_idx(in_features, scheme.group_size_for(in_features), qweight.device),
                           scheme=scheme)


# -- runtime layout -------------------------------------------------------------------------------

@dataclass
class RuntimeQuantWeight:
    """One linear layer in the layout QuantLinear keeps and `ops.int4_matmul` reads (see module docstring)."""
    qweight: torch.Tensor  # int32 [in*bits/32, out]
    scales: torch.Tensor  # model dtype [groups, out]
    qzeros: torch.Tensor  # int32 [groups, out*bits/32], real zero points
    g_idx: torch.Tensor | None  # int32 [in], or None when g_idx[i] == i // group_size
    group_size: int  # input rows per group (in_features for per-channel; never -1)
    bits: int

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]


def to_runtime(qw: QuantizedWeight, dtype: torch.dtype | None = None) -> RuntimeQuantWeight:
    """Pack a QuantizedWeight for QuantLinear; `dtype` (default: the scales' dtype) is the model dtype."""
    bits = qw.scheme.bits
    _refuse_unpackable_bits(bits, GPTQ_BITS, "runtime (GPTQ-style)")
    out_features, in_features = qw.qweight.shape
    _check_levels(qw.qweight, bits, "qweight levels")
    _check_levels(qw.zeros, bits, "zero points")
    group_size = qw.scheme.group_size_for(in_features)
    _check_g_idx(qw.g_idx, in_features, qw.scales.shape[1])
    return RuntimeQuantWeight(
        qweight=pack_rows(qw.qweight.T, bits),
        scales=qw.scales.T.to(dtype or qw.scales.dtype).contiguous(),
        qzeros=pack_columns(qw.zeros.T, bits),
        g_idx=None if is_trivial_g_idx(qw.g_idx, group_size) else qw.g_idx.to(torch.int32).contiguous(),
        group_size=group_size, bits=bits)


def from_runtime(rt: RuntimeQuantWeight, scheme: QuantScheme) -> QuantizedWeight:
    """Unpack runtime buffers back to a QuantizedWeight (to save a model that already holds QuantLinear)."""
    assert scheme.bits == rt.bits, f"scheme has {scheme.bits} bits, the runtime weight {rt.bits}"
    g_idx = rt.g_idx if rt.g_idx is not None else trivial_g_idx(rt.in_features, rt.group_size, rt.qweight.device)
    return QuantizedWeight(qweight=unpack_rows(rt.qweight, rt.bits).T.to(torch.uint8).contiguous(),
                           scales=rt.scales.T.float().contiguous(),
                           zeros=unpack_columns(rt.qzeros, rt.bits).T.to(torch.uint8).contiguous(),
                           g_idx=g_idx, scheme=scheme)


def dequantize_runtime(qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, g_idx: torch.Tensor | None,
                       group_size: int, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """W [in, out] in `dtype` from runtime buffers: scales[g(i), o] * (q[i, o] - z[g(i), o])."""
    levels = unpack_rows(qweight, bits)  # [in, out]
    zeros = unpack_columns(qzeros, bits)  # [groups, out]
    in_features = levels.shape[0]
    if g_idx is None:
        g_idx = torch.arange(in_features, device=qweight.device) // (in_features if group_size == -1 else group_size)
    g = g_idx.long()
    # (q - z) is a small integer and scale * (q - z) is exact in float32, so one rounding to `dtype` follows.
    return (scales.float()[g] * (levels - zeros[g]).float()).to(dtype)


# ---- Row layout for the GPU kernels (kernels/triton_int4_rows.py) -----------------------------------------
# The GPTQ runtime word holds 8 consecutive input rows of one output column; transposed, every output row's
# words are contiguous: qweight int32 [out, in/8], scales [out, groups], zeros uint8 [out, groups].

def runtime_to_rows(rt: RuntimeQuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    assert rt.bits == 4 and rt.g_idx is None and rt.in_features % rt.group_size == 0, \
        "the row layout takes 4-bit weights whose groups tile the input (no act-order)"
    return (rt.qweight.T.contiguous(), rt.scales.T.contiguous(),
            unpack_columns(rt.qzeros, 4).T.to(torch.uint8).contiguous())


def rows_to_runtime(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> RuntimeQuantWeight:
    """Inverse of `runtime_to_rows`."""
    return RuntimeQuantWeight(qweight=qweight.T.contiguous(), scales=scales.T.contiguous(),
                              qzeros=pack_columns(zeros.T.to(torch.int32), 4), g_idx=None,
                              group_size=group_size, bits=4)


# Fragment layout: the A operand of mma.m16n8k16 (16 weight rows x 16 inputs) as each of a warp's 32 lanes holds
# it, so that a lane's words load straight into its registers. Stored int32 [N/16, G, group_size/64, 32, 4]: per
# row tile and group, chunks of 4 words (one 16-byte load) for lanes 0..31 side by side, so that each load
# instruction of a warp reads 512 contiguous bytes (a lane's 8 words in a row would leave every 32-byte sector
# half used by each of its two loads). Word m = 2 s + h (chunk m // 4, place m % 4) of lane L = 4 i + j, for row tile
# t (rows 16 t .. 16 t + 15) and group g, holds rows r0 = 16 t + i and r1 = r0 + 8 at inputs k0 .. k0 + 3, with
# k0 = group_size * g + 32 s + 8 j + 4 h, nibble n at bits 4n:
FRAGMENT_NIBBLES = ((0, 0), (1, 0), (0, 2), (1, 2), (0, 1), (1, 1), (0, 3), (1, 3))  # nibble n -> (r1?, input - k0)
# The masks 0x000F000F of w, w >> 4, w >> 8, w >> 12 then give the operand's four registers: rows (r0, r1, r0, r1)
# at fragment columns (2j, 2j + 1) and (2j + 8, 2j + 9), which the kernel maps to inputs k0, k0 + 1 and k0 + 2, k0 + 3
# (the x fragment of lane j is then x[k0 .. k0 + 3], one 8-byte load; both halves h: x[k0 - 4h .. + 7], 16 bytes).


def rows_to_fragments(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row layout int32 [N, K/8] -> fragment layout int32 [N/16, K/group_size, group_size/64, 32, 4] (above)."""
    N, K = qweight.shape[0], qweight.shape[1] * 8
    assert N % 16 == 0 and group_size % 64 == 0 and K % group_size == 0, (N, K, group_size)
    G, S = K // group_size, group_size // 32
    levels = unpack_columns(qweight, 4).view(N // 16, 2, 8, G, S, 4, 2, 4)  # [t, r1?, i, g, s, j, h, c]
    tiles = levels.permute(0, 3, 2, 5, 4, 6, 1, 7).reshape(N // 16, G, 32, 2 * S, 2, 4)  # [t, g, lane, m, r1?, c]
    nibbles = torch.stack([tiles[..., half, c] for half, c in FRAGMENT_NIBBLES], dim=-1).to(torch.int64)
    shifts = torch.arange(8, device=qweight.device, dtype=torch.int64) * 4
    words = _as_int32((nibbles << shifts).sum(dim=-1))  # [t, g, lane, m]
    return words.view(N // 16, G, 32, S // 2, 4).transpose(2, 3).contiguous()


def fragment_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The row layout's scales and zeros [N, G] as the fragment GEMV reads them, [G, N]: the 16 rows of a group
    that a warp needs side by side (one 32-byte sector of scales, not 16)."""
    return scales.T.contiguous(), zeros.T.contiguous()


def fragments_to_rows(fragments: torch.Tensor) -> torch.Tensor:
    """Inverse of `rows_to_fragments`."""
    T, G, chunks = fragments.shape[:3]
    S = 2 * chunks
    words = fragments.transpose(2, 3).reshape(T, G, 32, 2 * S)  # [t, g, lane, m]
    shifts = torch.arange(0, 32, 4, device=fragments.device, dtype=torch.int32)
    nibbles = (words.unsqueeze(-1) >> shifts) & 15  # [t, g, lane, m, n]
    tiles = torch.empty(*nibbles.shape[:4], 2, 4, dtype=torch.int32, device=fragments.device)
    for n, (half, c) in enumerate(FRAGMENT_NIBBLES):
        tiles[..., half, c] = nibbles[..., n]
    levels = tiles.view(T, G, 8, 4, S, 2, 2, 4).permute(0, 6, 2, 1, 4, 3, 5, 7)  # [t, r1?, i, g, s, j, h, c]
    return pack_columns(levels.reshape(T * 16, G * S * 32), 4)

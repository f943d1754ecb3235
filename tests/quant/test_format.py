"""Bit layouts: GPTQ v1 and AutoAWQ GEMM packing round-trip and decode like an independent reader would."""

from __future__ import annotations

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.quant import format as fmt
from llmpress.quant.scheme import QuantizedWeight, QuantScheme
from tests.quant.packing_fixtures import random_quantized

GPTQ_CASES = [(bits, sym, act_order) for bits in (2, 4, 8) for sym in (False, True) for act_order in (False, True)]


def assert_same_quantized(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert torch.equal(a.qweight, b.qweight) and a.qweight.dtype == torch.uint8
    assert torch.equal(a.zeros, b.zeros) and a.zeros.dtype == torch.uint8
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.g_idx.to(torch.int32), b.g_idx.to(torch.int32))


# -- independent decoders: plain Python ints, written from the format definitions -----------------

def word(tensor: torch.Tensor, row: int, col: int) -> int:
    return int(tensor[row, col]) & 0xFFFFFFFF  # int32 storage, read as the unsigned word it is


def decode_gptq_v1(tensors: dict, bits: int) -> list[list[float]]:
    """W[o][i] = scale * (level - (stored_zero + 1)): levels packed down the input dim, zeros across outputs."""
    per_word, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros, scales, g_idx = tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"]
    in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
    W = [[0.0] * in_features for _ in range(out_features)]
    for o in range(out_features):
        for i in range(in_features):
            g = int(g_idx[i])
            level = (word(qweight, i // per_word, o) >> (bits * (i % per_word))) & mask
            zero = ((word(qzeros, g, o // per_word) >> (bits * (o % per_word))) & mask) + 1
            W[o][i] = float(scales[g, o]) * (level - zero)
    return W


def decode_awq_gemm(tensors: dict, group_size: int) -> list[list[float]]:
    """AutoAWQ GEMM: output column c of an 8-column block sits in the nibble k with order[k] == c."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    W = [[0.0] * in_features for _ in range(out_features)]
    for o in range(out_features):
        nibble = order.index(o % 8)
        for i in range(in_features):
            g = i // group_size
            level = (word(qweight, i, o // 8) >> (4 * nibble)) & 0xF
            zero = (word(qzeros, g, o // 8) >> (4 * nibble)) & 0xF
            W[o][i] = float(scales[g, o]) * (level - zero)
    return W


# -- GPTQ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,sym,act_order", GPTQ_CASES)
def test_gptq_pack_unpack_round_trip(bits, sym, act_order):
    scheme = QuantScheme(bits=bits, group_size=16, sym=sym, act_order=act_order)
    qw = random_quantized(48, 64, scheme, seed=bits)
    packed = fmt.pack_gptq(qw)
    per_word = 32 // bits
    assert packed["qweight"].shape == (64 // per_word, 48) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (4, 48 // per_word) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (4, 48) and packed["scales"].dtype == torch.float16
    assert packed["g_idx"].shape == (64,) and packed["g_idx"].dtype == torch.int32
    back = fmt.unpack_gptq(packed, bits, 16, sym=sym, act_order=act_order)
    assert_same_quantized(back, qw)
    assert back.scheme == scheme


def test_gptq_per_channel_and_missing_g_idx():
    qw = random_quantized(16, 32, QuantScheme(bits=4, group_size=-1), seed=3)
    packed = fmt.pack_gptq(qw)
    assert packed["scales"].shape == (1, 16)
    del packed["g_idx"]  # old checkpoints without act-order may omit it
    assert_same_quantized(fmt.unpack_gptq(packed, 4, -1), qw)


@pytest.mark.parametrize("bits,act_order", [(2, False), (4, False), (4, True), (8, True)])
def test_gptq_layout_decodes_like_an_independent_reader(bits, act_order):
    qw = random_quantized(16, 32, QuantScheme(bits=bits, group_size=8, act_order=act_order), seed=11)
    W = decode_gptq_v1(fmt.pack_gptq(qw), bits)
    torch.testing.assert_close(torch.tensor(W), qw.dequantize(), rtol=0, atol=1e-7)


def test_gptq_word_bit_order_by_hand():
    # Input rows 0..7 of output column 0 hold levels 0..7: level j sits at bits 4j..4j+3 of word 0.
    levels = torch.zeros(8, 16, dtype=torch.uint8)
    levels[0, :8] = torch.arange(8)
    zeros = torch.full((8, 1), 3, dtype=torch.uint8)
    zeros[1] = 9
    qw = QuantizedWeight(levels, torch.ones(8, 1), zeros, torch.zeros(16, dtype=torch.int32),
                         QuantScheme(bits=4, group_size=16))
    packed = fmt.pack_gptq(qw)
    assert word(packed["qweight"], 0, 0) == 0x76543210
    # zero points of outputs 0..7 in one word, stored minus one: 2, 8, 2, 2, ...
    assert word(packed["qzeros"], 0, 0) == 0x22222282


def test_gptq_v1_refuses_zero_point_zero_and_reads_its_corruption_as_error():
    qw = random_quantized(16, 32, QuantScheme(bits=4, group_size=16), seed=5)
    qw.zeros[0, 0] = 0
    with pytest.raises(LlmpressError, match="zero point 0.*--format awq"):
        fmt.pack_gptq(qw)
    qw.zeros[0, 0] = 1
    packed = fmt.pack_gptq(qw)
    packed["qzeros"][0, 0] |= 0xF  # what AutoGPTQ writes for zero 0: stored -1, every bit set
    with pytest.raises(ValueError, match="zero point 16"):
        fmt.unpack_gptq(packed, 4, 16)


@pytest.mark.parametrize("pack", [fmt.pack_gptq, fmt.pack_awq, fmt.to_runtime])
def test_3_bit_weights_cannot_be_packed(pack):
    qw = random_quantized(16, 32, QuantScheme(bits=3, group_size=16))
    with pytest.raises(LlmpressError, match="3-bit weights can be evaluated with fake quantization but not packed"):
        pack(qw)


def test_out_of_range_levels_are_rejected():
    qw = random_quantized(16, 32, QuantScheme(bits=2, group_size=16))
    qw.qweight[0, 0] = 4
    with pytest.raises(ValueError, match="0..3"):
        fmt.pack_gptq(qw)


# -- AWQ -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sym", [False, True])
def test_awq_pack_unpack_round_trip(sym):
    qw = random_quantized(48, 64, QuantScheme(bits=4, group_size=16, sym=sym), min_zero=0, seed=2)
    qw.zeros[0, 0] = 0 if not sym else 8  # AWQ stores real zero points, 0 included
    packed = fmt.pack_awq(qw)
    assert set(packed) == {"qweight", "qzeros", "scales"}
    assert packed["qweight"].shape == (64, 6) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (4, 6) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (4, 48) and packed["scales"].dtype == torch.float16
    assert_same_quantized(fmt.unpack_awq(packed, 16, sym=sym), qw)


def test_awq_layout_decodes_like_an_independent_reader():
    qw = random_quantized(24, 16, QuantScheme(bits=4, group_size=8), min_zero=0, seed=7)
    W = decode_awq_gemm(fmt.pack_awq(qw), group_size=8)
    torch.testing.assert_close(torch.tensor(W), qw.dequantize(), rtol=0, atol=1e-7)


def test_awq_interleave_by_hand():
    # Output columns 0..7 of input row 0 hold levels 0..7; nibble k holds column [0, 2, 4, 6, 1, 3, 5, 7][k].
    levels = torch.zeros(8, 8, dtype=torch.uint8)
    levels[:, 0] = torch.arange(8)
    qw = QuantizedWeight(levels, torch.ones(8, 1), torch.arange(8, dtype=torch.uint8).view(8, 1),
                         torch.zeros(8, dtype=torch.int32), QuantScheme(bits=4, group_size=8))
    packed = fmt.pack_awq(qw)
    assert word(packed["qweight"], 0, 0) == 0x75316420
    assert word(packed["qzeros"], 0, 0) == 0x75316420  # real zeros 0..7, no offset


def test_awq_refuses_act_order():
    qw = random_quantized(16, 32, QuantScheme(bits=4, group_size=8, act_order=True))
    with pytest.raises(LlmpressError, match="act-order.*--format gptq"):
        fmt.pack_awq(qw)


# -- runtime layout --------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (2, False), (8, True)])
def test_runtime_layout(bits, act_order):
    qw = random_quantized(32, 64, QuantScheme(bits=bits, group_size=16, act_order=act_order), min_zero=0, seed=1)
    qw.zeros[0, 0] = 0  # real zero points: 0 is fine at runtime
    rt = fmt.to_runtime(qw, torch.bfloat16)
    per_word = 32 // bits
    assert rt.qweight.shape == (64 // per_word, 32) and rt.qweight.dtype == torch.int32
    assert rt.qzeros.shape == (4, 32 // per_word) and rt.qzeros.dtype == torch.int32
    assert rt.scales.shape == (4, 32) and rt.scales.dtype == torch.bfloat16
    assert (rt.g_idx is None) == (not act_order)
    assert rt.g_idx is None or rt.g_idx.dtype == torch.int32
    assert (rt.in_features, rt.out_features, rt.group_size, rt.bits) == (64, 32, 16, bits)
    # runtime qweight is the GPTQ qweight; qzeros are the real zeros (GPTQ's minus one, added back)
    qw.zeros.clamp_(min=1)
    rt = fmt.to_runtime(qw, torch.float32)
    gptq = fmt.pack_gptq(qw)
    assert torch.equal(rt.qweight, gptq["qweight"])
    assert torch.equal(fmt.unpack_columns(rt.qzeros, bits), fmt.unpack_columns(gptq["qzeros"], bits) + 1)
    assert_same_quantized(fmt.from_runtime(rt, qw.scheme), qw)
    W = fmt.dequantize_runtime(rt.qweight, rt.scales, rt.qzeros, rt.g_idx, rt.group_size, bits, torch.float32)
    torch.testing.assert_close(W, qw.dequantize().T, rtol=0, atol=0)


def emulate_fragment_gemv(fragments: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """What the fragment GEMV's warps compute, written from the PTX ISA's mma.m16n8k16 operand layout (not
    from the packing code): lane L = 4i + j gets A registers from w & 0x000F000F, (w >> 4) & .., (w >> 8) & ..,
    (w >> 12) & .. (low half, high half): A[i][2j..2j+1], A[i+8][2j..2j+1], A[i][2j+8..2j+9], A[i+8][2j+8..2j+9];
    B registers b0 = (B[2j][.], B[2j+1][.]), b1 = (B[2j+8][.], B[2j+9][.]), loaded from x[k0 .. k0+3],
    k0 = group_size g + 32 s + 8 j + 4 h for word m = 2s + h, stored at [t, g, m // 4, lane, m % 4]. Returns y [N]
    in float64."""
    T, G, chunks = fragments.shape[:3]
    M = 4 * chunks
    y = torch.zeros(T * 16, dtype=torch.float64)
    for t in range(T):
        for g in range(G):
            for m in range(M):
                s, h = divmod(m, 2)
                A = torch.zeros(16, 16, dtype=torch.float64)
                B = torch.zeros(16, dtype=torch.float64)
                for lane in range(32):
                    i, j = divmod(lane, 4)
                    word = int(fragments[t, g, m // 4, lane, m % 4]) & 0xFFFFFFFF
                    regs = [((word >> shift) & 0xF, (word >> (shift + 16)) & 0xF) for shift in (0, 4, 8, 12)]
                    for (row, col), (lo, hi) in zip([(i, 2 * j), (i + 8, 2 * j), (i, 2 * j + 8), (i + 8, 2 * j + 8)], regs):
                        A[row, col], A[row, col + 1] = lo, hi
                    k0 = group_size * g + 32 * s + 8 * j + 4 * h
                    B[2 * j], B[2 * j + 1], B[2 * j + 8], B[2 * j + 9] = (float(v) for v in x[k0:k0 + 4])
                y[16 * t:16 * t + 16] += A @ B
    return y


@pytest.mark.parametrize("N,K,group_size", [(32, 256, 128), (16, 128, 64)])
def test_fragment_layout_feeds_the_tensor_core_operands_of_each_lane(N, K, group_size):
    from llmpress.quant.format import fragments_to_rows, rows_to_fragments
    torch.manual_seed(N + K)
    levels = torch.randint(0, 16, (N, K), dtype=torch.int32)
    rows = fmt.pack_columns(levels, 4)  # the row layout: input 8w + j of row n at bits 4j of word w
    fragments = rows_to_fragments(rows, group_size)
    assert fragments.shape == (N // 16, K // group_size, group_size // 64, 32, 4)
    assert torch.equal(fragments_to_rows(fragments), rows)
    x = torch.randn(K, dtype=torch.float64)
    assert torch.allclose(emulate_fragment_gemv(fragments, x, group_size), levels.double() @ x)

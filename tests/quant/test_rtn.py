"""RTN against a float64 computation written from the definition, for both zero-point conventions."""

from __future__ import annotations

import pytest
import torch

from llmpress.quant.rtn import find_scale_zero, group_bounds, quantize_rtn, split_rows
from llmpress.quant.scheme import QuantScheme


def reference_rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool):
    """Levels, scales, zeros in float64, one group at a time (GPTQ reference `Quantizer` conventions), and a
    mask of the weights that sit on a rounding tie (w / scale = k + 1/2, up to float32 rounding)."""
    maxq = 2 ** bits - 1
    size = w.shape[1] if group_size == -1 else group_size
    levels, scales, zeros, ties = [], [], [], []
    for begin in range(0, w.shape[1], size):
        block = w[:, begin:begin + size].double()
        if sym:  # range [-max|w|, max|w|], zero point fixed mid-range
            scale = 2 * block.abs().amax(1) / maxq
            zero = torch.full_like(scale, 2 ** (bits - 1))
        else:  # range [min(w, 0), max(w, 0)]
            low, high = block.amin(1).clamp(max=0), block.amax(1).clamp(min=0)
            scale = (high - low) / maxq
            zero = torch.round(-low / scale)
        ratio = block / scale[:, None]
        levels.append(torch.clamp(torch.round(ratio) + zero[:, None], 0, maxq))
        ties.append(((ratio - ratio.floor()) - 0.5).abs() < 1e-5)
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(levels, 1), torch.stack(scales, 1), torch.stack(zeros, 1), torch.cat(ties, 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [4, -1])
@pytest.mark.parametrize("sym", [False, True])
def test_matches_float64_reference(bits, group_size, sym):
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(bits))
    w[0] += 0.5  # a row with every weight positive in most groups: the range must still include 0
    scheme = QuantScheme(bits=bits, group_size=group_size, sym=sym)
    qw = quantize_rtn(w, scheme)
    levels, scales, zeros, ties = reference_rtn(w, bits, group_size, sym)
    groups = 1 if group_size == -1 else 16 // group_size
    assert qw.qweight.dtype == torch.uint8 and qw.zeros.dtype == torch.uint8
    assert qw.scales.shape == qw.zeros.shape == (8, groups)
    assert torch.equal(qw.g_idx, (torch.arange(16) // (16 if group_size == -1 else group_size)).int())
    # Symmetric ranges put -max|w| exactly half-way between two levels, where float32 and float64 may round
    # differently; both choices are scale/2 away (checked below). Every other level must agree exactly.
    assert (ties.sum() <= (w.shape[0] * groups if sym else 0))
    assert torch.equal(qw.qweight.double()[~ties], levels[~ties])
    assert torch.equal(qw.zeros.double(), zeros)
    torch.testing.assert_close(qw.scales.double(), scales, rtol=1e-6, atol=0)
    assert int(qw.qweight.max()) <= 2 ** bits - 1
    # Every weight is within half a step of its level (the clamp never costs more than that either).
    step = qw.scales[:, qw.g_idx.long()]
    # (plus float32 rounding of scale * (q - zero), relative to |w|: at 8 bits, half a step is only |w| / 255.)
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6 * w.abs()).all()


def test_levels_use_the_whole_range_and_zero_stays_exact():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[:, 5] = 0.0
    for sym in (False, True):
        qw = quantize_rtn(w, QuantScheme(bits=3, group_size=32, sym=sym))
        assert int(qw.qweight.min()) == 0 and int(qw.qweight.max()) == 7
        assert (qw.dequantize()[:, 5] == 0).all()  # 0.0 is a level: the zero point
        if sym:
            assert (qw.zeros == 4).all()


def test_all_zero_group_does_not_divide_by_zero():
    w = torch.randn(4, 8)
    w[1] = 0.0
    w[:, :4] = 0.0
    for sym in (False, True):
        qw = quantize_rtn(w, QuantScheme(bits=4, group_size=4, sym=sym))
        assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all()
        assert (qw.dequantize()[1] == 0).all() and (qw.dequantize()[:, :4] == 0).all()
    scale, zero = find_scale_zero(torch.zeros(3, 5), QuantScheme(bits=4))
    assert torch.isfinite(scale).all() and torch.isfinite(zero).all()


def test_ragged_last_group_when_group_size_does_not_divide():
    # SmolLM2's hidden size 576 is 4.5 groups of 128: a new group starts every 128 channels, the last is 64.
    assert group_bounds(576, QuantScheme(group_size=128))[-2:] == [(384, 512), (512, 576)]
    w = torch.randn(4, 96, generator=torch.Generator().manual_seed(1))
    qw = quantize_rtn(w, QuantScheme(bits=4, group_size=64))
    levels, scales, zeros, _ = reference_rtn(w, 4, 64, sym=False)
    assert qw.scales.shape == (4, 2) and int(qw.g_idx[-1]) == 1 and int((qw.g_idx == 1).sum()) == 32
    assert torch.equal(qw.qweight.double(), levels) and torch.equal(qw.zeros.double(), zeros)


def test_split_rows_is_quantizing_each_part():
    w = torch.randn(12, 32)
    scheme = QuantScheme(bits=4, group_size=16)
    parts = split_rows(quantize_rtn(w, scheme), [8, 4])
    for part, rows in zip(parts, w.split([8, 4])):
        alone = quantize_rtn(rows, scheme)
        assert torch.equal(part.qweight, alone.qweight) and torch.equal(part.scales, alone.scales)

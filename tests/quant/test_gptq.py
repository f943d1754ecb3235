"""GPTQ: reduces to RTN without input correlations, beats it with them; act-order keeps a plain group map."""

from __future__ import annotations

import pytest
import torch

from llmpress.quant.gptq import HessianAccumulator, gptq_quantize_layer
from llmpress.quant.rtn import quantize_rtn
from llmpress.quant.scheme import QuantScheme


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few large ones, as LLM activations have: X = Z A diag(c)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5 + torch.eye(features)
    channel_scale = torch.ones(features)
    channel_scale[torch.randperm(features, generator=g)[:features // 16]] = 8.0
    return torch.randn(tokens, features, generator=g) @ mix * channel_scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[1], "cpu")
    for chunk in x.split(300):  # uneven batches: the running mean must not care
        acc.add_batch(chunk)
    return acc.hessian


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    return (x.double() @ (w.double() - w_hat.double()).T).norm().item()


def test_hessian_accumulator_is_two_over_n_xtx():
    x = torch.randn(1000, 24, dtype=torch.float64)
    acc = HessianAccumulator(24, "cpu", dtype=torch.float64)
    for chunk in x.split([1, 499, 500]):
        acc.add_batch(chunk.reshape(1, -1, 24))  # any leading shape: [batch, tokens, features]
    assert acc.num_tokens == 1000
    torch.testing.assert_close(acc.hessian, 2 / 1000 * x.T @ x)


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=32), QuantScheme(bits=3, group_size=-1),
                                    QuantScheme(bits=4, group_size=32, sym=True)])
def test_identity_hessian_gives_exactly_rtn(scheme):
    # With uncorrelated inputs, H^-1 is diagonal: no column can absorb another's error, so GPTQ is RTN.
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    gptq = gptq_quantize_layer(w, torch.eye(96), scheme, block_size=40)  # blocks cutting through groups
    rtn = quantize_rtn(w, scheme)
    assert torch.equal(gptq.qweight, rtn.qweight)
    assert torch.equal(gptq.scales, rtn.scales) and torch.equal(gptq.zeros, rtn.zeros)
    assert torch.equal(gptq.g_idx, rtn.g_idx)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_lower_output_error_than_rtn_on_correlated_inputs(bits, group_size, act_order):
    x = correlated_inputs(2048, 256)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    scheme = QuantScheme(bits=bits, group_size=group_size, act_order=act_order)
    gptq = gptq_quantize_layer(w, hessian_of(x), scheme)
    rtn = quantize_rtn(w, scheme)
    gptq_error, rtn_error = output_error(x, w, gptq.dequantize()), output_error(x, w, rtn.dequantize())
    # Measured: 0.76-0.80x RTN's error in natural order, 0.52-0.54x with act-order. A bug in the updates
    # or the ordering loses most of that.
    assert gptq_error < (0.6 if act_order else 0.9) * rtn_error
    assert int(gptq.qweight.max()) <= scheme.max_level
    assert torch.isfinite(gptq.scales).all()


def test_act_order_keeps_static_groups():
    x = correlated_inputs(1024, 256, seed=3)
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(2))
    scheme = QuantScheme(bits=4, group_size=64, act_order=True)
    qw = gptq_quantize_layer(w, hessian_of(x), scheme)
    # Static groups: each group's scale/zero come from its original columns, so g_idx is the plain map
    # (exactly group_size channels per group) and the scales are RTN's.
    assert qw.g_idx.shape == (256,) and qw.g_idx.dtype == torch.int32
    assert torch.equal(qw.g_idx, (torch.arange(256) // 64).int())
    assert torch.bincount(qw.g_idx.long()).tolist() == [64] * 4
    rtn = quantize_rtn(w, scheme)
    assert torch.equal(qw.scales, rtn.scales) and torch.equal(qw.zeros, rtn.zeros)
    # ... and the levels really were chosen in act-order (they differ from the natural-order result).
    natural = gptq_quantize_layer(w, hessian_of(x), QuantScheme(bits=4, group_size=64))
    assert not torch.equal(qw.qweight, natural.qweight)


def test_dead_input_channels_quantize_to_zero():
    x = correlated_inputs(512, 64)
    x[:, [3, 40]] = 0.0  # channels that never fire in the calibration data
    w = torch.randn(16, 64)
    qw = gptq_quantize_layer(w, hessian_of(x), QuantScheme(bits=4, group_size=32))
    w_hat = qw.dequantize()
    assert torch.isfinite(w_hat).all()
    assert (w_hat[:, [3, 40]] == 0).all()


def reference_fasterquant(W, H, bits, groupsize, actorder, percdamp=0.01, blocksize=128):
    """`GPTQ.fasterquant` and `Quantizer` (asymmetric, per channel) of the GPTQ reference (IST-DASLab/gptq),
    transcribed line by line; returns the dequantized weights."""
    maxq = 2 ** bits - 1

    def find_params(x):
        xmin = torch.minimum(x.min(1)[0], torch.zeros(x.shape[0]))
        xmax = torch.maximum(x.max(1)[0], torch.zeros(x.shape[0]))
        tmp = (xmin == 0) & (xmax == 0)
        xmin[tmp], xmax[tmp] = -1, +1
        scale = (xmax - xmin) / maxq
        return scale.unsqueeze(1), torch.round(-xmin / scale).unsqueeze(1)

    def quantize(x, scale, zero):
        q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
        return scale * (q - zero)

    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    if groupsize == -1:
        scale, zero = find_params(W)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    Q = torch.zeros_like(W)
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(columns)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        Err1, Hinv1 = torch.zeros_like(Q1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if groupsize != -1 and (i1 + i) % groupsize == 0:
                scale, zero = find_params(W[:, (i1 + i):(i1 + i + groupsize)])
            q = quantize(w.unsqueeze(1), scale, zero).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    if actorder:
        Q = Q[:, torch.argsort(perm)]
    return Q


@pytest.mark.parametrize("bits,group_size,act_order", [(4, 128, False), (3, 128, False), (4, -1, True), (3, -1, False)])
def test_matches_the_reference_implementation(bits, group_size, act_order):
    # Where the reference and we define the same thing (asymmetric; groups aligned with the blocks, or act-order
    # per channel), the results agree; they differ by design only for act-order with groups (we: static groups).
    x = correlated_inputs(1024, 384, seed=5)
    x[:, 17] = 0.0  # a dead channel
    w = torch.randn(48, 384, generator=torch.Generator().manual_seed(6))
    H = hessian_of(x)
    ours = gptq_quantize_layer(w, H, QuantScheme(bits=bits, group_size=group_size, act_order=act_order)).dequantize()
    reference = reference_fasterquant(w, H, bits, group_size, act_order)
    same = torch.isclose(ours, reference, rtol=1e-5, atol=1e-7).float().mean().item()
    assert same > 0.999, same  # float rounding may flip a rare tie, nothing more

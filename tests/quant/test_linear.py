"""QuantLinear is a drop-in nn.Linear: same call, the dequantized weight's result, swapped in by name."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmpress.kernels import ops
from llmpress.kernels.reference import int4_matmul_reference
from llmpress.model.fusion import fuse_projections
from llmpress.quant.linear import QuantLinear, replace_linears
from llmpress.quant.scheme import QuantScheme
from tests.conftest import TINY_VARIANTS, hf_pair, tiny_config
from tests.quant.packing_fixtures import fake_quantized_copy, quantize_model, random_quantized

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits,act_order,bias",
                         [(4, False, False), (4, True, True), (2, False, True), (8, True, False)])
def test_forward_equals_dequantized_matmul(bits, act_order, bias):
    qw = random_quantized(48, 64, QuantScheme(bits=bits, group_size=16, act_order=act_order), seed=bits)
    b = torch.randn(48) if bias else None
    layer = QuantLinear.from_quantized(qw, bias=b, dtype=torch.float32)
    assert (layer.in_features, layer.out_features) == (64, 48)
    assert (layer.g_idx is not None) == act_order and (layer.bias is not None) == bias
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    W = qw.dequantize()
    expected = x @ W.T + (b if bias else 0)
    y = layer(x)
    assert y.shape == (2, 5, 48)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize_weight(), W, rtol=0, atol=0)
    reference = int4_matmul_reference(x.reshape(-1, 64), layer.qweight, layer.scales, layer.qzeros, layer.g_idx,
                                      layer.group_size, layer.bits)
    torch.testing.assert_close(y.reshape(-1, 48), reference + (b if bias else 0), rtol=0, atol=0)


def test_per_channel_group_and_half_precision():
    qw = random_quantized(32, 64, QuantScheme(bits=4, group_size=-1), seed=4)
    layer = QuantLinear.from_quantized(qw, dtype=torch.bfloat16)
    assert layer.group_size == 64 and layer.scales.shape == (1, 32) and layer.scales.dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ qw.dequantize().T, rtol=2e-2, atol=2e-2)


def test_forward_goes_through_ops_int4_matmul_when_it_exists(monkeypatch):
    calls = []

    def spy(x, qweight, scales, qzeros, g_idx, group_size, bits):
        calls.append((tuple(x.shape), group_size, bits))
        return int4_matmul_reference(x, qweight, scales, qzeros, g_idx, group_size, bits)

    monkeypatch.setattr(ops, "int4_matmul", spy, raising=False)
    layer = QuantLinear.from_quantized(random_quantized(16, 32, QuantScheme(bits=4, group_size=16)),
                                       dtype=torch.float32)
    layer(torch.randn(2, 3, 32))
    assert calls == [((6, 32), 16, 4)]


@pytest.mark.parametrize("variant", ["llama2-mha-untied", "gqa-tied"])
@pytest.mark.parametrize("act_order", [False, True])
def test_replace_linears_gives_fake_quantized_logits(variant, act_order):
    _, model = hf_pair(tiny_config(**TINY_VARIANTS[variant], attention_bias=True))
    quantized = quantize_model(model, QuantScheme(bits=4, group_size=32, act_order=act_order))
    fake = fake_quantized_copy(model, quantized)
    assert fuse_projections(model) == 4  # fused buffers must not shadow the quantized layers
    replace_linears(model, quantized, torch.float32)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_weight is None and isinstance(attn.q_proj, QuantLinear)
    assert attn.q_proj.bias is not None
    assert fuse_projections(model) == 0  # quantized groups are left alone
    assert type(model.lm_head) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), fake(IDS), rtol=1e-5, atol=1e-5)


def test_replace_linears_refuses_a_wrong_shape():
    _, model = hf_pair(tiny_config())
    qw = random_quantized(16, 64, QuantScheme(bits=4, group_size=32))
    with pytest.raises(ValueError, match="does not match"):
        replace_linears(model, {"model.layers.0.self_attn.q_proj": qw})

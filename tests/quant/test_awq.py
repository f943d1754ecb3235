"""AWQ: the folded scales leave the float model unchanged; scaled, clipped RTN beats plain RTN."""

from __future__ import annotations

import copy

import pytest
import torch

from llmpress.loading.loader import random_model
from llmpress.quant.awq import ActivationStats, awq_scale_layer, can_fold, output_error, search_clip
from llmpress.quant.calibration import CalibrationInputs, capture_input_stats, quantize_model
from llmpress.quant.layer_groups import LLAMA_LINEAR_GROUPS
from llmpress.quant.rtn import fake_quantize, find_scale_zero
from llmpress.quant.scheme import QuantScheme
from tests.conftest import tiny_config

SCHEME = QuantScheme(bits=4, group_size=32)


def outlier_model(num_kv_heads: int = 4, seed: int = 0):
    """A tiny random Llama (hidden 128, so 4 groups of 32) whose norms boost a few channels 20x, as trained
    LLMs do: the activation outliers that make AWQ's per-channel scales worth searching."""
    config = tiny_config(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=num_kv_heads)
    model = random_model(config, torch.device("cpu"), torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.mul_(1 + 19 * (torch.rand(128, generator=g) < 0.05))
    return model


def tokens(n: int = 8, length: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def scale_all_layers(model, calib: torch.Tensor) -> list:
    """AWQ's scale search and fold on every layer, nothing quantized; returns the scales found."""
    inputs, found = CalibrationInputs(model, calib, batch_size=4), []
    with torch.no_grad():
        for layer in model.model.layers:
            stats = capture_input_stats(layer, LLAMA_LINEAR_GROUPS, inputs, ActivationStats)
            found += awq_scale_layer(layer, stats, SCHEME)
            inputs.advance(layer)
    return found


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_scaling_alone_leaves_float_outputs_unchanged(num_kv_heads):
    model = outlier_model(num_kv_heads)
    calib = tokens()
    with torch.no_grad():
        before = model(calib)
    scales = scale_all_layers(model, calib)
    with torch.no_grad():
        after = model(calib)
    assert (after - before).abs().max().item() <= 1e-5 * max(1.0, before.abs().max().item())
    # The search found non-trivial scales (alpha > 0), so the fold was really exercised ...
    assert any(s is not None and not torch.allclose(s, torch.ones_like(s)) for s in scales)
    # ... everywhere except v -> o under grouped-query attention, where no fold exists.
    v_to_o = scales[1::4]
    assert all(s is None for s in v_to_o) if num_kv_heads < 4 else all(s is not None for s in v_to_o)
    assert can_fold(model.model.layers[0], LLAMA_LINEAR_GROUPS[1]) == (num_kv_heads == 4)


def test_output_error_from_gram_matrix_is_exact():
    x, delta = torch.randn(500, 48, dtype=torch.float64), torch.randn(7, 48, dtype=torch.float64)
    stats = ActivationStats(48, "cpu", dtype=torch.float64)
    stats.add_batch(x)
    # tr(dW H dW^T) with H = 2/n X^T X is 2/n ||X dW^T||^2, row by row.
    torch.testing.assert_close(output_error(delta, stats.hessian), 2 / 500 * (x @ delta.T).pow(2).sum(0))
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0))


def test_clip_search_never_does_worse_than_no_clipping():
    x = torch.randn(400, 64) * torch.linspace(0.2, 3, 64)
    w = torch.randn(16, 64) * 0.02
    w[:, 7] *= 10  # an outlier weight per row: clipping it trades its error against everyone's step size
    stats = ActivationStats(64, "cpu")
    stats.add_batch(x)
    max_val = search_clip(w, stats.hessian, SCHEME)
    org = w.abs().reshape(16, 2, 32).amax(-1)
    assert (max_val <= org).all() and (max_val >= 0.5 * org * (1 - 1e-6)).all()
    assert (max_val < org).any()

    def error(bound):
        clipped = torch.cat([w[:, g * 32:(g + 1) * 32].clamp(-bound[:, g:g + 1], bound[:, g:g + 1]) for g in range(2)], 1)
        scale, zero = find_scale_zero(clipped.reshape(16, 2, 32), SCHEME)
        w_hat = fake_quantize(clipped.reshape(16, 2, 32), scale[..., None], zero[..., None], SCHEME.max_level)
        return output_error(w_hat.reshape(16, 64) - w, stats.hessian).sum()

    assert error(max_val) < error(org)


@pytest.mark.parametrize("bits", [4, 3])
def test_layer_output_error_lower_than_rtn(bits):
    model, calib = outlier_model(), tokens()
    scheme = QuantScheme(bits=bits, group_size=32)
    quantized = {method: copy.deepcopy(model) for method in ("rtn", "awq")}
    for method, m in quantized.items():
        result = quantize_model(m, method, scheme, calib, progress=False, batch_size=4)
        assert len(result) == 7 * len(model.model.layers)
    inputs = CalibrationInputs(model, calib, batch_size=8)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            # Every layer on the same float inputs: the error of this layer alone.
            x = inputs.hidden[0]
            reference = layer(x, inputs.cos, inputs.sin, inputs.positions, None)
            errors = {method: (m.model.layers[i](x, inputs.cos, inputs.sin, inputs.positions, None) - reference)
                      .pow(2).mean().item() for method, m in quantized.items()}
            assert errors["awq"] < 0.9 * errors["rtn"], (i, errors)
            inputs.advance(layer)

"""Projection fusion changes speed, never results or checkpoint names."""

import torch

from llmpress.model.fusion import fuse_projections, unfuse_projections
from tests.conftest import hf_pair, tiny_config


def test_fused_model_gives_same_logits_and_keeps_state_dict():
    _, model = hf_pair(tiny_config(attention_bias=True, mlp_bias=True))
    ids = torch.randint(0, 256, (2, 12))
    before = model(ids)
    keys = set(model.state_dict())
    parameter_bytes = sum(p.numel() for p in model.parameters())
    assert fuse_projections(model) == 2 * model.config.num_hidden_layers
    assert fuse_projections(model) == 0  # idempotent
    attn = model.model.layers[0].self_attn
    # the HF-named parameters are views into the fused buffer, so no weight is stored twice
    assert attn.q_proj.weight.data_ptr() == attn.qkv_weight.data_ptr()
    assert set(model.state_dict()) == keys
    assert sum(p.numel() for p in model.parameters()) == parameter_bytes
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)
    unfuse_projections(model)
    assert attn.qkv_weight is None
    torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-5)

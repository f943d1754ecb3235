"""model/decode_accumulate.py: batch-1 decode over an fp32 residual stream, each product adding into it, gives the
logits of the model as written. On the CPU the ops (ops.int4_accumulate, int4_accumulated_norm,
int4_accumulated_attention) run their PyTorch steps, so this checks the plan and the wiring; the kernels against the
GEMVs are tests/kernels/test_int4_accumulate.py (CUDA)."""

import pytest
import torch

from llmpress.kernels import ops
from llmpress.model import LlamaForCausalLM, StaticKVCache
from llmpress.model import decode_accumulate
from tests.conftest import tiny_config
from tests.test_decode_chain import int4_model


def decode_logits(model: LlamaForCausalLM, accumulating: bool, steps: int = 3) -> list[torch.Tensor]:
    """Prefill a 5-token prompt, then `steps` one-token steps with the accumulating decode on or off."""
    device = model.lm_head.weight.device if hasattr(model.lm_head, "weight") else model.device
    cache = StaticKVCache(model.config, 1, 16, model.dtype, device)
    ids = torch.randint(0, 256, (1, 5 + steps), generator=torch.Generator().manual_seed(0)).to(device)
    saved = ops.int4_accumulate_decode
    outs = []
    try:
        with torch.no_grad():
            model(ids[:, :5], torch.arange(5, device=device), cache)
            ops.int4_accumulate_decode = accumulating
            for t in range(5, 5 + steps):
                outs.append(model(ids[:, t:t + 1], torch.tensor([t], device=device), cache).float())
    finally:
        ops.int4_accumulate_decode = saved
    return outs


@pytest.mark.parametrize("quantize_head", [True, False])
def test_accumulating_decode_gives_the_logits_of_the_layers_as_written(quantize_head):
    model = int4_model(quantize_head)
    for accumulated, plain in zip(decode_logits(model, True), decode_logits(model, False)):
        assert accumulated.shape == plain.shape == (1, 1, 256)
        torch.testing.assert_close(accumulated, plain, rtol=1e-4, atol=1e-4)


def test_accumulating_decode_applies_only_to_one_token_over_a_static_cache():
    model = int4_model(False)
    cache = StaticKVCache(model.config, 1, 8, model.dtype, "cpu")
    token = torch.zeros(1, 1, dtype=torch.long)
    saved = ops.int4_accumulate_decode
    try:
        ops.int4_accumulate_decode = True
        assert decode_accumulate.plan_for_step(model, token, cache, None) is not None
        assert decode_accumulate.plan_for_step(model, torch.zeros(1, 2, dtype=torch.long), cache, None) is None
        assert decode_accumulate.plan_for_step(model, token, None, None) is None
        dense = LlamaForCausalLM(tiny_config()).eval()
        assert decode_accumulate.plan_for_step(dense, token, StaticKVCache(dense.config, 1, 8, dense.dtype, "cpu"),
                                               None) is None
        ops.int4_accumulate_decode = False
        assert decode_accumulate.plan_for_step(model, token, cache, None) is None
    finally:
        ops.int4_accumulate_decode = saved

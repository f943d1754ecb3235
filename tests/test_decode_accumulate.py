"""model/decode_accumulate.py: batch-1 decode over an fp32 residual stream, each product adding into it, gives the
logits of the model as written. On the CPU the ops (ops.int4_accumulate, int4_accumulated_norm,
int4_accumulated_attention) run their PyTorch steps, so this checks the plan and the wiring; the kernels against the
GEMVs are tests/kernels/test_int4_accumulate.py (CUDA)."""

import pytest
import torch

from llmpress.model import decode_accumulate
from tests.test_decode_chain import check_applies_only_to_batch1_decode, decode_logits, int4_model


@pytest.mark.parametrize("quantize_head", [True, False])
def test_accumulating_decode_gives_the_logits_of_the_layers_as_written(quantize_head):
    model = int4_model(quantize_head)
    for accumulated, plain in zip(decode_logits(model, accumulating=True), decode_logits(model)):
        assert accumulated.shape == plain.shape == (1, 1, 256)
        torch.testing.assert_close(accumulated, plain, rtol=1e-4, atol=1e-4)


def test_accumulating_decode_applies_only_to_one_token_over_a_static_cache(monkeypatch):
    from llmpress.kernels import ops
    monkeypatch.setattr(ops, "int4_accumulate_rows", False)  # with it, 2..8 tokens too (the test below)
    check_applies_only_to_batch1_decode(decode_accumulate.plan_for_step, "int4_accumulate_decode", int4_model(False))


def verify_step_logits(model, rows_switch: bool, accumulating: bool, last_only: bool = False, device: str = "cpu",
                       slots: int = 16) -> torch.Tensor:
    """Logits of one 6-token step (a speculative verify step) after a 5-token prefill over a static cache of
    `slots`, the step with ops.int4_accumulate_rows and int4_accumulate_decode as asked."""
    from llmpress.kernels import ops
    from llmpress.model.kv_cache import StaticKVCache
    cache = StaticKVCache(model.config, 1, slots, model.dtype, device)
    ids = torch.randint(0, 256, (1, 11), generator=torch.Generator().manual_seed(1)).to(device)
    saved = ops.int4_accumulate_decode, ops.int4_accumulate_rows
    try:
        with torch.no_grad():
            ops.int4_accumulate_rows = False  # the prefill as the layers are written
            model(ids[:, :5], torch.arange(5, device=device), cache)
            ops.int4_accumulate_decode, ops.int4_accumulate_rows = accumulating, rows_switch
            return model(ids[:, 5:], torch.arange(5, 11, device=device), cache, last_only=last_only)
    finally:
        ops.int4_accumulate_decode, ops.int4_accumulate_rows = saved


@pytest.mark.parametrize("quantize_head", [True, False])
@pytest.mark.parametrize("last_only", [False, True])
def test_accumulating_verify_step_gives_the_logits_of_the_layers_as_written(quantize_head, last_only):
    model = int4_model(quantize_head)
    accumulated = verify_step_logits(model, True, True, last_only)
    plain = verify_step_logits(model, False, False, last_only)
    assert accumulated.shape == plain.shape == (1, 1 if last_only else 6, 256)
    torch.testing.assert_close(accumulated, plain, rtol=1e-4, atol=1e-4)


def test_steps_of_several_tokens_are_planned_only_with_the_rows_switch():
    from llmpress.kernels import ops
    from llmpress.model.kv_cache import StaticKVCache
    model = int4_model(False)
    cache = StaticKVCache(model.config, 1, 16, model.dtype, "cpu")
    saved = ops.int4_accumulate_rows
    try:
        for switch in (False, True):
            ops.int4_accumulate_rows = switch
            six = decode_accumulate.plan_for_step(model, torch.zeros(1, 6, dtype=torch.long), cache, None)
            assert (six is not None) == switch
            assert decode_accumulate.plan_for_step(model, torch.zeros(1, 9, dtype=torch.long), cache, None) is None
            assert decode_accumulate.plan_for_step(model, torch.zeros(2, 6, dtype=torch.long), cache, None) is None
            assert decode_accumulate.plan_for_step(model, torch.zeros(1, 6, dtype=torch.long), cache,
                                                   torch.tensor([5])) is None
    finally:
        ops.int4_accumulate_rows = saved

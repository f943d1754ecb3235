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


def test_accumulating_decode_applies_only_to_one_token_over_a_static_cache():
    check_applies_only_to_batch1_decode(decode_accumulate.plan_for_step, "int4_accumulate_decode", int4_model(False))

"""model/decode_chain.py: batch-1 decode walking each layer's products after attention as one chain (o, gate|up,
down, the next layer's q|k|v or the head) gives the logits of the model as written. On the CPU the chain runs as
`ops.layer_chain_reference`, so this checks the plan and the wiring; the kernel against the GEMVs it replaces is
tests/kernels/test_int4_chain.py (CUDA)."""

import pytest
import torch

from llmpress.kernels import ops
from llmpress.model import LlamaForCausalLM, StaticKVCache
from llmpress.model import decode_chain
from llmpress.model.fusion import fuse_projections
from llmpress.quant.calibration import quantize_model
from llmpress.quant.linear import replace_linears, use_fragment_layouts, use_row_layouts
from llmpress.quant.scheme import QuantScheme
from tests.conftest import tiny_config


def int4_model(quantize_head: bool, device: str = "cpu", dtype: torch.dtype = torch.float32,
               **config) -> LlamaForCausalLM:
    torch.manual_seed(3)
    model = LlamaForCausalLM(tiny_config(**{"hidden_size": 128, "intermediate_size": 256, **config})).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    scheme = QuantScheme(bits=4, group_size=64)
    with torch.no_grad():
        replace_linears(model, quantize_model(model, "rtn", scheme, progress=False,
                                              lm_head=scheme if quantize_head else None))
        model.to(device=device, dtype=dtype)
        model.materialize_buffers(device)  # RoPE's frequencies stay float32, as a loaded model has them
        use_row_layouts(model)
        fuse_projections(model)
        use_fragment_layouts(model, only=True)
    return model


def decode_logits(model: LlamaForCausalLM, chained: bool = False, accumulating: bool = False,
                  steps: int = 3, slots: int = 16) -> list[torch.Tensor]:
    """Prefill a 5-token prompt, then `steps` one-token steps with the chain (ops.int4_layer_chain) and the
    accumulating decode (ops.int4_accumulate_decode) switched as asked for those; both off: the layers as written.
    `slots`: the static cache's length."""
    device = model.lm_head.fragments.device if hasattr(model.lm_head, "fragments") else model.device
    cache = StaticKVCache(model.config, 1, slots, model.dtype, device)
    ids = torch.randint(0, 256, (1, 5 + steps), generator=torch.Generator().manual_seed(0)).to(device)
    saved = ops.int4_layer_chain, ops.int4_accumulate_decode
    outs = []
    try:
        with torch.no_grad():
            ops.int4_layer_chain = ops.int4_accumulate_decode = False  # the prefill as the layers are written
            model(ids[:, :5], torch.arange(5, device=device), cache)
            ops.int4_layer_chain, ops.int4_accumulate_decode = chained, accumulating
            for t in range(5, 5 + steps):
                outs.append(model(ids[:, t:t + 1], torch.tensor([t], device=device), cache).float())
    finally:
        ops.int4_layer_chain, ops.int4_accumulate_decode = saved
    return outs


def check_applies_only_to_batch1_decode(plan_for_step, switch: str, model: LlamaForCausalLM) -> None:
    """`plan_for_step` (decode_chain's or decode_accumulate's) plans a one-token step over a static cache of an
    int4 model with ops.<switch> on, and nothing else: not a prefill, not a step without cache, not a dense model,
    not with the switch off."""
    cache = StaticKVCache(model.config, 1, 8, model.dtype, "cpu")
    token = torch.zeros(1, 1, dtype=torch.long)
    saved = getattr(ops, switch)
    try:
        setattr(ops, switch, True)
        assert plan_for_step(model, token, cache, None) is not None
        assert plan_for_step(model, torch.zeros(1, 2, dtype=torch.long), cache, None) is None  # prefill
        assert plan_for_step(model, token, None, None) is None  # no cache: a whole sequence
        dense = LlamaForCausalLM(tiny_config()).eval()  # no int4 layers at all
        assert plan_for_step(dense, token, StaticKVCache(dense.config, 1, 8, dense.dtype, "cpu"), None) is None
        setattr(ops, switch, False)
        assert plan_for_step(model, token, cache, None) is None
    finally:
        setattr(ops, switch, saved)


@pytest.mark.parametrize("quantize_head", [True, False])
def test_chained_decode_gives_the_logits_of_the_layers_as_written(quantize_head):
    model = int4_model(quantize_head)
    plan = decode_chain.chain_plan(model)
    assert plan is not None and len(plan) == model.config.num_hidden_layers
    assert plan[0]["next"] is plan[1]["qkv"]  # layer 0's chain ends in layer 1's q|k|v
    assert (plan[-1]["next"] is not None) == quantize_head  # and the last one in the head where it is int4
    for chained, plain in zip(decode_logits(model, True), decode_logits(model, False)):
        assert chained.shape == plain.shape == (1, 1, 256)
        torch.testing.assert_close(chained, plain, rtol=1e-5, atol=1e-5)


def test_decode_chain_applies_only_where_every_layer_can_take_it():
    check_applies_only_to_batch1_decode(decode_chain.plan_for_step, "int4_layer_chain", int4_model(True))

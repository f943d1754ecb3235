"""LoRALinear and its swaps: a new adapter changes nothing, merging changes nothing, only adapters learn."""

import pytest
import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.finetune.checkpointing import gradient_checkpointing
from llmpress.finetune.frozen_base import frozen_linear_forward
from llmpress.finetune.lora import LORA_TARGETS, LoRAConfig, LoRALinear, apply_lora, lora_modules, merge_lora
from llmpress.model import LlamaForCausalLM
from llmpress.model.fusion import fuse_projections
from llmpress.quant.calibration import quantize_model
from llmpress.quant.linear import QuantLinear, replace_linears
from llmpress.quant.scheme import QuantScheme
from tests.conftest import tiny_config

ALL = LoRAConfig(r=4, alpha=8, dropout=0.1, targets=LORA_TARGETS)


def tiny_model(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config())
    for p in model.parameters():  # nn.Linear's default init is too small to make the logits interesting
        nn.init.normal_(p, std=0.1)
    return model.eval()


def int4_model(seed: int = 0) -> LlamaForCausalLM:
    model = tiny_model(seed)
    replace_linears(model, quantize_model(model, "rtn", QuantScheme(bits=4, group_size=32), progress=False))
    return model


def randomize_adapters(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0.0, 0.1, generator=generator)


def tokens(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("make", [tiny_model, int4_model], ids=["linear", "int4"])
def test_zero_initialized_adapter_leaves_logits_unchanged(make):
    model, x = make(), tokens()
    before = model(x)
    adapters = apply_lora(model, ALL)
    assert len(adapters) == 2 * len(LORA_TARGETS)
    assert all(torch.all(m.lora_B.weight == 0) and torch.any(m.lora_A.weight != 0) for m in adapters.values())
    assert torch.equal(model(x), before)
    model.train()  # dropout acts on the adapter's input only, and B is zero
    assert torch.equal(model(x), before)


def test_apply_lora_unfuses_fused_projections_first():
    model, x = tiny_model(), tokens()
    fuse_projections(model)
    before = model(x)
    apply_lora(model, ALL)
    randomize_adapters(model)
    for layer in model.model.layers:  # the fused q|k|v and gate|up matrices would bypass the adapters
        assert layer.self_attn.qkv_weight is None and layer.mlp.gate_up_weight is None
    assert not torch.allclose(model(x), before, atol=1e-3)


@pytest.mark.parametrize("make", [tiny_model, int4_model], ids=["linear", "int4"])
def test_merged_and_unmerged_models_give_the_same_logits(make):
    model, x = make(), tokens()
    base = model(x)
    apply_lora(model, ALL)
    randomize_adapters(model)
    unmerged = model(x)
    assert (unmerged - base).abs().max() > 1e-2  # the adapters do something
    assert merge_lora(model) == 2 * len(LORA_TARGETS)
    assert not lora_modules(model) and not any(isinstance(m, QuantLinear) for m in model.modules())
    torch.testing.assert_close(model(x), unmerged, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_model, int4_model], ids=["linear", "int4"])
def test_only_adapter_parameters_receive_gradients(make):
    model = make()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.1, targets=("q_proj", "v_proj", "down_proj")))
    model.train()
    x = tokens()
    torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert trainable == {n for n in named if ".lora_A." in n or ".lora_B." in n}
    assert len(trainable) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    for name, p in named.items():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0 or ".lora_A." in name  # B = 0 gives A no gradient
        else:
            assert p.grad is None, name
    for buffer in model.buffers():
        assert buffer.grad is None


def test_int4_base_passes_the_input_gradient_of_its_dequantized_weight():
    model = int4_model()
    base = model.model.layers[0].self_attn.q_proj
    assert isinstance(base, QuantLinear)
    x = torch.randn(3, 5, base.in_features, requires_grad=True)
    grad_y = torch.randn(3, 5, base.out_features)
    frozen_linear_forward(base, x).backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ base.dequantize_weight(), atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        torch.manual_seed(0)
        apply_lora(model, ALL)
        randomize_adapters(model)
        model.train()
        torch.manual_seed(3)  # the same dropout masks in both runs (checkpoint replays its RNG state)
        with gradient_checkpointing(model, checkpointing):
            x = tokens()
            torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten()).backward()
        assert all(type(layer).__name__ == "DecoderLayer" for layer in model.model.layers)  # unwrapped again
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_lora_linear_is_a_drop_in_linear():
    linear = nn.Linear(32, 48)
    lora = LoRALinear(linear, r=4, alpha=16, dropout=0.0)
    assert lora.scaling == 4.0 and lora.lora_A.weight.shape == (4, 32) and lora.lora_B.weight.shape == (48, 4)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    torch.testing.assert_close(lora(x), linear(x) + 4.0 * x @ lora.lora_A.weight.T @ lora.lora_B.weight.T)


def test_bad_configurations_are_one_sentence_errors():
    with pytest.raises(LlmpressError, match="unknown LoRA target qkv_proj"):
        LoRAConfig(targets=("q_proj", "qkv_proj"))
    with pytest.raises(LlmpressError, match="rank must be at least 1"):
        LoRAConfig(r=0)
    model = tiny_model()
    apply_lora(model, ALL)
    with pytest.raises(LlmpressError, match="already holds LoRA adapters"):
        apply_lora(model, ALL)

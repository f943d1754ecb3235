"""Adapters in the PEFT format: same keys and config as peft 0.21 writes, loadable by PeftModel on the
transformers model with our logits, and PEFT's own adapters loadable by us."""

import json

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.finetune.lora import LoRAConfig, apply_lora, lora_modules
from llmpress.finetune.peft_format import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_state_dict, load_adapter,
                                           save_adapter)
from tests.conftest import hf_pair, tiny_config

peft = pytest.importorskip("peft")

CONFIG = LoRAConfig(r=4, alpha=16, dropout=0.05, targets=("q_proj", "k_proj", "v_proj", "down_proj"))


def randomize(adapters, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in adapters.values():
            module.lora_A.weight.normal_(0.0, 0.2, generator=generator)
            module.lora_B.weight.normal_(0.0, 0.2, generator=generator)


def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def test_keys_shapes_and_config_match_what_peft_saves(tmp_path):
    hf, ours = hf_pair(tiny_config())
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=CONFIG.r, lora_alpha=CONFIG.alpha, lora_dropout=CONFIG.dropout,
                                                         target_modules=list(CONFIG.targets), task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    save_adapter(apply_lora(ours, CONFIG), CONFIG, tmp_path / "ours", base_model_name="tiny")

    import safetensors.torch
    theirs = safetensors.torch.load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    mine = safetensors.torch.load_file(str(tmp_path / "ours" / ADAPTER_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in mine
    their_config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    my_config = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_dora", "use_rslora",
                "fan_in_fan_out", "modules_to_save"):
        assert my_config[key] == their_config[key], key
    assert sorted(my_config["target_modules"]) == sorted(their_config["target_modules"])
    assert my_config["base_model_name_or_path"] == "tiny"
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "ours")).r == CONFIG.r


@pytest.mark.parametrize("variant", [{}, dict(num_key_value_heads=1, tie_word_embeddings=True)], ids=["mha", "gqa-tied"])
def test_our_adapter_loads_in_peft_and_gives_our_logits(tmp_path, variant):
    hf, ours = hf_pair(tiny_config(**variant))
    adapters = apply_lora(ours, CONFIG)
    randomize(adapters)
    x = tokens()
    with torch.no_grad():
        expected = ours.eval()(x)
        base = hf(x).logits
    save_adapter(adapters, CONFIG, tmp_path / "adapter")
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=x).logits
    assert (expected - base).abs().max() > 1e-2  # the adapter matters, so agreeing is not trivial
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_peft_adapter_loads_in_llmpress_and_round_trips(tmp_path):
    hf, ours = hf_pair(tiny_config())
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                                         task_type="CAUSAL_LM", init_lora_weights=False)).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"))
    x = tokens()
    with torch.no_grad():
        expected = peft_model(input_ids=x).logits
    config, adapters = load_adapter(ours, tmp_path / "peft")
    assert config.targets == ("o_proj", "q_proj", "up_proj") and config.scaling == 2.0
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), expected, atol=1e-4, rtol=0)
    # and back out: our save of what we loaded holds the same tensors
    save_adapter(adapters, config, tmp_path / "again")
    import safetensors.torch
    again = safetensors.torch.load_file(str(tmp_path / "again" / ADAPTER_WEIGHTS))
    original = safetensors.torch.load_file(str(tmp_path / "peft" / ADAPTER_WEIGHTS))
    assert again.keys() == original.keys() and all(torch.equal(again[k], original[k]) for k in again)


def test_unusable_adapters_are_one_sentence_errors(tmp_path):
    _, ours = hf_pair(tiny_config())
    with pytest.raises(LlmpressError, match="is not a PEFT adapter directory"):
        load_adapter(ours, tmp_path)
    save_adapter(apply_lora(ours, CONFIG), CONFIG, tmp_path / "a")
    config = json.loads((tmp_path / "a" / ADAPTER_CONFIG).read_text())
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps(dict(config, use_dora=True)))
    _, fresh = hf_pair(tiny_config())
    with pytest.raises(LlmpressError, match="use_dora=True is not supported"):
        load_adapter(fresh, tmp_path / "a")
    # an adapter for another shape of model
    save_adapter(lora_modules(ours), CONFIG, tmp_path / "b")
    _, wider = hf_pair(tiny_config(hidden_size=128, num_attention_heads=4))
    with pytest.raises(LlmpressError, match="trained for another model"):
        load_adapter(wider, tmp_path / "b")
    assert set(adapter_state_dict(lora_modules(ours))) == {
        f"base_model.model.model.layers.{i}.{p}.{n}.{ab}.weight" for i in range(2)
        for p, n in (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"))
        for ab in ("lora_A", "lora_B")}

"""Shared fixtures: tiny random Llama variants paired with transformers, and the embedded real model."""

from __future__ import annotations

import pytest
import torch

from llmpress.config import LLAMA_3_2_ROPE, LlamaConfig


def tiny_config(**overrides) -> LlamaConfig:
    """A 2-layer Llama small enough for CPU tests; overrides pick the variant (GQA, rope scaling, tying)."""
    values = dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                  max_position_embeddings=512, tie_word_embeddings=False, eos_token_ids=[255])
    values.update(overrides)
    return LlamaConfig(**values)


TINY_VARIANTS = {
    "llama2-mha-untied": dict(num_key_value_heads=4),
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3-rope-gqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True, rope_theta=500000.0,
                                 rope_scaling=dict(LLAMA_3_2_ROPE, original_max_position_embeddings=64)),
    "linear-rope-untied": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


def hf_pair(config: LlamaConfig, seed: int = 0):
    """A random transformers LlamaForCausalLM and our model holding the same weights (fp32, eval)."""
    import transformers
    from llmpress.model import LlamaForCausalLM
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf_dict())).eval()
    ours = LlamaForCausalLM(config)
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.tie_weights()
    return hf, ours.eval()


@pytest.fixture(scope="session")
def embedded():
    """Our loaded SmolLM2-135M-Instruct (the embedded default model), fp32 on CPU."""
    from llmpress.loading import load_model
    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_embedded():
    """transformers' own load of the same GGUF file, the reference for the embedded model."""
    from transformers import AutoModelForCausalLM
    from llmpress.loading.embedded import embedded_gguf_path
    path = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

"""Write a model as a plain Hugging Face directory (config.json, model.safetensors, tokenizer) that every
llmpress command and transformers load: fake-quantized models, and later merged LoRA fine-tunes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from llmpress.atomic_write import write_directory
from llmpress.model import LlamaForCausalLM

WEIGHTS_FILE = "model.safetensors"


def save_hf_checkpoint(model: LlamaForCausalLM, tokenizer: Any, out_dir: str | Path, dtype: torch.dtype = torch.float16,
                       generation_config: dict | None = None, extra_config: dict | None = None) -> Path:
    """Save weights in `dtype` with Hugging Face names; `extra_config` keys are added to config.json."""
    import safetensors.torch
    config = dict(model.config.to_hf_dict(), torch_dtype=str(dtype).removeprefix("torch."), **(extra_config or {}))
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # tied: stored once, as embed_tokens
        # clone: fused projections are views of one buffer, and safetensors refuses shared storage
        tensors[name] = tensor.detach().to("cpu", dtype).clone()

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return write_directory(Path(out_dir), fill)

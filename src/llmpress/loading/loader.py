"""Build a `LlamaForCausalLM` on the meta device and fill it with weights from any supported source."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from llmpress.config import KNOWN_ARCHITECTURES, LlamaConfig
from llmpress.errors import LlmpressError, ModelLoadError
from llmpress.loading.resolve import ModelSource, resolve_model_spec
from llmpress.model import LlamaForCausalLM

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    tokenizer: Any  # a transformers tokenizer, or None for random-weight architectures
    config: LlamaConfig
    name: str
    source: ModelSource
    generation_defaults: dict = field(default_factory=dict)

    @property
    def stop_token_ids(self) -> list[int]:
        """EOS ids from config.json, generation_config.json and the tokenizer, deduplicated."""
        ids = list(self.config.eos_token_ids)
        gen_eos = self.generation_defaults.get("eos_token_id")
        ids += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        return sorted(set(ids))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LlmpressError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    return device


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise LlmpressError(f"unknown dtype {dtype!r}; choose auto, bfloat16, float16 or float32.")
    return DTYPES[dtype]


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto",
               seed: int = 0) -> LoadedModel:
    """Load `spec` (alias, HF directory, .gguf, hub id, or `random:<architecture>`) ready for inference."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = resolve_model_spec(spec)
    tokenizer, generation_defaults = None, {}
    if source.kind == "hf_dir":
        from llmpress.loading import hf_dir
        config = hf_dir.read_config(source.path)
        generation_defaults = hf_dir.read_generation_config(source.path)
        tensors = hf_dir.iter_safetensors(hf_dir.safetensors_files(source.path), device, dtype)
        quantization = hf_dir.read_quantization_config(source.path)
        if quantization is None:
            model = build_model(config, tensors, device, dtype, origin=str(source.path))
        else:  # GPTQ / AWQ: packed linears become QuantLinear
            from llmpress.loading.quantized import build_quantized_model
            model = build_quantized_model(config, quantization, tensors, device, dtype, origin=str(source.path))
        tokenizer = _load_hf_tokenizer(source.path)
    elif source.kind == "gguf":
        from llmpress.loading import gguf_file
        reader = gguf_file.open_gguf(source.path)
        config = gguf_file.read_gguf_config(reader, source.path)
        model = build_model(config, gguf_file.iter_gguf_tensors(reader, config, device, dtype), device, dtype,
                            origin=str(source.path))
        tokenizer = gguf_file.load_gguf_tokenizer(source.path)
    else:
        config = KNOWN_ARCHITECTURES[source.architecture]
        model = random_model(config, device, dtype, seed=seed)
    return LoadedModel(model, tokenizer, config, spec, source, generation_defaults)


def build_model(config: LlamaConfig, tensors: Iterator[tuple[str, torch.Tensor]], device: torch.device,
                dtype: torch.dtype, origin: str, model: LlamaForCausalLM | None = None) -> LlamaForCausalLM:
    """Meta-device construction, then `load_state_dict(assign=True)`: weights are allocated once, in `dtype`.
    `model`: a meta-built model some of whose modules are already real (quantized layers); only its meta
    tensors are read from `tensors`."""
    if model is None:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    expected = {name: p.shape for name, p in model.state_dict().items() if p.is_meta}
    state, unexpected = {}, []
    for name, tensor in tensors:
        if name not in expected:
            if not name.endswith("rotary_emb.inv_freq"):  # old transformers versions saved the rope buffer
                unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ModelLoadError(f"{origin}: weight {name} has shape {tuple(tensor.shape)} but config.json implies "
                                 f"{tuple(expected[name])}; the weights and config.json do not belong together.")
        state[name] = tensor
    if unexpected:  # e.g. more layers than config.json says: loading the rest would silently run another model
        raise ModelLoadError(f"{origin}: {len(unexpected)} weights are not part of the model config.json describes "
                             f"(first: {unexpected[0]}); the weights and config.json do not belong together.")
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelLoadError(f"{origin}: {len(missing)} weights are missing (first: {missing[0]}); "
                             "the checkpoint is incomplete or not a Llama model.")
    model.load_state_dict(state, strict=False, assign=True)
    return _finish(model, device)


def random_model(config: LlamaConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """Random weights (normal, std 0.02; norms at 1) of a real architecture, for speed benchmarks."""
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = {}
    for name, p in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            state[name] = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            state[name] = torch.empty(p.shape, device=device, dtype=dtype).normal_(0.0, 0.02, generator=generator)
    model.load_state_dict(state, strict=False, assign=True)
    return _finish(model, device)


def _finish(model: LlamaForCausalLM, device: torch.device) -> LlamaForCausalLM:
    model.tie_weights()
    model.materialize_buffers(device)
    model.requires_grad_(False)
    return model.eval()


def _load_hf_tokenizer(model_dir: Path):
    if not any((model_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        log.warning("%s has no tokenizer files; text generation will need token ids.", model_dir)
        return None
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as error:
        raise ModelLoadError(f"{model_dir}: the tokenizer could not be loaded ({type(error).__name__}: {str(error)[:160]}).") from None

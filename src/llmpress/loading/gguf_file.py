"""Read a GGUF file of Llama architecture: config from metadata, weights dequantized with the `gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from llmpress.config import LlamaConfig
from llmpress.errors import ModelLoadError, UnsupportedModelError

# GGUF tensor name -> Hugging Face parameter name (llama.cpp's convert_hf_to_gguf mapping, reversed).
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def open_gguf(path: Path):
    from gguf import GGUFReader
    try:
        return GGUFReader(str(path))
    except Exception as error:
        raise ModelLoadError(f"{path} is not a readable GGUF file ({type(error).__name__}: {str(error)[:160]}); re-download it.") from None


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf_config(reader, path: Path) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UnsupportedModelError(f"{path} holds a '{arch}' model; llmpress runs Llama-architecture GGUF files.")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise UnsupportedModelError(f"{path} uses per-frequency rope scaling (Llama-3.1+ GGUF), which the GGUF loader "
                                    "does not read; pass the Hugging Face checkpoint directory instead.")
    names = {t.name for t in reader.tensors}
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(_field(reader, "llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // n_heads)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [int(eos)],
    )


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: it interleaves the two rotary halves of each head
    (GGML's rope rotates adjacent pairs), while HF-layout models rotate the halves."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_tensors(reader, config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, dequantized tensor) for every weight in the file."""
    from gguf.quants import dequantize
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        weight = dequantize(tensor.data, tensor.tensor_type)
        if name.endswith("q_proj.weight"):
            weight = _unpermute_rope(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rope(weight, config.num_key_value_heads)
        yield name, torch.from_numpy(np.array(weight, copy=True)).to(device=device, dtype=dtype)


def _hf_name(gguf_name: str) -> str:
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")  # blk.N.attn_q.weight
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} is not part of the Llama architecture llmpress runs.")


def load_gguf_tokenizer(path: Path):
    """The tokenizer and chat template stored in the GGUF metadata, through transformers' GGUF support."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

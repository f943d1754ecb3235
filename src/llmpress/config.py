"""Model configuration: one dataclass built from a Hugging Face `config.json` (or GGUF metadata)."""

from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any

from llmpress.errors import ModelLoadError, UnsupportedModelError

# model_type values whose checkpoints are the plain Llama decoder (same parameter names and math).
LLAMA_MODEL_TYPES = ("llama",)
# config.json fields without a sensible default: a checkpoint lacking one is broken.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None for plain rope; {"rope_type": "llama3", "factor": .., "low_freq_factor": ..,
    # "high_freq_factor": .., "original_max_position_embeddings": ..} for Llama-3.1/3.2;
    # {"rope_type": "linear", "factor": ..} for linear position interpolation.
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}; fix the model's config.json."
            )

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        """Build from a transformers config dict (4.x `rope_scaling` or 5.x `rope_parameters` style)."""
        if not isinstance(d, dict):
            raise ModelLoadError(f"{source} holds a JSON {type(d).__name__}, not an object; fix or re-download it.")
        model_type = d.get("model_type")
        archs = d.get("architectures") or []
        if model_type not in LLAMA_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source} describes a '{model_type}' model ({', '.join(archs) or 'no architectures'}); "
                "llmpress runs Llama-family models (model_type 'llama': Llama-2/3.x, SmolLM/SmolLM2). "
                "Pass a Llama checkpoint."
            )
        if d.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={d['hidden_act']!r} is not supported; Llama uses 'silu'.")
        missing = [name for name in REQUIRED_FIELDS if name not in d]
        if missing:
            raise ModelLoadError(f"{source} lacks {', '.join(missing)}; fix or re-download it.")
        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        rope_params = d.get("rope_parameters")
        if isinstance(rope_params, dict):  # transformers >= 5 folds theta and scaling into one dict
            rope_theta = rope_params.get("rope_theta", rope_theta)
            if rope_params.get("rope_type", "default") != "default":
                rope_scaling = rope_params
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
            # One spelling whatever the source: theta has its own field, and "type" is 4.x's old name for "rope_type".
            rope_scaling = {k: v for k, v in rope_scaling.items() if k not in ("rope_theta", "type")}
            rope_scaling["rope_type"] = rope_type
            if rope_type == "default":
                rope_scaling = None
            elif rope_type not in ("llama3", "linear"):
                raise UnsupportedModelError(
                    f"{source}: rope scaling type {rope_type!r} is not supported (supported: llama3, linear)."
                )
        eos = d.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(d.get("torch_dtype") or d.get("dtype") or "float32").replace("torch.", ""),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers `config.json` for this model (4.x field names, which 5.x also reads)."""
        d = asdict(self)
        eos = d.pop("eos_token_ids")
        d["eos_token_id"] = eos[0] if len(eos) == 1 else (eos or None)
        d.update(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu")
        return d

    @property
    def num_params(self) -> int:
        """Parameter count (tied embeddings counted once)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_attention_heads * 2 + self.num_key_value_heads * 2)
        layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * layer + self.vocab_size * h + h + head


# Published architectures, for benchmarks with random weights (no download needed).
# Values copied from the checkpoints' config.json files.
LLAMA_3_2_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

KNOWN_ARCHITECTURES: dict[str, LlamaConfig] = {
    "llama-3.2-1b": LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=LLAMA_3_2_ROPE, max_position_embeddings=131072,
                                tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=[128001, 128008, 128009],
                                torch_dtype="bfloat16"),
    "llama-3.2-3b": LlamaConfig(vocab_size=128256, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                num_attention_heads=24, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                                rope_theta=500000.0, rope_scaling=LLAMA_3_2_ROPE, max_position_embeddings=131072,
                                tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=[128001, 128008, 128009],
                                torch_dtype="bfloat16"),
    "llama-2-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                              num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                              max_position_embeddings=4096, bos_token_id=1, eos_token_ids=[2], torch_dtype="float16"),
}

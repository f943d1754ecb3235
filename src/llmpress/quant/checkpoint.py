"""Save a quantized model as a Hugging Face directory that vLLM, transformers, AutoGPTQ and AutoAWQ load unchanged.

GPTQ v1 (`quant_method: gptq`, `checkpoint_format: gptq`) or AutoAWQ GEMM (`quant_method: awq`, `version: gemm`):
config.json with `quantization_config`, model.safetensors holding the packed linears
(`<prefix>.qweight/.qzeros/.scales[/.g_idx]`) and everything else in fp16, plus tokenizer files.
The directory is written under a temporary name beside `out_dir` and renamed into place, so a crash never
leaves a half-written model where a reader would look for one. `loading/quantized.py` reads it back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmpress.config import LlamaConfig
from llmpress.atomic_write import write_directory
from llmpress.errors import LlmpressError
from llmpress.quant.format import is_trivial_g_idx, pack_awq, pack_gptq
from llmpress.quant.linear import QuantLinear
from llmpress.quant.scheme import QuantizedWeight, QuantScheme

log = logging.getLogger(__name__)

FORMATS = ("gptq", "awq")
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DTYPE = torch.float16  # what GPTQ/AWQ kernels and loaders expect for scales and unquantized weights


def quantization_config(fmt: str, scheme: QuantScheme, quantized: dict[str, QuantizedWeight],
                        unquantized_linears: list[str] = (), extra: dict | None = None) -> dict[str, Any]:
    """The `quantization_config` of config.json, in the keys AutoGPTQ/GPTQModel or AutoAWQ write."""
    if fmt == "gptq":
        act_order_g_idx = [not is_trivial_g_idx(qw.g_idx, qw.scheme.group_size_for(qw.g_idx.numel()))
                           for qw in quantized.values()]
        config = {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            # Readers ignore g_idx unless desc_act is set, so any permuted g_idx forces it on.
            "desc_act": scheme.act_order or any(act_order_g_idx),
            "sym": scheme.sym,
            "true_sequential": True,
            "static_groups": scheme.act_order and not any(act_order_g_idx),
            "lm_head": "lm_head" in quantized,
            "checkpoint_format": "gptq",
        }
    else:
        config = {
            "quant_method": "awq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            # Without a zero point vLLM's AWQ-Marlin path uses the fixed bias 2^(bits-1), which is what
            # our symmetric schemes store in qzeros for the kernels that read it.
            "zero_point": not scheme.sym,
            "sym": scheme.sym,  # transformers 5 reads AWQ through GPTQModel, whose config defaults to sym
            "version": "gemm",
            "modules_to_not_convert": list(unquantized_linears) or None,
        }
    config.update(extra or {})
    return config


def save_quantized(model: nn.Module, quantized: dict[str, QuantizedWeight], tokenizer: Any, out_dir: str | Path,
                   scheme: QuantScheme, fmt: str = "gptq", source_config: LlamaConfig | None = None,
                   generation_config: dict | None = None, quant_config_extra: dict | None = None) -> Path:
    """Write `model` with the linears named in `quantized` (plus any QuantLinear it already holds) packed in `fmt`.

    `source_config` defaults to `model.config`; `generation_config` (e.g. LoadedModel.generation_defaults) is
    written when given; `quant_config_extra` adds keys to `quantization_config` (e.g. damp_percent).
    Refuses an existing non-empty `out_dir`. Returns the directory.
    """
    if fmt not in FORMATS:
        raise LlmpressError(f"unknown checkpoint format {fmt!r}; choose gptq or awq.")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LlmpressError(f"{out_dir} already exists and is not empty; choose a new output directory "
                            "(llmpress never overwrites files).")  # checked early: before minutes of packing
    config = source_config or model.config
    quantized = {**_held_quantized(model, scheme), **quantized}
    _check_scheme(quantized, scheme, fmt)
    unquantized_linears = sorted(name for name, m in model.named_modules()
                                 if isinstance(m, nn.Linear) and name != "lm_head" and name not in quantized)
    if unquantized_linears and fmt == "gptq":
        log.warning("%d linears stay unquantized (first: %s); GPTQ readers such as vLLM expect every decoder "
                    "linear quantized.", len(unquantized_linears), unquantized_linears[0])

    # Pack everything before touching the disk: a refusal (3-bit, zero point 0, act-order in AWQ) writes nothing.
    pack = pack_gptq if fmt == "gptq" else pack_awq
    tensors = _unquantized_tensors(model, quantized, config)
    for prefix, qw in quantized.items():
        for leaf, tensor in pack(qw).items():
            tensors[f"{prefix}.{leaf}"] = tensor.cpu()

    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = "float16"
    if "lm_head" in quantized:  # a quantized head can no longer share the embedding matrix
        hf_config["tie_word_embeddings"] = False
    quant_config = quantization_config(fmt, scheme, quantized, unquantized_linears, quant_config_extra)
    hf_config["quantization_config"] = quant_config

    def fill(tmp: Path) -> None:
        _write_json(tmp / "config.json", hf_config)
        if fmt == "gptq":  # older AutoGPTQ and vLLM releases read this file rather than config.json
            _write_json(tmp / "quantize_config.json", quant_config)
        if generation_config:
            _write_json(tmp / "generation_config.json", generation_config)
        import safetensors.torch  # looked up at call time, so tests can make it fail
        safetensors.torch.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    write_directory(out_dir, fill)
    log.info("saved %d %s-quantized linears to %s", len(quantized), fmt.upper(), out_dir)
    return out_dir


def _held_quantized(model: nn.Module, scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    """QuantLinear layers already in the model, unpacked (so a loaded quantized model can be saved again)."""
    return {name: m.quantized_weight(scheme) for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def _check_scheme(quantized: dict[str, QuantizedWeight], scheme: QuantScheme, fmt: str) -> None:
    """config.json holds one bits/group_size for all layers: every weight must agree with `scheme`."""
    if fmt == "awq" and scheme.group_size == -1:
        raise LlmpressError("AWQ checkpoints need a group size (readers such as vLLM reject -1); "
                            "use --group-size 128 or --format gptq.")
    if fmt == "awq" and "lm_head" in quantized:
        raise LlmpressError("AWQ checkpoints keep lm_head unquantized; use --format gptq to save a quantized head.")
    for name, qw in quantized.items():
        in_features = qw.qweight.shape[1]
        if qw.scheme.bits != scheme.bits or qw.scales.shape[1] != scheme.groups(in_features):
            raise ValueError(f"{name} was quantized with {qw.scheme.bits} bits and {qw.scales.shape[1]} groups, "
                             f"but the checkpoint's scheme is {scheme.bits} bits, group size {scheme.group_size}")
        if scheme.sym and not bool((qw.zeros == 2 ** (scheme.bits - 1)).all()):
            raise ValueError(f"{name}: a symmetric scheme needs every zero point at {2 ** (scheme.bits - 1)}")


def _unquantized_tensors(model: nn.Module, quantized: dict[str, QuantizedWeight],
                         config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Every state-dict entry except the quantized layers' weights, as fp16 CPU copies (biases are kept)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in quantized and leaf != "bias":
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings and "lm_head" not in quantized:
            continue  # tied: readers take the head from embed_tokens
        # copy=True: fused projections are views of one buffer, and safetensors refuses shared storage.
        dtype = CHECKPOINT_DTYPE if tensor.is_floating_point() else tensor.dtype
        tensors[name] = tensor.detach().to(device="cpu", dtype=dtype, copy=True).contiguous()
    return tensors


def _write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n")

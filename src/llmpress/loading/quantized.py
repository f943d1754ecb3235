"""Load GPTQ (v1) and AutoAWQ GEMM checkpoints: ours and published ones, as QuantLinear modules.

config.json's `quantization_config` says which packing the `<prefix>.qweight/.qzeros/.scales[/.g_idx]`
tensors use; format.py unpacks them and QuantLinear keeps them in the runtime layout. Variants with
another bit layout (GPTQ v2 or Marlin, AWQ GEMV/Marlin/Exllama, bitsandbytes, fp8, ...) are refused
with one sentence rather than loaded wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from llmpress.config import LlamaConfig
from llmpress.errors import LlmpressError, ModelLoadError
from llmpress.loading.loader import build_model
from llmpress.model import LlamaForCausalLM
from llmpress.quant.format import GPTQ_BITS, is_trivial_g_idx, unpack_awq, unpack_gptq
from llmpress.quant.linear import QuantLinear

PACKED_LEAVES = ("qweight", "qzeros", "scales", "g_idx")
REQUIRED_LEAVES = ("qweight", "qzeros", "scales")  # g_idx is optional in GPTQ (i // group_size) and absent in AWQ


@dataclass(frozen=True)
class CheckpointQuantization:
    """What llmpress needs from a `quantization_config`, after validation."""
    method: str  # "gptq" | "awq"
    bits: int
    group_size: int  # -1: one group per output row
    sym: bool
    desc_act: bool


def parse_quantization_config(d: dict, origin: str) -> CheckpointQuantization:
    """Validate a `quantization_config` (or AutoGPTQ/AutoAWQ side file); ModelLoadError for what we cannot run."""
    if not isinstance(d, dict):
        raise ModelLoadError(f"{origin}: quantization_config is a JSON {type(d).__name__}, not an object; "
                             "fix or re-download config.json.")
    method = d.get("quant_method")
    if method is None:  # the side files of older AutoGPTQ / AutoAWQ releases name no method
        method = "awq" if any(key in d for key in ("w_bit", "version", "zero_point")) else "gptq"
    method = str(method).lower()
    if method not in ("gptq", "awq"):
        raise ModelLoadError(f"{origin}: quant_method {method!r} is not supported; llmpress loads GPTQ and AWQ "
                             "(GEMM) checkpoints, so pass the unquantized model or quantize it with "
                             "`llmpress quantize`.")
    bits, group_size = d.get("bits", d.get("w_bit")), d.get("group_size", d.get("q_group_size"))
    if not isinstance(bits, int) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ModelLoadError(f"{origin}: quantization_config needs integer bits and group_size (positive or -1), "
                             f"got bits={bits!r}, group_size={group_size!r}; fix or re-download config.json.")
    if method == "gptq":
        layout = "marlin" if d.get("is_marlin_format") else str(d.get("checkpoint_format", d.get("format", "gptq")))
        if layout.lower() != "gptq":
            raise ModelLoadError(f"{origin}: GPTQ checkpoint_format {layout!r} is not supported; llmpress reads the "
                                 "v1 'gptq' layout, so re-save the model with checkpoint_format 'gptq' (GPTQModel: "
                                 "format='gptq').")
        if bits not in GPTQ_BITS:
            raise ModelLoadError(f"{origin}: {bits}-bit GPTQ checkpoints are not supported; llmpress reads 2, 4 and "
                                 "8-bit GPTQ packing.")
        if str(d.get("pack_dtype", "int32")).replace("torch.", "") != "int32":
            raise ModelLoadError(f"{origin}: GPTQ pack_dtype {d['pack_dtype']!r} is not supported; llmpress reads "
                                 "int32-packed GPTQ checkpoints.")
        return CheckpointQuantization("gptq", bits, group_size, sym=bool(d.get("sym", True)),
                                      desc_act=bool(d.get("desc_act", False)))
    version = str(d.get("version", "gemm"))
    if version.lower() != "gemm":
        raise ModelLoadError(f"{origin}: AWQ version {version!r} is not supported; llmpress reads AutoAWQ's GEMM "
                             "packing (version 'gemm').")
    if bits != 4:
        raise ModelLoadError(f"{origin}: {bits}-bit AWQ checkpoints are not supported; AWQ GEMM packing is 4-bit.")
    return CheckpointQuantization("awq", bits, group_size, sym=not bool(d.get("zero_point", True)), desc_act=False)


def build_quantized_model(config: LlamaConfig, quantization: dict, tensors: Iterator[tuple[str, torch.Tensor]],
                          device: torch.device, dtype: torch.dtype, origin: str) -> LlamaForCausalLM:
    """A LlamaForCausalLM whose packed linears are QuantLinear (scales in `dtype`); the rest loads as usual."""
    quant = parse_quantization_config(quantization, origin)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for name, tensor in tensors:
        prefix, _, leaf = name.rpartition(".")
        if leaf in PACKED_LEAVES and prefix in linears:
            packed.setdefault(prefix, {})[leaf] = tensor
        else:
            plain[name] = tensor
    if not packed:
        raise ModelLoadError(f"{origin}: config.json declares {quant.method.upper()} quantization but no weight is "
                             "packed (no *.qweight tensors); the weights and config.json do not belong together.")
    if "lm_head" in packed and config.tie_word_embeddings:
        raise ModelLoadError(f"{origin}: lm_head is quantized but config.json ties it to the embeddings; "
                             "set tie_word_embeddings to false or re-save the checkpoint.")
    for prefix, parts in packed.items():
        model.set_submodule(prefix, _quant_linear(prefix, parts, plain.pop(f"{prefix}.bias", None), linears[prefix],
                                                  quant, dtype, origin))
    return build_model(config, iter(plain.items()), device, dtype, origin, model=model)


def _quant_linear(prefix: str, parts: dict[str, torch.Tensor], bias: torch.Tensor | None, linear: nn.Linear,
                  quant: CheckpointQuantization, dtype: torch.dtype, origin: str) -> QuantLinear:
    missing = [f"{prefix}.{leaf}" for leaf in REQUIRED_LEAVES if leaf not in parts]
    if missing:
        raise ModelLoadError(f"{origin}: {len(missing)} packed tensors are missing (first: {missing[0]}); "
                             "the checkpoint is incomplete.")
    try:
        if quant.method == "gptq":
            qw = unpack_gptq(parts, quant.bits, quant.group_size, sym=quant.sym, act_order=quant.desc_act)
        else:
            qw = unpack_awq(parts, quant.group_size, quant.bits, sym=quant.sym)
    except (ValueError, LlmpressError) as error:
        raise ModelLoadError(f"{origin}: {prefix} cannot be read as a {quant.bits}-bit {quant.method.upper()} layer "
                             f"({error}); the checkpoint is corrupt or config.json does not describe it.") from None
    if tuple(qw.qweight.shape) != (linear.out_features, linear.in_features):
        raise ModelLoadError(f"{origin}: {prefix} unpacks to shape {tuple(qw.qweight.shape)} but config.json "
                             f"implies {(linear.out_features, linear.in_features)}; the weights and config.json "
                             "do not belong together.")
    if not quant.desc_act and not is_trivial_g_idx(qw.g_idx, qw.scheme.group_size_for(linear.in_features)):
        # Readers such as vLLM ignore g_idx without desc_act, so this checkpoint means two different models.
        raise ModelLoadError(f"{origin}: {prefix}.g_idx reorders input channels but desc_act is false; the "
                             "checkpoint is inconsistent: set desc_act to true in config.json if the g_idx is right.")
    if linear.bias is not None and bias is None:
        raise ModelLoadError(f"{origin}: weight {prefix}.bias is missing; the checkpoint is incomplete.")
    return QuantLinear.from_quantized(qw, bias=bias, dtype=dtype)

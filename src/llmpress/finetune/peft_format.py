"""LoRA adapters in the PEFT format: `adapter_config.json` + `adapter_model.safetensors`.

The files are what `peft.PeftModel.save_pretrained` writes for a causal LM (checked against peft 0.21 in
tests/finetune/test_peft_format.py), so `PeftModel.from_pretrained(transformers_model, DIR)` loads ours
and `load_adapter` loads adapters trained with PEFT. Keys: `base_model.model.` + the projection's name
+ `.lora_A.weight` [r, in] or `.lora_B.weight` [out, r].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmpress.atomic_write import write_directory
from llmpress.errors import LlmpressError
from llmpress.finetune.lora import LoRAConfig, LoRALinear, apply_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the causal LM)

# PEFT options we do not implement, with the value that means "off".
UNSUPPORTED_OPTIONS = {"use_dora": False, "use_rslora": False, "bias": "none", "modules_to_save": None,
                       "layers_to_transform": None, "fan_in_fan_out": False, "rank_pattern": {},
                       "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
                       "trainable_token_indices": None, "target_parameters": None}


def adapter_config_dict(config: LoRAConfig, base_model_name: str | None = None) -> dict:
    """adapter_config.json's contents (the keys PEFT reads; the rest keep PEFT's defaults)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name,
            "r": config.r, "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha, "lora_dropout": config.dropout,
            "target_modules": sorted(config.targets), "init_lora_weights": True, "inference_mode": True,
            **UNSUPPORTED_OPTIONS}


def adapter_state_dict(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """PEFT-named float32 CPU copies of every adapter's A and B."""
    tensors = {}
    for name, module in adapters.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(module, part).weight.detach().float().cpu().clone()
    return tensors


def load_adapter_state(adapters: dict[str, LoRALinear], tensors: dict[str, torch.Tensor], origin: str = "adapter") -> None:
    """Copy PEFT-named tensors into the adapters; every adapter must be covered and every tensor used."""
    expected = {f"{PEFT_PREFIX}{name}.{part}.weight": getattr(module, part).weight
                for name, module in adapters.items() for part in ("lora_A", "lora_B")}
    unexpected = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    if unexpected or missing:
        first = (unexpected or missing)[0]
        raise LlmpressError(f"{origin}: the adapter's weights do not match this model's target projections "
                            f"({len(missing)} missing, {len(unexpected)} unexpected, first: {first}); "
                            "load it on the model it was trained for.")
    with torch.no_grad():
        for key, param in expected.items():
            if tuple(tensors[key].shape) != tuple(param.shape):
                raise LlmpressError(f"{origin}: {key} has shape {tuple(tensors[key].shape)} but the model needs "
                                    f"{tuple(param.shape)}; the adapter was trained for another model.")
            param.copy_(tensors[key])


def write_adapter_files(directory: Path, adapters: dict[str, LoRALinear], config: LoRAConfig,
                        base_model_name: str | None = None) -> None:
    """Write the two files into an existing directory (a temporary one: see `save_adapter`)."""
    import safetensors.torch
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config_dict(config, base_model_name), indent=2) + "\n")
    safetensors.torch.save_file(adapter_state_dict(adapters), str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})


def save_adapter(adapters: dict[str, LoRALinear], config: LoRAConfig, out_dir: str | Path,
                 base_model_name: str | None = None) -> Path:
    """The adapter as a new PEFT directory, written to a temporary sibling and renamed."""
    return write_directory(Path(out_dir), lambda tmp: write_adapter_files(tmp, adapters, config, base_model_name))


def read_adapter(path: str | Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The LoRAConfig and PEFT-named tensors of an adapter directory (ours or PEFT's)."""
    import safetensors.torch
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise LlmpressError(f"{path} is not a PEFT adapter directory (it needs {ADAPTER_CONFIG} and "
                            f"{ADAPTER_WEIGHTS}); pass the directory that `llmpress finetune` or PEFT wrote.")
    raw = json.loads(config_file.read_text())
    if raw.get("peft_type") != "LORA":
        raise LlmpressError(f"{config_file}: peft_type is {raw.get('peft_type')!r}; only LoRA adapters load here.")
    for option, off in UNSUPPORTED_OPTIONS.items():
        if raw.get(option, off) not in (off, None, {}, False):
            raise LlmpressError(f"{config_file}: {option}={raw[option]!r} is not supported by llmpress's LoRA; "
                                "use an adapter trained without it.")
    targets = raw.get("target_modules")
    if not isinstance(targets, list):
        raise LlmpressError(f"{config_file}: target_modules must be a list of projection names, got {targets!r}.")
    config = LoRAConfig(r=int(raw["r"]), alpha=float(raw["lora_alpha"]), dropout=float(raw.get("lora_dropout", 0.0)),
                        targets=tuple(sorted(targets)))
    return config, safetensors.torch.load_file(str(weights_file))


def load_adapter(model: nn.Module, path: str | Path) -> tuple[LoRAConfig, dict[str, LoRALinear]]:
    """Wrap `model`'s target projections with the adapter stored at `path` (PEFT format)."""
    config, tensors = read_adapter(path)
    adapters = apply_lora(model, config)
    load_adapter_state(adapters, tensors, origin=str(path))
    return config, adapters

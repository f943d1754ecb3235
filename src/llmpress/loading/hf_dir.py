"""Read a Hugging Face model directory: config.json, generation_config.json, single or sharded safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from llmpress.config import LlamaConfig
from llmpress.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path} is missing; a model directory needs it.") from None
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{path} is not valid JSON ({error.msg} at line {error.lineno}); fix or re-download it.") from None


def read_config(model_dir: Path) -> LlamaConfig:
    return LlamaConfig.from_hf_dict(read_json(model_dir / "config.json"), source=str(model_dir / "config.json"))


def read_quantization_config(model_dir: Path) -> dict | None:
    """`quantization_config` from config.json, else AutoGPTQ's / AutoAWQ's older side file; None when unquantized."""
    quantization = read_json(model_dir / "config.json").get("quantization_config")
    if quantization is not None:
        return quantization
    for name in QUANT_CONFIG_FILES:
        if (model_dir / name).is_file():
            return read_json(model_dir / name)
    return None


def read_generation_config(model_dir: Path) -> dict:
    path = model_dir / "generation_config.json"
    return read_json(path) if path.is_file() else {}


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint, from its shard index if it has one."""
    if (model_dir / INDEX_FILE).is_file():
        weight_map = read_json(model_dir / INDEX_FILE).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file} is listed in {INDEX_FILE} but missing; re-download the checkpoint.")
        return files
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    others = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if others:
        return [model_dir / name for name in others]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt")):
        raise ModelLoadError(f"{model_dir} holds PyTorch pickle weights only; llmpress reads safetensors. "
                             "Convert with transformers (model.save_pretrained(dir, safe_serialization=True)).")
    raise ModelLoadError(f"{model_dir} has no *.safetensors weights; pass a complete Hugging Face model directory.")


def iter_safetensors(files: list[Path], device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one tensor at a time, cast to `dtype` on `device` (never a full fp32 copy)."""
    from safetensors import safe_open
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device=str(device))
        except Exception as error:  # SafetensorError for a corrupted header, OSError for unreadable files
            raise ModelLoadError(f"{file} is not a readable safetensors file ({str(error).strip()[:160]}); "
                                 "the download is probably incomplete or corrupted: re-download it.") from None
        with handle:
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor

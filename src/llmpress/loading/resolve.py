"""Model specs: what `--model` accepts, and where it points."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from llmpress.config import KNOWN_ARCHITECTURES
from llmpress.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED_ALIASES = ("smollm2-135m", "smollm2-135m-instruct")
RANDOM_PREFIX = "random:"


@dataclass
class ModelSource:
    kind: str  # "hf_dir" | "gguf" | "random"
    path: Path | None = None
    architecture: str | None = None  # for kind == "random"


def resolve_model_spec(spec: str) -> ModelSource:
    """Map a `--model` value to a local source, downloading hub ids when a network is available."""
    if spec in EMBEDDED_ALIASES:
        from llmpress.loading.embedded import embedded_gguf_path
        return ModelSource("gguf", embedded_gguf_path())
    if spec.startswith(RANDOM_PREFIX):
        arch = spec[len(RANDOM_PREFIX):]
        if arch not in KNOWN_ARCHITECTURES:
            raise ModelLoadError(f"unknown architecture {arch!r} in {spec!r}; choose one of: "
                                 + ", ".join(RANDOM_PREFIX + a for a in KNOWN_ARCHITECTURES))
        return ModelSource("random", architecture=arch)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix == ".gguf":
            return ModelSource("gguf", path)
        if path.name == "config.json":
            return ModelSource("hf_dir", path.parent)
        raise ModelLoadError(f"{spec} is a file but not a .gguf model; pass a .gguf file or a Hugging Face model directory.")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("hf_dir", path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", ggufs[0])
        raise ModelLoadError(f"{spec} has no config.json; pass a Hugging Face model directory (config.json + *.safetensors) or a .gguf file.")
    if _looks_like_hub_id(spec):
        from llmpress.loading.hub import download_from_hub
        return ModelSource("hf_dir", download_from_hub(spec))
    raise ModelLoadError(f"model {spec!r} not found: no such file or directory, and not a hub id (owner/name). "
                         f"Pass a local path, a hub id, or {DEFAULT_MODEL!r}.")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and not Path(parts[0]).exists()

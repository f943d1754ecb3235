"""Turn a model spec (alias, HF directory, GGUF file, hub id, random architecture) into a runnable model."""

from llmpress.loading.loader import LoadedModel, load_model, resolve_dtype, resolve_device

__all__ = ["LoadedModel", "load_model", "resolve_dtype", "resolve_device"]

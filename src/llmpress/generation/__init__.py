"""Autoregressive generation over the static KV cache: sampling, CUDA graphs, streaming."""

from llmpress.generation.sampling import SamplingParams
from llmpress.generation.generator import GenerationOutput, Generator

__all__ = ["SamplingParams", "Generator", "GenerationOutput"]

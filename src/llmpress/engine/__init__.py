"""The serving engine: paged KV cache, continuous batching, prefix caching, quantized KV cache.

Split as nano-vllm is: sequence (one request's state), block_manager (KV blocks, prefix hashes),
scheduler (who runs each step), model_runner (tensors in, logits out, CUDA graphs), sampler, and
llm_engine (the loop). `LLM` is the offline API; the HTTP server lives in llmpress.server.
"""

from llmpress.engine.config import EngineConfig
from llmpress.engine.llm import LLM, Completion
from llmpress.engine.llm_engine import EngineStats, LLMEngine, RequestOutput

__all__ = ["LLM", "Completion", "EngineConfig", "EngineStats", "LLMEngine", "RequestOutput"]

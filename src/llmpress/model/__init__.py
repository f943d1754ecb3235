from llmpress.model.llama import LlamaForCausalLM
from llmpress.model.kv_cache import StaticKVCache

__all__ = ["LlamaForCausalLM", "StaticKVCache"]

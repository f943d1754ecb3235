"""A tiny random Llama behind the engine, and the one-prompt-at-a-time reference it must agree with."""

from __future__ import annotations

import torch

from llmpress.engine import EngineConfig, LLMEngine
from llmpress.generation.generator import Generator
from llmpress.generation.sampling import SamplingParams
from llmpress.loading.loader import LoadedModel
from llmpress.loading.resolve import ModelSource
from llmpress.model import LlamaForCausalLM
from tests.conftest import tiny_config


def tiny_loaded(dtype=torch.float64, seed: int = 0, **config_overrides) -> LoadedModel:
    """A 2-layer random model (float64 by default: argmax ties between batch layouts never flip a token)."""
    config = tiny_config(**config_overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    for p in model.parameters():  # larger weights than the default init give peaked, varied logits
        torch.nn.init.normal_(p, std=0.3)
    model.tie_weights()
    model = model.to(dtype).eval()
    return LoadedModel(model, None, config, "tiny", ModelSource("random", "tiny"))


def random_prompts(count: int, min_len: int, max_len: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(0, vocab - 1, (n,), generator=g).tolist() for n in lengths]


def decode_alone(loaded: LoadedModel, prompt: list[int], params: SamplingParams) -> list[int]:
    """Plain greedy decoding of one prompt over a static cache (the core runtime's generator)."""
    generator = Generator(loaded.model, max_seq_len=len(prompt) + params.max_new_tokens, mode="eager")
    out = generator.generate(torch.tensor([prompt]), params, stop_token_ids=loaded.stop_token_ids)
    return out.token_ids[0, :out.num_generated[0]].tolist()


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams] | SamplingParams,
               prefix: str = "r") -> dict[str, list[int]]:
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"{prefix}{i}", prompt, p)
    done = {}

    def collect(output):
        if output.finished:
            done[output.request_id] = output.output_token_ids
    engine.run_to_completion(collect)
    return [done[f"{prefix}{i}"] for i in range(len(prompts))]


def small_engine(loaded: LoadedModel, **overrides) -> LLMEngine:
    values = dict(block_size=4, num_gpu_blocks=256, max_num_batched_tokens=64, max_num_seqs=8)
    values.update(overrides)
    return LLMEngine(loaded, EngineConfig(**values))

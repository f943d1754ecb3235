"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, as in vLLM."""

from __future__ import annotations

from dataclasses import dataclass, fields

from tqdm.auto import tqdm

from llmpress.engine.config import EngineConfig
from llmpress.engine.llm_engine import LLMEngine
from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams
from llmpress.tokenizer import encode_chat


@dataclass
class Completion:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None  # None for a model without a tokenizer
    finish_reason: str
    num_cached_tokens: int


class LLM:
    """A model behind the serving engine, for batch work. Extra keyword arguments are EngineConfig fields."""

    def __init__(self, model, dtype: str = "auto", device: str = "auto", **engine_options):
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise LlmpressError(f"unknown engine option {unknown[0]!r}; choose from {', '.join(sorted(known))}.")
        config = EngineConfig(**engine_options)
        if isinstance(model, str):
            self.engine = LLMEngine.from_model_spec(model, config, dtype=dtype, device=device)
        else:  # an already loaded model (llmpress.loading.LoadedModel)
            self.engine = LLMEngine(model, config)
        self.tokenizer = self.engine.tokenizer
        self._next_id = 0

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[Completion]:
        """prompts: strings (tokenized as plain text) or lists of token ids. One Completion per prompt, in order."""
        if isinstance(prompts, (str, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self._encode(p) for p in prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise LlmpressError(f"{len(params_list)} SamplingParams for {len(token_lists)} prompts; pass one or one each.")
        ids = []
        for tokens, p in zip(token_lists, params_list):
            request_id = f"offline-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, tokens, p)
            ids.append(request_id)
        finished = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            def collect(output):
                if output.finished:
                    finished[output.request_id] = output
                    bar.update(1)
            self.engine.run_to_completion(collect)
        return [self._completion(finished[i]) for i in ids]

    def chat(self, conversations: list[list[dict]], params: SamplingParams | None = None,
             use_tqdm: bool = True) -> list[Completion]:
        """Each conversation (a list of {"role", "content"} messages) through the model's chat template."""
        prompts = [encode_chat(self.tokenizer, messages)[0].tolist() for messages in conversations]
        return self.generate(prompts, params, use_tqdm)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise LlmpressError("this model has no tokenizer; pass prompts as lists of token ids.")
            return self.tokenizer(prompt).input_ids
        return list(prompt)

    def _completion(self, output) -> Completion:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(output.output_token_ids, skip_special_tokens=True)
        return Completion(output.prompt_token_ids, output.output_token_ids, text, output.finish_reason,
                          output.num_cached_tokens)

    @property
    def stats(self):
        return self.engine.stats

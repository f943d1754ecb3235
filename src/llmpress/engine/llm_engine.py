"""The engine loop: requests in, one scheduler step at a time, tokens out.

Not thread-safe: one thread calls add_request / abort_request / step (the server runs it in its own
thread, server/async_engine.py).
"""

from __future__ import annotations

import itertools
import time

import torch
from dataclasses import dataclass

from llmpress.engine.block_manager import BlockManager
from llmpress.engine.config import EngineConfig
from llmpress.engine.logprobs import TokenLogprob, token_logprobs
from llmpress.engine.model_runner import ModelRunner
from llmpress.engine.sampler import Sampler
from llmpress.engine.scheduler import Scheduler
from llmpress.engine.sequence import Sequence
from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams

DEFAULT_MAX_MODEL_LEN = 8192  # a 128k-context model would otherwise reserve block tables for 128k tokens


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # everything generated so far
    new_token_ids: list[int]  # generated in this step
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    new_logprobs: list[TokenLogprob] | None = None  # aligned with new_token_ids; None unless params.logprobs is set


@dataclass
class StepRecord:
    """One step as the benchmark sees it: how many sequences, whether decode-only, how long (host clock)."""
    num_seqs: int
    num_tokens: int
    decode_only: bool
    context_tokens: int  # sum of the sequences' cache lengths after the step (what attention reads)
    seconds: float


@dataclass
class EngineStats:
    steps: int = 0
    prefill_tokens: int = 0  # prompt tokens computed (prefix-cache hits excluded, recomputation included)
    decode_tokens: int = 0
    num_preemptions: int = 0
    prefix_cache_hit_rate: float = 0.0
    num_kv_blocks: int = 0
    kv_cache_bytes: int = 0
    draft_tokens: int = 0  # speculative: draft tokens verified
    accepted_draft_tokens: int = 0

    @property
    def draft_acceptance_rate(self) -> float:
        return self.accepted_draft_tokens / self.draft_tokens if self.draft_tokens else 0.0


class LLMEngine:
    def __init__(self, loaded, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.loaded, self.tokenizer, self.model_name = loaded, loaded.tokenizer, loaded.name
        context = loaded.config.max_position_embeddings
        self.max_model_len = self.config.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
        if self.max_model_len > context:
            raise LlmpressError(f"--max-model-len {self.max_model_len} exceeds the model's context of {context} tokens.")
        self.vocab_size = loaded.config.vocab_size
        self.runner = ModelRunner(loaded.model, self.config, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self.sampler = Sampler(self.runner.device, self.config.seed)
        self.stop_token_ids = frozenset(loaded.stop_token_ids)
        self.sequences: dict[str, Sequence] = {}
        self._seq_ids = itertools.count()
        self._aborted: list[RequestOutput] = []
        self._num_logprob_requests = 0  # unfinished requests that ask for logprobs; 0 keeps steps free of them
        self.step_records: list[StepRecord] | None = None  # set to [] to record every step (benchmarks)
        self.drafter = None
        if self.config.speculative == "ngram":
            from llmpress.speculative.drafters import NGramDrafter
            self.drafter = NGramDrafter()
        self.stats = EngineStats(num_kv_blocks=self.runner.num_blocks, kv_cache_bytes=self.runner.cache.nbytes)

    @classmethod
    def from_model_spec(cls, spec: str, config: EngineConfig | None = None, dtype: str = "auto",
                        device: str = "auto") -> "LLMEngine":
        from llmpress.loading import load_model
        return cls(load_model(spec, dtype=dtype, device=device), config)

    # -- requests ------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.sequences:
            raise LlmpressError(f"request id {request_id!r} is already running; use a unique id.")
        if not prompt_token_ids:
            raise LlmpressError("the prompt is empty; pass at least one token.")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise LlmpressError(f"prompt token ids must be in [0, {self.vocab_size}); got one outside.")
        total = len(prompt_token_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise LlmpressError(f"the prompt has {len(prompt_token_ids)} tokens and {params.max_new_tokens} more were "
                                f"asked for, over the {self.max_model_len}-token context; shorten the prompt or "
                                "lower max_tokens.")
        needed = self.block_manager.blocks_needed(total)
        if needed > self.block_manager.num_blocks:
            raise LlmpressError(f"the request needs {needed} KV blocks but the cache holds {self.block_manager.num_blocks}; "
                                "lower max_tokens or give the cache more memory (--gpu-memory-utilization).")
        stops = self.stop_token_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), params, stops, self.max_model_len)
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        self._num_logprob_requests += params.logprobs is not None

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is None or seq.is_finished:
            return
        self._num_logprob_requests -= seq.params.logprobs is not None
        self.scheduler.abort(seq)
        self._aborted.append(self._output(seq, []))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # -- the loop ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        started = time.perf_counter()
        outputs, self._aborted = self._aborted, []
        if self.drafter is not None:
            self._propose_drafts()
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return outputs
        logits = self.runner.execute(scheduled)
        sampled = self._sample(scheduled, logits)  # .tolist() inside waits for the GPU
        logprobs = self._logprobs(scheduled, logits, sampled) if self._num_logprob_requests else {}
        self._count(scheduled, sampled)
        if self.step_records is not None:
            self.step_records.append(StepRecord(
                len(scheduled.chunks), scheduled.num_tokens, scheduled.is_decode_only,
                sum(c.seq.num_computed_tokens + c.num_tokens for c in scheduled.chunks), time.perf_counter() - started))
        before = {c.seq.seq_id: len(c.seq.output_token_ids) for c in scheduled.chunks}
        for seq in self.scheduler.update(scheduled, sampled):
            outputs.append(self._output(seq, seq.output_token_ids[before[seq.seq_id]:], logprobs.get(seq.seq_id)))
            if seq.is_finished:
                self.sequences.pop(seq.request_id, None)
                self._num_logprob_requests -= seq.params.logprobs is not None
        return outputs

    def _propose_drafts(self) -> None:
        """Prompt-lookup drafts for greedy decoding sequences (sampled ones would need the rejection rule)."""
        for seq in self.scheduler.running:
            p = seq.params
            if seq.num_uncomputed_tokens != 1 or not p.greedy or p.repetition_penalty != 1.0:
                continue
            k = min(self.config.num_speculative_tokens, seq.max_draft_tokens)
            seq.spec_token_ids = self.drafter.lookup(seq.all_token_ids, k) if k > 0 else []

    def _sample(self, scheduled, logits) -> dict[int, list[int]]:
        """seq_id -> new tokens. A chunk with drafts keeps each draft while it equals the model's argmax at
        the position before it, then adds the argmax after the last kept one (greedy verification)."""
        completing = [c for c in scheduled.chunks if c.completes_sequence]
        if not any(c.num_spec_tokens for c in completing):
            tokens = self.sampler.sample(logits, [c.seq for c in completing])
            return {c.seq.seq_id: [t] for c, t in zip(completing, tokens)}
        argmax = logits.argmax(dim=-1).tolist()
        last_rows, last_seqs, sampled, row = [], [], {}, 0
        for chunk in completing:
            n = chunk.num_spec_tokens
            if n:
                drafts, new = chunk.seq.spec_token_ids, []
                for i in range(n + 1):
                    new.append(argmax[row + i])
                    if i == n or drafts[i] != new[-1]:
                        break
                sampled[chunk.seq.seq_id] = new
            else:
                last_rows.append(row)
                last_seqs.append(chunk.seq)
            row += n + 1
        if last_seqs:
            index = torch.tensor(last_rows, device=logits.device)
            for seq, token in zip(last_seqs, self.sampler.sample(logits[index], last_seqs)):
                sampled[seq.seq_id] = [token]
        return sampled

    def _logprobs(self, scheduled, logits, sampled: dict[int, list[int]]) -> dict[int, list[TokenLogprob]]:
        """seq_id -> a TokenLogprob per new token, for the sequences that ask. Rows follow `_sample`'s layout:
        each completing chunk owns 1 + num_spec_tokens rows, and new token i was drawn from its row i."""
        rows, tokens, num_top, owners, row = [], [], [], [], 0
        for chunk in scheduled.chunks:
            if not chunk.completes_sequence:
                continue
            seq = chunk.seq
            if seq.params.logprobs is not None:
                new = sampled[seq.seq_id]
                rows += range(row, row + len(new))
                tokens += new
                num_top += [seq.params.logprobs] * len(new)
                owners.append((seq.seq_id, len(new)))
            row += chunk.num_spec_tokens + 1
        if not rows:
            return {}
        entries = token_logprobs(logits[torch.tensor(rows, device=logits.device)], tokens, num_top)
        out, start = {}, 0
        for seq_id, count in owners:
            out[seq_id], start = entries[start:start + count], start + count
        return out

    def _count(self, scheduled, sampled: dict[int, list[int]]) -> None:
        s = self.stats
        s.steps += 1
        for chunk in scheduled.chunks:
            seq = chunk.seq
            if chunk.completes_sequence and chunk.num_tokens - chunk.num_spec_tokens == 1 and seq.output_token_ids:
                s.decode_tokens += len(sampled[seq.seq_id])
                s.draft_tokens += chunk.num_spec_tokens
                s.accepted_draft_tokens += len(sampled[seq.seq_id]) - 1
            else:
                s.prefill_tokens += chunk.num_tokens
        s.num_preemptions = self.scheduler.num_preemptions
        s.prefix_cache_hit_rate = self.block_manager.prefix_hit_rate

    def _output(self, seq: Sequence, new_tokens: list[int],
                logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        # A stop token among accepted drafts ends the sequence early: its later drafts' entries are dropped.
        new_logprobs = None if seq.params.logprobs is None else (logprobs or [])[:len(new_tokens)]
        return RequestOutput(seq.request_id, seq.prompt_token_ids, list(seq.output_token_ids), list(new_tokens),
                             seq.is_finished, seq.finish_reason, seq.num_cached_tokens, new_logprobs)

    def run_to_completion(self, on_output=None) -> None:
        """Step until every request is finished; `on_output` sees each RequestOutput."""
        while self.has_unfinished_requests():
            for output in self.step():
                if on_output is not None:
                    on_output(output)

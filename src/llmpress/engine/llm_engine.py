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
from llmpress.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from llmpress.engine.sequence import Sequence
from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams
from llmpress.kernels import ops

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
class _InFlight:
    """A launched step: its forward pass and sampling are queued on the device."""
    scheduled: SchedulerOutput
    logits: torch.Tensor
    tokens: torch.Tensor | None  # one sampled token per completing chunk, on the device; None: drafts to verify
    completing: list[ScheduledChunk]  # the chunks that reach their sequence's last token, in row order
    started: float  # host clock at launch
    launched_early: bool  # planned before the previous step's tokens were read (overlapped scheduling)
    tokens_on_host: torch.Tensor | None = None  # CUDA: pinned copy of `tokens`, complete once `copied` fires
    copied: torch.cuda.Event | None = None

    def read_tokens(self) -> list[int]:
        if self.copied is None:
            return self.tokens.tolist()
        self.copied.synchronize()
        return self.tokens_on_host.tolist()


def _needs_sync(params: SamplingParams) -> bool:
    """Requests whose sampling reads their own tokens on the host, or whose logprobs read the logits."""
    return params.repetition_penalty != 1.0 or params.logprobs is not None


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
        self._num_sync_requests = 0  # unfinished requests that overlapped scheduling cannot serve (see _needs_sync)
        self._in_flight: _InFlight | None = None  # a step launched ahead, whose tokens are not read yet
        self._last_sync = time.perf_counter()
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
        self._num_sync_requests += _needs_sync(params)

    def abort_request(self, request_id: str) -> None:
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return
        self._retire(seq)
        self.scheduler.abort(seq)
        self._aborted.append(self._output(seq, []))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._in_flight is not None

    # -- the loop ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step and return what it generated. With overlapped scheduling (the default), the next step
        is planned and launched before this one's tokens are read back, so the GPU never waits for the host's
        bookkeeping; a sequence that stops meanwhile wastes one row of the step after, whose token is dropped."""
        outputs, self._aborted = self._aborted, []
        current, self._in_flight = self._in_flight, None
        if current is None:
            if self.drafter is not None:
                self._propose_drafts()
            scheduled = self.scheduler.schedule()
            if scheduled.is_empty:
                return outputs
            current = self._launch(scheduled)
        if self._can_overlap(current):
            return outputs + self._finish_overlapped(current)
        return outputs + self._finish(current)

    def _launch(self, scheduled: SchedulerOutput, previous: _InFlight | None = None) -> _InFlight:
        """Queue the step's forward pass and, unless it verifies drafts, its sampling; nothing waits for the GPU."""
        started = time.perf_counter()
        previous_tokens = None
        if previous is not None:
            previous_tokens = (previous.tokens, {c.seq.seq_id: row for row, c in enumerate(previous.completing)})
        logits = self.runner.execute(scheduled, previous_tokens)
        completing = [c for c in scheduled.chunks if c.completes_sequence]
        tokens, tokens_on_host, copied = None, None, None
        if not any(c.num_spec_tokens for c in completing):
            tokens = self.sampler.sample_on_device(logits, [c.seq for c in completing])
            if tokens.is_cuda:  # read back through pinned memory and an event: a plain .tolist() later would
                # wait for everything queued by then, the step launched after this one included
                tokens_on_host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
                tokens_on_host.copy_(tokens, non_blocking=True)
                copied = torch.cuda.Event()
                copied.record()
        return _InFlight(scheduled, logits, tokens, completing, started, previous is not None, tokens_on_host, copied)

    def _can_overlap(self, current: _InFlight) -> bool:
        """Overlap needs every next input known up to the sampled tokens: no drafts, and no request that
        reads its tokens on the host while sampling (repetition penalty) or reads the logits (logprobs)."""
        return (self.config.async_scheduling and current.tokens is not None and self.drafter is None
                and self._num_sync_requests == 0)

    def _record(self, current: _InFlight, synced: float) -> None:
        # A step launched during the previous call ran on the GPU since that call's sync: time it from there.
        started = self._last_sync if current.launched_early else current.started
        self._last_sync = synced
        if self.step_records is not None:
            scheduled = current.scheduled
            self.step_records.append(StepRecord(
                len(scheduled.chunks), scheduled.num_tokens, scheduled.is_decode_only,
                sum(c.seq.num_computed_tokens + c.num_tokens for c in scheduled.chunks), synced - started))

    def _finish(self, current: _InFlight) -> list[RequestOutput]:
        """Wait for the step's tokens, then update the sequences (the plain, synchronous path)."""
        scheduled, logits = current.scheduled, current.logits
        if current.tokens is not None:
            tokens = current.read_tokens()
            sampled = {c.seq.seq_id: [t] for c, t in zip(current.completing, tokens)}
        else:
            sampled = self._sample(scheduled, logits)
        logprobs = self._logprobs(scheduled, logits, sampled) if self._num_logprob_requests else {}
        self._record(current, time.perf_counter())
        self._count(scheduled, {c.seq.seq_id: len(sampled[c.seq.seq_id]) for c in current.completing
                                if not c.seq.is_finished})
        outputs = []
        before = {c.seq.seq_id: len(c.seq.output_token_ids) for c in scheduled.chunks}
        for seq in self.scheduler.update(scheduled, sampled):
            outputs.append(self._output(seq, seq.output_token_ids[before[seq.seq_id]:], logprobs.get(seq.seq_id)))
            if seq.is_finished:
                self._retire(seq)
        return outputs

    def _finish_overlapped(self, current: _InFlight) -> list[RequestOutput]:
        """Advance the sequences with placeholder tokens, launch the next step, then read this one's tokens."""
        self._count(current.scheduled, {c.seq.seq_id: 1 for c in current.completing if not c.seq.is_finished})
        awaiting = self.scheduler.advance(current.scheduled)
        upcoming = self.scheduler.schedule()
        if not upcoming.is_empty:
            self._in_flight = self._launch(upcoming, previous=current)
        tokens = current.read_tokens()  # waits for `current` only; `upcoming` keeps the GPU busy meanwhile
        self._record(current, time.perf_counter())
        self.scheduler.resolve(awaiting, tokens)
        outputs = []
        for _, seq in awaiting:
            outputs.append(self._output(seq, seq.output_token_ids[-1:]))
            if seq.is_finished:
                self._retire(seq)
        return outputs

    def _retire(self, seq: Sequence) -> None:
        self.sequences.pop(seq.request_id, None)
        self._num_logprob_requests -= seq.params.logprobs is not None
        self._num_sync_requests -= _needs_sync(seq.params)

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
        argmax = ops.greedy_tokens(logits).tolist()
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

    def _count(self, scheduled, num_new: dict[int, int]) -> None:
        """num_new: seq_id -> tokens the step generates for it (accepted drafts included)."""
        s = self.stats
        s.steps += 1
        for chunk in scheduled.chunks:
            seq = chunk.seq
            if seq.seq_id not in num_new and seq.is_finished:
                continue  # stopped or aborted while the step ran
            if chunk.completes_sequence and chunk.num_tokens - chunk.num_spec_tokens == 1 and seq.output_token_ids:
                s.decode_tokens += num_new[seq.seq_id]
                s.draft_tokens += chunk.num_spec_tokens
                s.accepted_draft_tokens += num_new[seq.seq_id] - 1
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

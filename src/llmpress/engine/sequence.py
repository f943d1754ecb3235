"""One request's state inside the engine: its tokens, its KV blocks and how far its prefill has got."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


PLACEHOLDER_TOKEN = -1  # an output token sampled on the device but not yet read back (overlapped scheduling)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted (its KV blocks were freed; it will recompute)
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: Any  # generation.sampling.SamplingParams (kept untyped: this module stays free of torch)
    stop_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose k/v are in the cache (prefix-cache hits included)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    num_registered_blocks: int = 0  # leading blocks already published in the prefix cache
    num_preemptions: int = 0
    spec_token_ids: list[int] = field(default_factory=list)  # draft tokens to verify in the next step
    finish_reason: str | None = None  # "stop", "length" or "abort"
    sampler_state: Any = None  # the model runner's per-request RNG, created on first use

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens start..end-1 of prompt + output, without building the whole list for decode steps."""
        prompt_len = len(self.prompt_token_ids)
        if start >= prompt_len:
            return self.output_token_ids[start - prompt_len:end - prompt_len]
        return self.all_token_ids[start:end]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def max_draft_tokens(self) -> int:
        """Draft tokens worth verifying: every accepted one plus the step's own token must still fit."""
        return max(0, min(self.params.max_new_tokens - len(self.output_token_ids), self.max_model_len - self.num_tokens) - 1)

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and decide whether the sequence is done (stop token, max tokens, context)."""
        self.output_token_ids.append(token_id)
        if not self.params.ignore_eos and token_id in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_token_ids) >= self.params.max_new_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"

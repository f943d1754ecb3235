"""Turning logits into the next token: greedy, temperature, top-k, top-p, repetition penalty."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError
from llmpress.kernels import ops

MAX_LOGPROBS = 20  # top alternatives per token, OpenAI's limit


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy (argmax)
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    repetition_penalty: float = 1.0  # CTRL (Keskar et al. 2019); 1 disables
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None: the model's EOS tokens
    ignore_eos: bool = False  # benchmarks: always produce max_new_tokens
    logprobs: int | None = None  # engine only. None: none; 0: the sampled token's; N: also the top N

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LlmpressError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}.")
        if self.temperature < 0:
            raise LlmpressError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise LlmpressError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise LlmpressError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if self.repetition_penalty <= 0:
            raise LlmpressError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}.")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise LlmpressError(f"logprobs must be between 0 and {MAX_LOGPROBS} (top tokens per position), "
                                f"got {self.logprobs}.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: [B, V]; seen_ids: [B, N]. Seen tokens' positive logits are divided by `penalty`, negative multiplied."""
    seen = logits.gather(1, seen_ids)
    logits = logits.clone()
    logits.scatter_(1, seen_ids, torch.where(seen > 0, seen / penalty, seen * penalty))
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits: [B, V] (already temperature-scaled). Tokens outside the top-k / nucleus get -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (keeps at least one).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def processed_logits(logits: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] -> float32 [B, V] after the repetition penalty and, when sampling, temperature and top-k/top-p."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty)
    if params.greedy:
        return logits
    return filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)


def probabilities(logits: torch.Tensor, params: SamplingParams, seen_ids: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V] -> the distribution `sample_next_token` draws from, float32 [B, V] (sampling only).
    Speculative decoding's acceptance rule needs it as a distribution, not just a draw."""
    assert not params.greedy, "greedy decoding has no distribution to sample from: use argmax"
    return processed_logits(logits, params, seen_ids).softmax(dim=-1)


def sample_next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                      seen_ids: torch.Tensor | None = None) -> torch.Tensor:
    """logits: [B, V]. Returns next token ids [B] (int64)."""
    if params.greedy:
        return ops.greedy_tokens(processed_logits(logits, params, seen_ids) if params.repetition_penalty != 1
                                 else logits)
    probs = probabilities(logits, params, seen_ids)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

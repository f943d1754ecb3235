"""Log-probabilities of emitted tokens, for the requests that ask (SamplingParams.logprobs).

As OpenAI and vLLM report them: log_softmax of the model's raw logits (before repetition penalty,
temperature or top-k/top-p), in float32, so the numbers describe the model, not the sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprob]:
    """logits: [R, V], the row each token was drawn from; token_ids, num_top: [R]. One TokenLogprob per row."""
    assert logits.shape[0] == len(token_ids) == len(num_top), "one logits row per token"
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(token_ids, device=logits.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    k = max(num_top)
    top_values, top_ids = [[]] * len(token_ids), [[]] * len(token_ids)
    if k > 0:
        top = logprobs.topk(k, dim=-1)  # sorted, most likely first
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [TokenLogprob(token, lp, list(zip(top_ids[r][:n], top_values[r][:n])))
            for r, (token, lp, n) in enumerate(zip(token_ids, chosen, num_top))]

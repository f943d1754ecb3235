"""Sampling: top-k / top-p filters, repetition penalty and greedy against hand-computed examples; parameter checks."""

from __future__ import annotations

import math

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.generation.sampling import (SamplingParams, apply_repetition_penalty, filter_top_k_top_p,
                                          sample_next_token)


def kept(logits: torch.Tensor) -> list[set[int]]:
    """Per row, the token ids a filter left finite."""
    return [set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) for row in logits]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    filtered = filter_top_k_top_p(logits, top_k=5, top_p=1.0)
    expected = [set(row.topk(5).indices.tolist()) for row in logits]
    assert kept(filtered) == expected
    assert torch.equal(filtered[torch.isfinite(filtered)], logits[torch.isfinite(filtered)])  # survivors unchanged
    assert torch.equal(filter_top_k_top_p(logits, top_k=0, top_p=1.0), logits)  # 0 is off


# Probabilities 0.15, 0.5, 0.05, 0.3 (shuffled, so the filter must map its sorted decision back to vocab order).
# Sorted: 0.5 (id 1), 0.3 (id 3), 0.15 (id 0), 0.05 (id 2); cumulative 0.5, 0.8, 0.95, 1.0.
@pytest.mark.parametrize("top_p, expected", [
    (0.4, {1}),  # 0.5 alone already reaches 0.4
    (0.7, {1, 3}),  # 0.5 < 0.7 <= 0.8
    (0.9, {1, 3, 0}),  # 0.8 < 0.9 <= 0.95
    (0.99, {1, 3, 0, 2}),  # only the whole vocabulary reaches 0.99
])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, expected):
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    assert kept(filter_top_k_top_p(logits, top_k=0, top_p=top_p)) == [expected]


def test_top_k_then_top_p():
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    # top-k 2 leaves 0.5 and 0.3, renormalised to 0.625 and 0.375: p = 0.6 keeps only the first.
    assert kept(filter_top_k_top_p(logits, top_k=2, top_p=0.6)) == [{1}]


def test_repetition_penalty_matches_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[0, 1, 1]])  # a token seen twice is penalised once
    got = apply_repetition_penalty(logits, seen, penalty=2.0)
    # CTRL: positive logits divided by the penalty, negative ones multiplied; unseen tokens untouched.
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, -3.0]]))
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, -3.0]]))  # input not modified


def test_repetition_penalty_changes_the_greedy_choice():
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    params = SamplingParams(repetition_penalty=2.0)
    assert sample_next_token(logits, params, seen_ids=torch.tensor([[0]])).tolist() == [1]  # 2.0 / 2 < 1.5
    assert sample_next_token(logits, params).tolist() == [0]  # nothing seen: no penalty


def test_greedy_is_argmax():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(sample_next_token(logits, SamplingParams(temperature=0.0)), logits.argmax(dim=-1))


def test_sampling_follows_the_seed_and_the_filters():
    logits = torch.zeros(1, 1000)  # uniform: every draw is a fresh choice
    params = SamplingParams(temperature=1.0)
    draws = [sample_next_token(logits, params, torch.Generator().manual_seed(s)).item() for s in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2]
    peaked = torch.randn(1, 1000, generator=torch.Generator().manual_seed(2))
    top1 = SamplingParams(temperature=5.0, top_k=1)  # top-k 1 is greedy at any temperature
    assert sample_next_token(peaked, top1, torch.Generator().manual_seed(3)).item() == peaked.argmax().item()


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.nan),
    ("top_k", -1), ("repetition_penalty", 0.0),
])
def test_sampling_params_reject_bad_values(field, value):
    with pytest.raises(LlmpressError, match=field):
        SamplingParams(**{field: value})

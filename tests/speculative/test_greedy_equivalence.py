"""Greedy speculative decoding emits exactly plain greedy decoding's tokens, for every drafter and k."""

import pytest

from llmpress.errors import LlmpressError
from llmpress.generation import SamplingParams
from llmpress.speculative import (ModelDrafter, NGramDrafter, OracleDrafter, SelfSpeculativeDrafter,
                                  SpeculativeConfig, SpeculativeGenerator)
from llmpress.speculative.decoder import next_k
from tests.speculative.helpers import NEW, PROMPT, plain_greedy, tiny_model


def make_drafter(kind: str, target, reference, int4_target):
    if kind == "ngram":
        return NGramDrafter()
    if kind == "self:1":
        return SelfSpeculativeDrafter(target, 1)
    if kind == "small-model":
        return ModelDrafter(tiny_model(1, num_hidden_layers=1))
    if kind == "int4-copy":
        return ModelDrafter(int4_target, name="int4")
    if kind == "oracle-0.6":
        return OracleDrafter(reference, 0.6, 256, seed=0)
    raise ValueError(kind)


def speculative(target, drafter, k, params=None, adaptive=False, stop_ids=()):
    params = params or SamplingParams(max_new_tokens=NEW)
    gen = SpeculativeGenerator(target, drafter, PROMPT.shape[1] + params.max_new_tokens,
                               SpeculativeConfig(k, adaptive=adaptive), mode="eager")
    return gen.generate(PROMPT, params, list(stop_ids))


@pytest.mark.parametrize("kind", ["ngram", "self:1", "small-model", "int4-copy", "oracle-0.6"])
def test_same_tokens_as_plain_greedy_for_k_1_to_8(kind, target, reference, int4_target):
    drafter = make_drafter(kind, target, reference, int4_target)
    accepted = 0
    for k in range(1, 9):
        out = speculative(target, drafter, k)
        assert out.token_ids[0].tolist() == reference[:NEW], (kind, k)
        assert out.num_generated == [NEW] and out.finish_reasons == ["length"]
        assert out.stats.rounds <= NEW - 1
        accepted += out.stats.accepted
    if kind in ("int4-copy", "oracle-0.6", "ngram"):
        assert accepted > 0, "the drafter never helped: the test would not exercise acceptance"


def test_every_draft_rejected(target, reference):
    drafter = OracleDrafter(reference, alpha=0.0, vocab_size=256)  # adversarial: never the target's token
    for k in (1, 4, 8):
        out = speculative(target, drafter, k)
        assert out.token_ids[0].tolist() == reference[:NEW]
        assert out.stats.accepted == 0 and out.stats.rounds == NEW - 1  # one token per target forward


def test_every_draft_accepted(target, reference):
    drafter = OracleDrafter(reference, alpha=1.0, vocab_size=256)
    for k in range(1, 9):
        out = speculative(target, drafter, k)
        assert out.token_ids[0].tolist() == reference[:NEW]
        assert out.stats.acceptance_rate == 1.0
        assert out.stats.rounds == -(-(NEW - 1) // (k + 1))  # k drafts + the bonus token per round


def test_stop_token_ends_generation_as_plain_decoding_does(target, reference):
    stop = reference[15]
    expected = plain_greedy(target, PROMPT, NEW, stop_ids=[stop])
    assert expected[-1] == stop and len(expected) < NEW
    for drafter in (OracleDrafter(reference, 1.0, 256), NGramDrafter()):
        out = speculative(target, drafter, 5, stop_ids=[stop])
        assert out.token_ids[0].tolist() == expected
        assert out.finish_reasons == ["stop"]
    out = speculative(target, OracleDrafter(reference, 1.0, 256), 5,
                      params=SamplingParams(max_new_tokens=NEW, ignore_eos=True), stop_ids=[stop])
    assert out.token_ids[0].tolist() == reference[:NEW]


def test_repetition_penalty_matches_plain_decoding(target):
    from llmpress.generation import Generator
    params = SamplingParams(max_new_tokens=NEW, repetition_penalty=1.3)
    plain = Generator(target, PROMPT.shape[1] + NEW, mode="eager").generate(PROMPT, params).token_ids[0].tolist()
    for drafter in (NGramDrafter(), SelfSpeculativeDrafter(target, 2)):
        assert speculative(target, drafter, 4, params=params).token_ids[0].tolist() == plain


def test_adaptive_k_keeps_the_output_and_moves_k(target, reference, int4_target):
    out = speculative(target, OracleDrafter(reference, 1.0, 256), 2, adaptive=True)
    assert out.token_ids[0].tolist() == reference[:NEW]
    assert out.stats.k_per_round[:4] == [2, 3, 4, 5]  # all accepted: k grows by one per round
    out = speculative(target, OracleDrafter(reference, 0.0, 256), 6, adaptive=True)
    assert out.token_ids[0].tolist() == reference[:NEW]
    assert out.stats.k_per_round[:7] == [6, 5, 4, 3, 2, 1, 1]  # none accepted: k shrinks to 1
    out = speculative(target, ModelDrafter(int4_target), 4, adaptive=True)
    assert out.token_ids[0].tolist() == reference[:NEW]


def test_next_k_rule():
    assert next_k(4, 4, 4, max_k=8) == 5
    assert next_k(8, 8, 8, max_k=8) == 8
    assert next_k(4, 4, 1, max_k=8) == 3
    assert next_k(4, 4, 2, max_k=8) == 4
    assert next_k(1, 1, 0, max_k=8) == 1
    assert next_k(4, 0, 0, max_k=8) == 4  # an n-gram miss says nothing about k


def test_mismatched_vocabulary_is_refused(target):
    with pytest.raises(LlmpressError, match="vocabulary of 300 tokens but the target has 256"):
        SpeculativeGenerator(target, ModelDrafter(tiny_model(1, vocab_size=300)), 64, mode="eager")


def test_batch_and_bad_k_are_refused(target):
    with pytest.raises(LlmpressError, match="at least 1"):
        SpeculativeConfig(0)
    gen = SpeculativeGenerator(target, NGramDrafter(), 64, SpeculativeConfig(3), mode="eager")
    with pytest.raises(LlmpressError, match="one sequence at a time"):
        gen.generate(PROMPT.expand(2, -1), SamplingParams(max_new_tokens=4))
    with pytest.raises(LlmpressError, match="exceeds"):
        gen.generate(PROMPT, SamplingParams(max_new_tokens=60))

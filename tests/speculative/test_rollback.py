"""After speculative generation, both caches hold, at every valid position, what a fresh run computes."""

import pytest
import torch

from llmpress.generation import SamplingParams
from llmpress.model import StaticKVCache
from llmpress.speculative import ModelDrafter, OracleDrafter, SelfSpeculativeDrafter, SpeculativeConfig, SpeculativeGenerator
from tests.speculative.helpers import plain_greedy, tiny_model

PROMPT = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))


def fresh_cache(model, tokens: list[int], size: int) -> StaticKVCache:
    """The k/v a single prefill of `tokens` writes (no speculation, no rollback)."""
    cache = StaticKVCache(model.config, 1, size, model.dtype, model.device)
    with torch.inference_mode():
        model(torch.tensor([tokens]), torch.arange(len(tokens)), cache)
    return cache


def assert_cache_prefix_equal(cache: StaticKVCache, fresh: StaticKVCache, length: int) -> None:
    for got, want in zip(cache.keys + cache.values, fresh.keys + fresh.values):
        torch.testing.assert_close(got[:, :, :length], want[:, :, :length], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["model", "self", "oracle+model", "all accepted"])
def test_rollback_leaves_caches_equal_to_a_fresh_run(kind):
    target = tiny_model(0, num_hidden_layers=3)
    new = 30
    if kind == "model":  # a bad draft: many rejections, so many rollbacks
        drafter = ModelDrafter(tiny_model(1, num_hidden_layers=1))
    elif kind == "self":
        drafter = SelfSpeculativeDrafter(target, 2)
    else:  # mixed acceptance lengths (or every draft right), with a draft model whose cache must follow
        drafter = OracleDrafter(plain_greedy(target, PROMPT, new + 8), 1.0 if kind == "all accepted" else 0.6, 256,
                                seed=1, draft=ModelDrafter(tiny_model(1, num_hidden_layers=1)))
    gen = SpeculativeGenerator(target, drafter, PROMPT.shape[1] + new, SpeculativeConfig(4), mode="eager")
    out = gen.generate(PROMPT, SamplingParams(max_new_tokens=new))
    stats = out.stats
    if kind == "all accepted":  # each round after the first starts with the draft's 2-token catch-up step
        assert stats.accepted == stats.proposed > 0
    else:
        assert 0 < stats.proposed and stats.accepted < stats.proposed or kind == "self"
    context = PROMPT[0].tolist() + out.token_ids[0].tolist()
    # Target: every token but the last one generated has been fed (the last is the next round's input).
    valid = len(context) - 1
    assert_cache_prefix_equal(gen.runner.cache, fresh_cache(target, context[:valid], gen.runner.cache.max_seq_len), valid)
    # Draft: its counter says how many context tokens its cache holds; those must be right.
    model_drafter = drafter.draft if kind in ("oracle+model", "all accepted") else drafter
    # At most one round behind; or ahead when max_new_tokens cut the last round's accepted drafts off.
    assert model_drafter.cached_len >= len(context) - 1 - 4
    n = min(model_drafter.cached_len, len(context))
    fresh = fresh_cache(model_drafter.model, context[:n], model_drafter.runner.cache.max_seq_len)
    assert_cache_prefix_equal(model_drafter.runner.cache, fresh, n)


def test_the_draft_cache_is_rewound_not_left_ahead():
    target = tiny_model(0, num_hidden_layers=3)
    reference = plain_greedy(target, PROMPT, 20)
    drafter = OracleDrafter(reference, 0.0, 256, draft=ModelDrafter(tiny_model(1, num_hidden_layers=1)))
    gen = SpeculativeGenerator(target, drafter, PROMPT.shape[1] + 20, SpeculativeConfig(5), mode="eager")
    gen.generate(PROMPT, SamplingParams(max_new_tokens=2))
    # One round, every draft rejected: the draft fed the first generated token and 4 drafts, keeps only the token.
    assert drafter.draft.cached_len == PROMPT.shape[1] + 1

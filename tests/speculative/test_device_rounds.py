"""Greedy rounds on the device (device_rounds.py), run op by op on CPU: the same tokens as plain greedy decoding,
the same round counts as the host-driven rounds where those are fixed, and caches equal to a fresh run's."""

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.generation import SamplingParams
from llmpress.speculative import (ModelDrafter, NGramDrafter, OracleDrafter, SelfSpeculativeDrafter,
                                  SpeculativeConfig, SpeculativeGenerator)
from llmpress.speculative.device_rounds import greedy_keep
from tests.speculative.helpers import NEW, PROMPT, plain_greedy, tiny_model
from tests.speculative.test_rollback import assert_cache_prefix_equal, fresh_cache


def on_device(target, drafter, k, new=NEW, stop_ids=(), prompt=PROMPT):
    gen = SpeculativeGenerator(target, drafter, prompt.shape[1] + new, SpeculativeConfig(k, device_rounds=True),
                               mode="eager")
    return gen, gen.generate(prompt, SamplingParams(max_new_tokens=new), list(stop_ids))


def test_greedy_keep_counts_the_matching_prefix():
    t = torch.tensor([5, 6, 7, 8])
    n, kept = greedy_keep(torch.tensor([5, 6, 9]), t, torch.tensor([3]))
    assert int(n) == 2 and kept.tolist() == [5, 6, 7, 8]  # the caller keeps kept[:n + 1]
    assert int(greedy_keep(torch.tensor([1, 6, 7]), t, None)[0]) == 0
    assert int(greedy_keep(torch.tensor([5, 6, 7]), t, None)[0]) == 3


@pytest.mark.parametrize("kind", ["small-model", "self:1", "int4-copy", "oracle-0.6", "oracle-0.6+model"])
def test_same_tokens_as_plain_greedy_for_k_1_to_8(kind, target, reference, int4_target):
    accepted = 0
    for k in range(1, 9):
        drafter = {"small-model": lambda: ModelDrafter(tiny_model(1, num_hidden_layers=1)),
                   "self:1": lambda: SelfSpeculativeDrafter(target, 1),
                   "int4-copy": lambda: ModelDrafter(int4_target, name="int4"),
                   "oracle-0.6": lambda: OracleDrafter(reference, 0.6, 256, seed=k),
                   "oracle-0.6+model": lambda: OracleDrafter(reference, 0.6, 256, seed=k,
                                                             draft=ModelDrafter(tiny_model(1, num_hidden_layers=1))),
                   }[kind]()
        gen, out = on_device(target, drafter, k)
        assert gen.rounds is not None
        assert out.token_ids[0].tolist() == reference[:NEW], (kind, k)
        assert out.num_generated == [NEW] and out.finish_reasons == ["length"]
        assert out.stats.proposed == k * out.stats.rounds
        accepted += out.stats.accepted
    if kind != "small-model":
        assert accepted > 0, "the drafter never helped: the test would not exercise acceptance"


def test_every_draft_rejected_and_every_draft_accepted(target, reference):
    for k in (1, 4, 8):
        _, out = on_device(target, OracleDrafter(reference, alpha=0.0, vocab_size=256), k)
        assert out.token_ids[0].tolist() == reference[:NEW]
        assert out.stats.accepted == 0 and out.stats.rounds == NEW - 1
    for k in range(1, 9):
        _, out = on_device(target, OracleDrafter(reference, alpha=1.0, vocab_size=256), k)
        assert out.token_ids[0].tolist() == reference[:NEW]
        assert out.stats.acceptance_rate == 1.0
        assert out.stats.rounds == -(-(NEW - 1) // (k + 1))


def test_stop_token_ends_generation(target, reference):
    stop = reference[15]
    expected = reference[:reference.index(stop) + 1]
    _, out = on_device(target, OracleDrafter(reference, 1.0, 256), 5, stop_ids=[stop])
    assert out.token_ids[0].tolist() == expected and out.finish_reasons == ["stop"]


@pytest.mark.parametrize("alpha", [0.6, 1.0])
def test_caches_equal_a_fresh_run(alpha):
    """The draft's first step always rewrites x_{L-1}: after mixed or full acceptance both caches hold what one
    prefill of the context computes (a 1-token first step would leave a fully accepted round's last draft out)."""
    target, draft = tiny_model(0, num_hidden_layers=3), tiny_model(1, num_hidden_layers=1)
    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    new, k = 30, 4
    drafter = OracleDrafter(plain_greedy(target, prompt, new + 8), alpha, 256, seed=1, draft=ModelDrafter(draft))
    gen, out = on_device(target, drafter, k, new=new, prompt=prompt)
    assert 0 < out.stats.accepted and (out.stats.accepted < out.stats.proposed) == (alpha < 1)
    context = prompt[0].tolist() + out.token_ids[0].tolist()
    valid = len(context) - 1  # the last token is the next round's input
    size = gen.runner.cache.max_seq_len
    assert_cache_prefix_equal(gen.runner.cache, fresh_cache(target, context[:valid], size), valid)
    # The draft: every position before the last round's start (at most k + 1 tokens before the end) is right.
    cached = valid - (k + 1)
    draft_cache = drafter.draft.runner.cache
    assert_cache_prefix_equal(draft_cache, fresh_cache(draft, context[:cached], draft_cache.max_seq_len), cached)


def test_sampling_and_other_drafters_use_the_host_rounds(target):
    params = SamplingParams(max_new_tokens=12, temperature=0.8, seed=3)
    outs = []
    for device_rounds in (True, False):
        gen = SpeculativeGenerator(target, SelfSpeculativeDrafter(target, 1), PROMPT.shape[1] + 12,
                                   SpeculativeConfig(3, device_rounds=device_rounds), mode="eager")
        outs.append(gen.generate(PROMPT, params).token_ids[0].tolist())
    assert outs[0] == outs[1]  # the device rounds are greedy only: a sampled generation is the host's
    assert not SpeculativeGenerator(target, NGramDrafter(), 64, SpeculativeConfig(3), mode="eager").use_device_rounds
    with pytest.raises(LlmpressError, match="device rounds need a fixed k"):
        SpeculativeGenerator(target, NGramDrafter(), 64, SpeculativeConfig(3, device_rounds=True), mode="eager")
    with pytest.raises(LlmpressError, match="adaptive"):
        SpeculativeGenerator(target, SelfSpeculativeDrafter(target, 1), 64,
                             SpeculativeConfig(3, adaptive=True, device_rounds=True), mode="eager")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["graph", "compile"])
def test_captured_rounds_on_cuda_match_plain_greedy(mode):
    """The two captured graphs a round, queued ahead of the host: the same tokens as plain greedy decoding, also
    after a stop token, and the same as the op-by-op rounds."""
    device = torch.device("cuda")
    target = tiny_model(0, num_hidden_layers=3).to(device)
    prompt = PROMPT.to(device)
    expected = plain_greedy(target, prompt, NEW + 8)
    for drafter in (ModelDrafter(tiny_model(1, num_hidden_layers=1).to(device)), OracleDrafter(expected, 0.6, 256),
                    OracleDrafter(expected, 1.0, 256, draft=ModelDrafter(tiny_model(2, num_hidden_layers=1).to(device)))):
        for k in (1, 3, 5):
            gen = SpeculativeGenerator(target, drafter, prompt.shape[1] + NEW, SpeculativeConfig(k), mode=mode)
            assert gen.use_device_rounds
            for _ in range(2):  # a second generation reuses the captured graphs
                out = gen.generate(prompt, SamplingParams(max_new_tokens=NEW))
                assert out.token_ids[0].tolist() == expected[:NEW], (drafter.name, k)
            stop = expected[15]
            out = gen.generate(prompt, SamplingParams(max_new_tokens=NEW), [stop])
            assert out.token_ids[0].tolist() == expected[:expected.index(stop) + 1]

"""End to end: sampled speculative output has the target's distribution (chi-square on a tiny vocabulary)."""

import torch

from llmpress.generation import SamplingParams
from llmpress.generation.sampling import probabilities
from llmpress.speculative import ModelDrafter, NGramDrafter, SpeculativeConfig, SpeculativeGenerator
from tests.speculative.helpers import chi_square, chi_square_critical, tiny_model

V = 8
PROMPT = torch.tensor([[1, 5, 2, 5, 2, 3]])


def exact_pair_distribution(target, params) -> torch.Tensor:
    """P(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1) from full forwards of the target: [V * V]."""
    with torch.inference_mode():
        p1 = probabilities(target(PROMPT)[:, -1], params)[0]
        prompts = torch.cat([PROMPT.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        p2 = probabilities(target(prompts)[:, -1], params)
    return (p1[:, None] * p2).flatten()


def sampled_pair_counts(gen, params, samples: int) -> torch.Tensor:
    counts = torch.zeros(V * V)
    for i in range(samples):
        params.seed = i
        t1, t2 = gen.generate(PROMPT, params).token_ids[0, :2].tolist()
        counts[t1 * V + t2] += 1
    return counts


def check(drafter, params, samples=3000):
    target = tiny_model(0, vocab_size=V, eos_token_ids=[])
    if isinstance(drafter, int):
        drafter = ModelDrafter(tiny_model(drafter, vocab_size=V, eos_token_ids=[]))
    gen = SpeculativeGenerator(target, drafter, 16, SpeculativeConfig(2), mode="eager")
    counts = sampled_pair_counts(gen, params, samples)
    expected = exact_pair_distribution(target, params)
    assert counts[expected == 0].sum() == 0, "a token outside top-k was emitted"
    stat, df = chi_square(counts, expected)
    assert stat < chi_square_critical(df), (stat, df)
    return gen


def test_model_draft_sampling_matches_the_target():
    # A different random model drafts (q far from p); top-k and temperature shape p.
    check(1, SamplingParams(max_new_tokens=3, temperature=0.9, top_k=6))


def test_ngram_draft_sampling_matches_the_target():
    # The prompt repeats "5 2", so the n-gram drafter proposes deterministic guesses (point-mass q).
    check(NGramDrafter(), SamplingParams(max_new_tokens=3, temperature=1.0, top_p=0.9))

"""The acceptance rules in isolation: greedy prefix matching, and the sampling rule's output distribution."""

import torch

from llmpress.speculative.verify import greedy_accept, speculative_sample
from tests.speculative.helpers import chi_square, chi_square_critical


def test_greedy_accepts_the_matching_prefix_then_the_targets_token():
    target = torch.tensor([5, 7, 9, 2])
    assert greedy_accept(target, torch.tensor([5, 7, 9])) == (3, [5, 7, 9, 2])  # all kept + bonus
    assert greedy_accept(target, torch.tensor([5, 8, 9])) == (1, [5, 7])  # later matches do not count
    assert greedy_accept(target, torch.tensor([1, 7, 9])) == (0, [5])
    assert greedy_accept(torch.tensor([4]), torch.tensor([], dtype=torch.long)) == (0, [4])


def _random_distributions(rows: int, vocab: int, seed: int, sharpness: float = 1.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=g) * sharpness).softmax(-1)


def _emitted_counts(p, q, draws, trials, seed, deterministic=False):
    """Counts of the first emitted token and of the pair (first, second) over `trials` rounds."""
    g = torch.Generator().manual_seed(seed)
    V = p.shape[1]
    first = torch.zeros(V)
    pairs = torch.zeros(V, V)
    for t in range(trials):
        draft = draws[t]
        _, tokens = speculative_sample(p, draft, None if deterministic else q, g)
        first[tokens[0]] += 1
        if len(tokens) > 1:
            pairs[tokens[0], tokens[1]] += 1
    return first, pairs


def test_sampling_rule_emits_the_targets_distribution():
    # Positions are independent here (p does not depend on earlier tokens), so every emitted token must
    # follow its own row of p: the first token ~ p[0] whatever q is, even though q differs from p a lot.
    V, k, trials = 12, 3, 20000
    p, q = _random_distributions(k + 1, V, seed=0), _random_distributions(k, V, seed=1)
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([torch.multinomial(q, 1, generator=g).squeeze(-1) for _ in range(trials)])
    first, pairs = _emitted_counts(p, q, draws, trials, seed=3)
    stat, df = chi_square(first, p[0])
    assert stat < chi_square_critical(df), (stat, df)
    # The second token, when the first draft was kept, ~ p[1]: the joint over kept rounds.
    second_given_kept = pairs.sum(0)
    assert second_given_kept.sum() > 2000
    stat, df = chi_square(second_given_kept, p[1])
    assert stat < chi_square_critical(df), (stat, df)


def test_sampling_rule_with_a_deterministic_drafter():
    # A point-mass q (n-gram, oracle): accept x with probability p(x), else resample from p without x.
    V, trials = 10, 20000
    p = _random_distributions(2, V, seed=4)
    draws = torch.full((trials, 1), int(p[0].argmax()))
    first, _ = _emitted_counts(p, None, draws, trials, seed=5, deterministic=True)
    stat, df = chi_square(first, p[0])
    assert stat < chi_square_critical(df), (stat, df)


def test_chi_square_check_catches_a_wrong_sampler():
    # The test statistic must be able to fail: emitting the draft's own tokens (q, not p) is caught.
    V, trials = 12, 20000
    p, q = _random_distributions(1, V, seed=0)[0], _random_distributions(1, V, seed=1)[0]
    counts = torch.bincount(torch.multinomial(q, trials, replacement=True,
                                              generator=torch.Generator().manual_seed(0)), minlength=V)
    stat, df = chi_square(counts.float(), p)
    assert stat > chi_square_critical(df)

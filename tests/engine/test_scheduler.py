"""The scheduler with a fake model: a simulated KV memory proves that block tables, chunked prefill,
prefix sharing and preemption never let a sequence read another's tokens or lose its own."""

from __future__ import annotations

import random

from hypothesis import given, settings, strategies as st

from llmpress.engine.block_manager import BlockManager
from llmpress.engine.scheduler import Scheduler
from llmpress.engine.sequence import Sequence
from llmpress.generation.sampling import SamplingParams

VOCAB = 50


def next_token(context: list[int]) -> int:
    """A deterministic 'model': the next token is a function of the whole context."""
    return (sum((i + 1) * t for i, t in enumerate(context)) * 31 + len(context)) % VOCAB


class FakeRunner:
    """Writes each scheduled token into its cache slot, and computes next tokens from what the slots hold."""

    def __init__(self, block_size: int):
        self.block_size, self.slots = block_size, {}

    def run(self, out) -> dict[int, list[int]]:
        sampled = {}
        for chunk in out.chunks:
            seq, bs = chunk.seq, self.block_size
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + chunk.num_tokens
            tokens = seq.all_token_ids + seq.spec_token_ids[:chunk.num_spec_tokens]
            for p in range(start, end):
                self.slots[seq.block_table[p // bs] * bs + p % bs] = tokens[p]
            if chunk.completes_sequence:
                # Read the whole context back through the block table, as attention would, and verify the
                # drafts greedily: keep each draft while it is the model's own next token.
                context = [self.slots.get(seq.block_table[p // bs] * bs + p % bs) for p in range(end)]
                assert context == tokens, f"sequence {seq.seq_id} reads corrupted KV"
                new = []
                for draft_end in range(seq.num_tokens, end + 1):
                    new.append(next_token(context[:draft_end]))
                    if draft_end == end or tokens[draft_end] != new[-1]:
                        break
                sampled[seq.seq_id] = new
        return sampled


def expected_output(prompt: list[int], max_new: int) -> list[int]:
    context, out = list(prompt), []
    for _ in range(max_new):
        out.append(next_token(context))
        context.append(out[-1])
    return out


def run(prompts, max_new, num_blocks, block_size, budget, max_seqs, prefix_caching, arrivals=None, drafts=None):
    """drafts: a random.Random; when given, decoding sequences get 0-4 draft tokens per step, right or wrong."""
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    scheduler = Scheduler(bm, max_seqs, budget)
    runner = FakeRunner(block_size)
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    seqs = [Sequence(i, f"r{i}", p, params) for i, p in enumerate(prompts)]
    arrivals = arrivals or [0] * len(seqs)
    step = 0
    while any(not s.is_finished for s in seqs):
        for s, at in zip(seqs, arrivals):
            if at == step:
                scheduler.add(s)
        if drafts is not None:
            for s in scheduler.running:
                if s.num_uncomputed_tokens == 1:
                    truth = expected_output(s.prompt_token_ids, max_new)[len(s.output_token_ids):]
                    guess = [t if drafts.random() < 0.7 else (t + 1) % VOCAB for t in truth[:drafts.randint(0, 4)]]
                    s.spec_token_ids = guess[:s.max_draft_tokens]
        out = scheduler.schedule()
        assert out.num_tokens <= budget
        assert len(scheduler.running) <= max_seqs
        scheduler.update(out, runner.run(out))
        bm.check_invariants(scheduler.running)
        step += 1
        assert step < 10_000, "the scheduler stopped making progress"
    assert bm.num_free_blocks == num_blocks
    return [s.output_token_ids for s in seqs], scheduler, bm


def test_chunked_prefill_keeps_decodes_going():
    prompts = [[1] * 5, [2] * 40]
    bm = BlockManager(64, 4)
    scheduler = Scheduler(bm, 8, 8)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    short, long = (Sequence(i, str(i), p, params) for i, p in enumerate(prompts))
    runner = FakeRunner(4)
    scheduler.add(short)
    first = scheduler.schedule()
    scheduler.update(first, runner.run(first))
    scheduler.add(long)
    out = scheduler.schedule()
    assert [(c.seq.seq_id, c.num_tokens) for c in out.chunks] == [(0, 1), (1, 7)]  # the decode, then a chunk
    scheduler.update(out, runner.run(out))
    assert long.num_computed_tokens == 7 and not long.output_token_ids


def test_preemption_recomputes_and_outputs_are_unchanged():
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 20))] for _ in range(12)]
    plenty, _, _ = run(prompts, 12, 400, 4, 32, 12, True)
    tight, scheduler, _ = run(prompts, 12, 12, 4, 32, 12, True)
    assert scheduler.num_preemptions > 0
    assert plenty == tight == [expected_output(p, 12) for p in prompts]


def test_shared_prefixes_hit_the_cache():
    system = list(range(1, 17))
    prompts = [system + [20 + i, 30 + i] for i in range(6)]
    outputs, _, bm = run(prompts, 5, 100, 4, 64, 8, True, arrivals=[0, 3, 3, 4, 5, 6])
    assert outputs == [expected_output(p, 5) for p in prompts]
    assert bm.prefix_hit_tokens == 5 * 16 and bm.prefix_hit_rate > 0.7


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10**6), num_blocks=st.integers(8, 40), block_size=st.sampled_from([1, 2, 4, 8]),
       budget=st.integers(1, 48), max_seqs=st.integers(1, 6), prefix_caching=st.booleans(), drafts=st.booleans())
def test_random_workloads_complete_with_the_right_outputs(seed, num_blocks, block_size, budget, max_seqs,
                                                          prefix_caching, drafts):
    rng = random.Random(seed)
    max_new = rng.randint(1, 6)
    stem = [rng.randrange(VOCAB) for _ in range(10)]
    prompts = []
    for _ in range(rng.randint(1, 8)):
        length = rng.randint(1, 14)
        tokens = stem[:length] if rng.random() < 0.5 else [rng.randrange(VOCAB) for _ in range(length)]
        prompts.append(tokens + [rng.randrange(VOCAB)])
    # Every request fits alone (the engine refuses the others at add_request).
    prompts = [p for p in prompts if -(-(len(p) + max_new) // block_size) <= num_blocks] or [[1]]
    arrivals = sorted(rng.randint(0, 6) for _ in prompts)
    outputs, _, _ = run(prompts, max_new, num_blocks, block_size, budget, max_seqs, prefix_caching, arrivals,
                        random.Random(seed) if drafts else None)
    assert outputs == [expected_output(p, max_new) for p in prompts]


def test_draft_tokens_are_verified_and_outputs_unchanged():
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(3, 12))] for _ in range(6)]
    plain, plain_sched, _ = run(prompts, 10, 60, 4, 32, 6, True)
    drafted, _, _ = run(prompts, 10, 60, 4, 32, 6, True, drafts=random.Random(2))
    tight, tight_sched, _ = run(prompts, 10, 14, 4, 32, 6, True, drafts=random.Random(3))  # drafts vs preemption
    assert plain == drafted == tight == [expected_output(p, 10) for p in prompts]

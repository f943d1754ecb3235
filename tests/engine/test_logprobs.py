"""Log-probabilities from the engine: each emitted token's entry equals log_softmax of the plain model's logits
at its position, top-N lists are sorted, speculative steps report one entry per token, and requests that do not
ask are untouched (and cost nothing)."""

from __future__ import annotations

import pytest
import torch

from llmpress.engine.logprobs import TokenLogprob
from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams
from tests.engine.helpers import random_prompts, run_engine, small_engine, tiny_loaded


def run_with_logprobs(engine, prompts, params) -> list[tuple[list[int], list[TokenLogprob] | None]]:
    """Each request's output tokens and its logprob entries, collected step by step (None: it did not ask)."""
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    entries = {f"r{i}": [] for i in range(len(prompts))}

    def collect(output):
        tokens[output.request_id] += output.new_token_ids
        if output.new_logprobs is None:
            entries[output.request_id] = None
        else:
            assert len(output.new_logprobs) == len(output.new_token_ids)
            entries[output.request_id] += output.new_logprobs
    engine.run_to_completion(collect)
    return [(tokens[f"r{i}"], entries[f"r{i}"]) for i in range(len(prompts))]


def reference_logprobs(loaded, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), V]: log_softmax (float32) of the plain model's logits before each output token."""
    with torch.no_grad():
        logits = loaded.model(torch.tensor([prompt + output]))[0, len(prompt) - 1:len(prompt) + len(output) - 1]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_matches_model(loaded, prompt, output, entries, num_top, greedy):
    reference = reference_logprobs(loaded, prompt, output)
    assert [e.token_id for e in entries] == output
    for i, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(reference[i, output[i]].item(), abs=1e-5)
        assert len(entry.top) == num_top
        top_values = [lp for _, lp in entry.top]
        assert top_values == sorted(top_values, reverse=True)
        assert top_values == pytest.approx(reference[i].topk(num_top).values.tolist(), abs=1e-5)
        for token_id, lp in entry.top:
            assert lp == pytest.approx(reference[i, token_id].item(), abs=1e-5)
        if greedy and num_top:
            assert entry.top[0][0] == output[i] and entry.top[0][1] == pytest.approx(entry.logprob, abs=1e-6)


@pytest.mark.parametrize("num_top", [0, 5])
def test_greedy_logprobs_are_the_models_log_softmax(num_top):
    loaded = tiny_loaded()
    prompts = random_prompts(3, 3, 20, loaded.config.vocab_size, seed=21)
    params = SamplingParams(max_new_tokens=10, logprobs=num_top)
    results = run_with_logprobs(small_engine(loaded, max_num_batched_tokens=16), prompts, params)  # chunked prefill
    for prompt, (output, entries) in zip(prompts, results):
        assert output
        assert_matches_model(loaded, prompt, output, entries, num_top, greedy=True)


def test_sampled_logprobs_are_of_the_raw_logits_not_the_tempered_ones():
    loaded = tiny_loaded()
    prompts = random_prompts(2, 5, 15, loaded.config.vocab_size, seed=22)
    params = SamplingParams(max_new_tokens=10, temperature=1.5, top_k=20, seed=3, logprobs=3)
    for prompt, (output, entries) in zip(prompts, run_with_logprobs(small_engine(loaded), prompts, params)):
        assert_matches_model(loaded, prompt, output, entries, 3, greedy=False)


def test_speculative_steps_report_one_entry_per_new_token():
    loaded = tiny_loaded()
    prompts = [[7, 8, 9] * 6, [3, 4, 5, 6] * 4] + random_prompts(2, 5, 20, 256, seed=23)
    params = SamplingParams(max_new_tokens=30, logprobs=2)
    engine = small_engine(loaded, speculative="ngram", num_speculative_tokens=4)
    multi_token_steps = []
    original_step = engine.step

    def step():
        outputs = original_step()
        multi_token_steps.extend(o for o in outputs if len(o.new_token_ids) > 1)
        return outputs
    engine.step = step
    results = run_with_logprobs(engine, prompts, params)
    assert engine.stats.accepted_draft_tokens > 0 and multi_token_steps
    assert all(len(o.new_logprobs) == len(o.new_token_ids) for o in multi_token_steps)
    for prompt, (output, entries) in zip(prompts, results):
        assert_matches_model(loaded, prompt, output, entries, 2, greedy=True)


def test_requests_without_logprobs_are_unaffected_and_cost_nothing(monkeypatch):
    loaded = tiny_loaded()
    prompts = random_prompts(4, 5, 25, 256, seed=24)
    greedy = SamplingParams(max_new_tokens=12)
    sampled = SamplingParams(max_new_tokens=12, temperature=0.9, seed=7)
    plain = run_engine(small_engine(loaded), prompts, [greedy, sampled, greedy, sampled])

    def forbidden(*args, **kwargs):
        raise AssertionError("logprobs computed although no request asked for them")
    with monkeypatch.context() as patch:
        patch.setattr("llmpress.engine.llm_engine.token_logprobs", forbidden)
        assert [t for t, _ in run_with_logprobs(small_engine(loaded), prompts, [greedy, sampled] * 2)] == plain
    asking = [SamplingParams(max_new_tokens=12, logprobs=1),
              SamplingParams(max_new_tokens=12, temperature=0.9, seed=7, logprobs=4)]
    mixed = run_with_logprobs(small_engine(loaded), prompts, [asking[0], sampled, greedy, asking[1]])
    assert [t for t, _ in mixed] == plain  # asking changes no token, neither theirs nor their neighbours'
    assert mixed[1][1] is None and mixed[2][1] is None
    assert_matches_model(loaded, prompts[0], *mixed[0], 1, greedy=True)
    assert_matches_model(loaded, prompts[3], *mixed[3], 4, greedy=False)


def test_logprobs_survive_preemption():
    loaded = tiny_loaded()
    prompts = random_prompts(6, 10, 30, 256, seed=25)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, logprobs=1)
    engine = small_engine(loaded, num_gpu_blocks=16, block_size=4)
    results = run_with_logprobs(engine, prompts, params)
    assert engine.stats.num_preemptions > 0
    for prompt, (output, entries) in zip(prompts, results):
        assert len(output) == 16
        assert_matches_model(loaded, prompt, output, entries, 1, greedy=True)
    assert engine._num_logprob_requests == 0


def test_aborted_request_reports_an_empty_list():
    engine = small_engine(tiny_loaded())
    engine.add_request("a", [1, 2, 3], SamplingParams(max_new_tokens=20, logprobs=0))
    engine.step()
    engine.abort_request("a")
    (output,) = engine.step()
    assert output.finish_reason == "abort" and output.new_logprobs == []
    assert engine._num_logprob_requests == 0


@pytest.mark.parametrize("value", [-1, 21])
def test_logprobs_out_of_range_get_one_clear_sentence(value):
    with pytest.raises(LlmpressError, match=r"logprobs must be between 0 and 20.*got"):
        SamplingParams(logprobs=value)

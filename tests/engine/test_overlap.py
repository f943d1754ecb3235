"""Overlapped scheduling (step n+1 planned and launched before step n's tokens are read back) against the
plain synchronous loop: the same tokens and finish reasons, and no leaked blocks, whether requests stop on
a token, reach their length, get preempted or are aborted mid-flight."""

from __future__ import annotations

from llmpress.generation.sampling import SamplingParams
from tests.engine.helpers import random_prompts, run_engine, small_engine, tiny_loaded


def finished_outputs(engine, prompts, params) -> list[tuple[list[int], str]]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    done = {}
    engine.run_to_completion(lambda o: done.__setitem__(o.request_id, (o.output_token_ids, o.finish_reason))
                             if o.finished else None)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # nothing leaked
    return [done[f"r{i}"] for i in range(len(prompts))]


def sync_and_overlapped(loaded, prompts, params, **overrides):
    engines = [small_engine(loaded, async_scheduling=overlap, **overrides) for overlap in (False, True)]
    return [finished_outputs(e, prompts, params) for e in engines], engines


def tokens_the_model_emits(loaded, prompts) -> list[int]:
    """Stop tokens that really occur a few tokens into the outputs, so some requests stop early."""
    free = run_engine(small_engine(loaded, async_scheduling=False), prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    return sorted({out[4] for out in free[:3]})


def test_stops_and_lengths_match_the_synchronous_loop():
    loaded = tiny_loaded()
    prompts = random_prompts(8, 3, 30, 256, seed=21)
    stops = tokens_the_model_emits(loaded, prompts)
    params = [SamplingParams(max_new_tokens=6 + 3 * i, stop_token_ids=stops) for i in range(len(prompts))]
    (sync, overlapped), _ = sync_and_overlapped(loaded, prompts, params)
    assert overlapped == sync
    assert {reason for _, reason in sync} == {"stop", "length"}


def test_preemption_with_overlap_loses_nothing():
    loaded = tiny_loaded()
    prompts = random_prompts(8, 10, 30, 256, seed=5)
    stops = tokens_the_model_emits(loaded, prompts)
    params = [SamplingParams(max_new_tokens=20, stop_token_ids=stops if i % 2 else [], ignore_eos=False)
              for i in range(len(prompts))]
    (sync, overlapped), engines = sync_and_overlapped(loaded, prompts, params, num_gpu_blocks=16)
    assert engines[1].stats.num_preemptions > 0
    assert overlapped == sync


def test_seeded_and_shared_sampling_match_the_synchronous_loop():
    loaded = tiny_loaded()
    prompts = random_prompts(5, 4, 20, 256, seed=13)
    stops = tokens_the_model_emits(loaded, prompts)
    seeded = [SamplingParams(max_new_tokens=14, temperature=0.8, top_p=0.9, seed=7 + i, stop_token_ids=stops)
              for i in range(3)]
    shared = [SamplingParams(max_new_tokens=10 + i, temperature=1.0, top_k=30, ignore_eos=True) for i in range(2)]
    (sync, overlapped), _ = sync_and_overlapped(loaded, prompts, seeded + shared)
    assert overlapped == sync


def test_abort_while_a_step_is_in_flight():
    loaded = tiny_loaded()
    prompts = random_prompts(3, 5, 12, 256, seed=17)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    expected = run_engine(small_engine(loaded, async_scheduling=False), prompts, params)
    engine = small_engine(loaded)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    outputs = engine.step() + engine.step()
    assert engine._in_flight is not None  # the next step was launched before this one's tokens were read
    engine.abort_request("r1")
    engine.run_to_completion(outputs.append)
    finished = {o.request_id: o for o in outputs if o.finished}
    assert finished["r1"].finish_reason == "abort"
    assert expected[1][:len(finished["r1"].output_token_ids)] == finished["r1"].output_token_ids
    assert [finished[f"r{i}"].output_token_ids for i in (0, 2)] == [expected[0], expected[2]]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_requests_that_read_their_tokens_on_the_host_turn_overlap_off():
    loaded = tiny_loaded()
    engine = small_engine(loaded)
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.step()
    assert engine._in_flight is not None
    engine.run_to_completion()
    engine.add_request("penalized", [1, 2, 3], SamplingParams(max_new_tokens=8, repetition_penalty=1.2))
    engine.step()
    assert engine._in_flight is None
    engine.run_to_completion()
    engine.add_request("plain", [1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True))
    engine.step()
    assert engine._in_flight is not None  # the counter went back to zero when the penalized request ended

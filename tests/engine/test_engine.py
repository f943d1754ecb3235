"""The engine against plain one-prompt decoding: batching, chunked prefill, preemption, prefix caching,
quantized KV cache, sampling and aborts."""

from __future__ import annotations

import pytest
import torch

from llmpress.engine import LLM, EngineConfig, LLMEngine
from llmpress.engine.paged_cache import bytes_per_block
from llmpress.errors import LlmpressError
from llmpress.config import KNOWN_ARCHITECTURES
from llmpress.generation.sampling import SamplingParams
from tests.conftest import TINY_VARIANTS
from tests.engine.helpers import decode_alone, random_prompts, run_engine, small_engine, tiny_loaded

GREEDY = SamplingParams(max_new_tokens=24)


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
@pytest.mark.parametrize("block_size,budget", [(4, 16), (16, 512)])
def test_batched_greedy_equals_each_prompt_alone(variant, block_size, budget):
    loaded = tiny_loaded(**TINY_VARIANTS[variant])
    prompts = random_prompts(7, 1, 45, loaded.config.vocab_size, seed=block_size)
    engine = small_engine(loaded, block_size=block_size, max_num_batched_tokens=budget)
    outputs = run_engine(engine, prompts, GREEDY)
    assert outputs == [decode_alone(loaded, p, GREEDY) for p in prompts]
    assert engine.stats.prefill_tokens == sum(map(len, prompts))  # chunks add up to the prompts, nothing twice


def test_requests_joining_mid_flight_get_the_same_tokens():
    loaded = tiny_loaded()
    prompts = random_prompts(6, 5, 30, 256, seed=3)
    engine = small_engine(loaded, max_num_batched_tokens=24)
    done = {}
    for i, prompt in enumerate(prompts[:2]):
        engine.add_request(f"r{i}", prompt, GREEDY)
    steps = 0
    while engine.has_unfinished_requests() or len(done) < len(prompts):
        if steps < 4 and steps + 2 < len(prompts):  # one new request per step while others decode
            engine.add_request(f"r{steps + 2}", prompts[steps + 2], GREEDY)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.output_token_ids
        steps += 1
    assert [done[f"r{i}"] for i in range(len(prompts))] == [decode_alone(loaded, p, GREEDY) for p in prompts]


def test_preemption_under_a_tiny_kv_budget_loses_nothing():
    loaded = tiny_loaded()
    prompts = random_prompts(8, 10, 30, 256, seed=5)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine = small_engine(loaded, num_gpu_blocks=16, block_size=4)  # 64 tokens of KV for 8 x ~40-token requests
    outputs = run_engine(engine, prompts, params)
    assert engine.stats.num_preemptions > 0
    assert outputs == [decode_alone(loaded, p, params) for p in prompts]
    assert engine.block_manager.num_free_blocks == 16


def test_prefix_cache_hits_give_the_same_outputs_as_misses():
    loaded = tiny_loaded()
    system = random_prompts(1, 40, 40, 256, seed=7)[0]
    prompts = [system + tail for tail in random_prompts(5, 2, 9, 256, seed=8)]
    cold = run_engine(small_engine(loaded, enable_prefix_caching=False), prompts, GREEDY)
    engine = small_engine(loaded)
    first = run_engine(engine, prompts[:1], GREEDY, prefix="a")  # fills the cache with the shared prompt
    warm = first + run_engine(engine, prompts[1:], GREEDY, prefix="b")
    assert warm == cold == [decode_alone(loaded, p, GREEDY) for p in prompts]
    assert engine.block_manager.prefix_hit_tokens >= 4 * 40 // 4 * 4
    assert engine.stats.prefix_cache_hit_rate > 0.5
    # Multi-turn: the next turn's prompt is the previous prompt, its answer and a new message.
    turn2 = prompts[0] + first[0] + [5, 6, 7]
    engine.add_request("turn2", turn2, GREEDY)
    outputs = []
    engine.run_to_completion(lambda o: outputs.append(o))
    assert outputs[-1].num_cached_tokens >= len(prompts[0]) // 4 * 4
    assert outputs[-1].output_token_ids == decode_alone(loaded, turn2, GREEDY)


@pytest.mark.parametrize("kv_dtype,tolerance", [("int8", 0.02), ("fp8", 0.08)])
def test_quantized_kv_cache_logits_stay_close(kv_dtype, tolerance):
    loaded = tiny_loaded(dtype=torch.float32)
    prompts = random_prompts(4, 20, 40, 256, seed=9)
    logits = {}
    for dtype in ("auto", kv_dtype):
        engine = small_engine(loaded, kv_cache_dtype=dtype)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, SamplingParams(max_new_tokens=4))
        scheduled = engine.scheduler.schedule()
        logits[dtype] = engine.runner.execute(scheduled).double()
        assert engine.runner.cache.keys[0].dtype != torch.float32 or dtype == "auto"
    error = (logits[kv_dtype] - logits["auto"]).norm() / logits["auto"].norm()
    assert error < tolerance


def test_quantized_kv_cache_nearly_doubles_the_tokens_per_byte():
    config = KNOWN_ARCHITECTURES["llama-3.2-3b"]
    bf16 = bytes_per_block(config, 16, "auto", torch.bfloat16)
    for kv in ("fp8", "int8"):
        assert bf16 / bytes_per_block(config, 16, kv, torch.bfloat16) >= 1.9
    engine_bytes = {dtype: LLMEngine(tiny_loaded(), EngineConfig(num_gpu_blocks=10, kv_cache_dtype=dtype)).runner.cache.nbytes
                    for dtype in ("auto", "int8")}
    assert engine_bytes["int8"] < engine_bytes["auto"]


def test_seeded_sampling_does_not_depend_on_the_batch():
    loaded = tiny_loaded()
    prompts = random_prompts(4, 5, 20, 256, seed=11)
    seeded = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    others = SamplingParams(max_new_tokens=16, temperature=1.0, top_k=20)
    alone = run_engine(small_engine(loaded), prompts[:1], seeded)[0]
    mixed = run_engine(small_engine(loaded), prompts, [seeded] + [others] * 3)[0]
    assert alone == mixed
    penalized = SamplingParams(max_new_tokens=16, repetition_penalty=1.3)
    assert run_engine(small_engine(loaded), prompts[1:2], penalized) == [decode_alone(loaded, prompts[1], penalized)]


def test_abort_frees_the_request_and_reports_it():
    loaded = tiny_loaded()
    engine = small_engine(loaded)
    engine.add_request("keep", [1, 2, 3], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.add_request("drop", [4, 5, 6], SamplingParams(max_new_tokens=30, ignore_eos=True))
    engine.step()
    engine.abort_request("drop")
    engine.abort_request("unknown")  # a no-op
    outputs = engine.step()
    dropped = [o for o in outputs if o.request_id == "drop"]
    assert dropped and dropped[0].finished and dropped[0].finish_reason == "abort"
    engine.run_to_completion()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    engine.add_request("drop", [4], GREEDY)  # a finished id can be reused


@pytest.mark.parametrize("call,message", [
    (lambda e: e.add_request("a", [], GREEDY), "empty"),
    (lambda e: e.add_request("a", [1] * 500, GREEDY), "context"),
    (lambda e: e.add_request("a", [1, 999], GREEDY), "token ids"),
    (lambda e: (e.add_request("a", [1], GREEDY), e.add_request("a", [1], GREEDY)), "already"),
    (lambda e: e.add_request("a", [1] * 380, SamplingParams(max_new_tokens=100)), "KV blocks"),
])
def test_bad_requests_get_one_clear_sentence(call, message):
    engine = small_engine(tiny_loaded(), num_gpu_blocks=100)
    with pytest.raises(LlmpressError, match=message):
        call(engine)


def test_bad_options_get_one_clear_sentence():
    with pytest.raises(LlmpressError, match="kv-cache-dtype"):
        EngineConfig(kv_cache_dtype="fp4")
    with pytest.raises(LlmpressError, match="max-num-seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(LlmpressError, match="unknown engine option"):
        LLM(tiny_loaded(), max_batch=3)
    with pytest.raises(LlmpressError, match="exceeds the model's context"):
        LLMEngine(tiny_loaded(), EngineConfig(max_model_len=100_000))


def test_llm_on_the_embedded_model_matches_plain_decoding(embedded):
    llm = LLM(embedded, max_num_batched_tokens=64, cpu_kv_tokens=4096)
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?"]
    params = SamplingParams(max_new_tokens=12)
    completions = llm.chat([[{"role": "user", "content": q}] for q in questions], params, use_tqdm=False)
    assert "Paris" in completions[0].text
    from llmpress.tokenizer import encode_chat
    for question, completion in zip(questions, completions):
        prompt = encode_chat(embedded.tokenizer, [{"role": "user", "content": question}])[0].tolist()
        assert completion.token_ids == decode_alone(embedded, prompt, params)
    texts = llm.generate(["The capital of France is"], SamplingParams(max_new_tokens=4), use_tqdm=False)
    assert texts[0].text and texts[0].finish_reason in ("stop", "length")


def test_perplexity_through_the_paged_cache_equals_plain_attention():
    from llmpress.engine.kv_eval import PagedCacheForward
    loaded = tiny_loaded()
    ids = torch.randint(0, 255, (2, 37), generator=torch.Generator().manual_seed(0))
    plain = loaded.model(ids)
    assert torch.allclose(PagedCacheForward(loaded.model, "auto", block_size=8)(ids), plain, rtol=0, atol=1e-12)


def test_ngram_speculation_inside_batches_keeps_greedy_outputs():
    loaded = tiny_loaded()
    prompts = random_prompts(6, 5, 30, 256, seed=13) + [[7, 8, 9] * 6]
    params = SamplingParams(max_new_tokens=40)
    plain_engine = small_engine(loaded)
    plain = run_engine(plain_engine, prompts, params)
    engine = small_engine(loaded, speculative="ngram", num_speculative_tokens=4)
    assert run_engine(engine, prompts, params) == plain == [decode_alone(loaded, p, params) for p in prompts]
    assert engine.stats.accepted_draft_tokens > 0 and engine.stats.steps < plain_engine.stats.steps
    assert 0 < engine.stats.draft_acceptance_rate <= 1
    # Under preemption, and beside sampled requests (which do not draft), nothing changes either.
    tight = small_engine(loaded, speculative="ngram", num_gpu_blocks=24, block_size=4)
    sampled = SamplingParams(max_new_tokens=20, temperature=0.8, seed=5)
    mixed = run_engine(tight, prompts + prompts[:2], [params] * len(prompts) + [sampled] * 2)
    assert mixed[:len(prompts)] == plain and tight.stats.num_preemptions > 0
    alone = run_engine(small_engine(loaded), prompts[:1], sampled)[0]
    assert mixed[len(prompts)] == alone


def test_speculation_options_are_checked():
    with pytest.raises(LlmpressError, match="ngram"):
        EngineConfig(speculative="eagle")
    with pytest.raises(LlmpressError, match="num-speculative-tokens"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)

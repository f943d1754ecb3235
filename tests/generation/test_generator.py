"""The generator: greedy output equals transformers' generate on the real model; batching, limits, modes, seeds."""

from __future__ import annotations

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.generation import Generator, SamplingParams
from llmpress.model import LlamaForCausalLM
from llmpress.tokenizer import encode_chat, encode_text
from tests.conftest import tiny_config

QUESTION = "What is the capital of France?"
CONTINUATION = "The history of the city of Rome begins"
NEW_TOKENS = 64


def hf_greedy(hf_model, prompt_ids: torch.Tensor, new_tokens: int) -> list[int]:
    """transformers' greedy continuation with EOS switched off, so it always makes `new_tokens` tokens."""
    out = hf_model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                            max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None, pad_token_id=0)
    generated = out[0, prompt_ids.shape[1]:].tolist()
    assert len(generated) == new_tokens
    return generated


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "plain-text"])
def test_greedy_generation_matches_transformers_token_for_token(embedded, hf_embedded, chat):
    if chat:
        prompt = encode_chat(embedded.tokenizer, [{"role": "user", "content": QUESTION}])
    else:
        prompt = encode_text(embedded.tokenizer, CONTINUATION)
    expected = hf_greedy(hf_embedded, prompt, NEW_TOKENS)
    generator = Generator(embedded.model, prompt.shape[1] + NEW_TOKENS)
    output = generator.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert output.token_ids[0].tolist() == expected
    assert output.num_generated == [NEW_TOKENS] and output.finish_reasons == ["length"]
    if not chat:
        return
    # With stop tokens the same run ends at the first EOS, which transformers also produced there.
    stops = embedded.stop_token_ids
    first_stop = next(i for i, t in enumerate(expected) if t in stops)
    stopped = generator.generate(prompt, SamplingParams(max_new_tokens=NEW_TOKENS), stop_token_ids=stops)
    assert stopped.finish_reasons == ["stop"] and stopped.num_generated == [first_stop + 1]
    assert stopped.token_ids.shape[1] == first_stop + 1  # generation really stopped: no steps after the EOS
    assert stopped.token_ids[0].tolist() == expected[:first_stop + 1]
    text = embedded.tokenizer.decode(stopped.token_ids[0], skip_special_tokens=True)
    assert "Paris" in text


# -- tiny random model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    # float64: random weights leave near-ties between top logits, and batched vs single-row matmuls
    # round differently in float32; in float64 the greedy choice cannot flip on rounding.
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config()).double().eval()


def random_prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_batch_rows_equal_single_prompt_generation(tiny_model):
    prompts = random_prompts(3, 10)
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    batched = Generator(tiny_model, 30, batch_size=3).generate(prompts, params).token_ids
    single = Generator(tiny_model, 30, batch_size=1)
    for row in range(3):
        alone = single.generate(prompts[row:row + 1], params).token_ids  # one cache, reused per prompt
        assert batched[row].tolist() == alone[0].tolist()
    assert len({tuple(r) for r in batched.tolist()}) == 3  # the rows really are different sequences


def test_a_row_that_stops_early_is_padded_with_its_stop_token(tiny_model):
    prompts = random_prompts(2, 8, seed=1)
    free = Generator(tiny_model, 24, batch_size=2).generate(prompts, SamplingParams(max_new_tokens=16, ignore_eos=True))
    stop = free.token_ids[0, 4].item()
    assert stop not in free.token_ids[1].tolist()[:15], "pick another seed: row 1 should not hit row 0's stop token"
    first = free.token_ids[0].tolist().index(stop)
    out = Generator(tiny_model, 24, batch_size=2).generate(prompts, SamplingParams(max_new_tokens=16), stop_token_ids=[stop])
    assert out.num_generated[0] == first + 1 and out.finish_reasons[0] == "stop"
    assert out.token_ids[0, first:].tolist() == [stop] * (16 - first)
    assert out.token_ids[0, :first].tolist() == free.token_ids[0, :first].tolist()
    assert out.token_ids[1].tolist()[:15] == free.token_ids[1].tolist()[:15]


def test_prompt_plus_new_tokens_beyond_the_cache_is_refused(tiny_model):
    generator = Generator(tiny_model, 32)
    with pytest.raises(LlmpressError, match=r"prompt of 20 tokens \+ 13 new tokens exceeds the 32-token cache"):
        generator.generate(random_prompts(1, 20), SamplingParams(max_new_tokens=13))
    assert generator.generate(random_prompts(1, 20), SamplingParams(max_new_tokens=12, ignore_eos=True)).token_ids.shape == (1, 12)


def test_wrong_batch_size_is_refused(tiny_model):
    with pytest.raises(LlmpressError, match="built for batch 1, got 2 prompts"):
        Generator(tiny_model, 32).generate(random_prompts(2, 4), SamplingParams(max_new_tokens=2))


@pytest.mark.parametrize("mode", ["compile", "graph"])
def test_cuda_only_modes_on_cpu_name_the_fix(tiny_model, mode):
    with pytest.raises(LlmpressError, match=rf"'{mode}' needs a CUDA device; use --decode-mode eager"):
        Generator(tiny_model, 32, mode=mode)


def test_cache_longer_than_the_model_context_is_refused(tiny_model):
    with pytest.raises(LlmpressError, match="context is 512; shorten the prompt or lower --max-new-tokens"):
        Generator(tiny_model, 513)


def test_seeded_sampling_is_reproducible(tiny_model):
    prompt = random_prompts(1, 6)
    generator = Generator(tiny_model, 30)

    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, seed=seed, ignore_eos=True)
        return generator.generate(prompt, params).token_ids[0].tolist()

    assert sample(0) == sample(0)
    assert len({tuple(sample(seed)) for seed in (1, 2, 3)}) > 1


def logits_step_tokens(model, prompts, params, stop_token_ids=(), **generator_args) -> list[list[int]]:
    """The same generation through the logits step, the host picking each token (greedy_steps_on_device off)."""
    import llmpress.generation.generator as generator_module
    previous, generator_module.greedy_steps_on_device = generator_module.greedy_steps_on_device, False
    try:
        generator = Generator(model, 40, batch_size=prompts.shape[0], **generator_args)
        return generator.generate(prompts, params, stop_token_ids).token_ids.tolist()
    finally:
        generator_module.greedy_steps_on_device = previous


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_steps_on_the_device_give_the_tokens_of_the_logits_step(tiny_model, batch):
    prompts = random_prompts(batch, 9, seed=3)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    expected = logits_step_tokens(tiny_model, prompts, params)
    generator = Generator(tiny_model, 40, batch_size=batch)
    for _ in range(2):  # a second generation reuses the step's buffers
        assert generator.generate(prompts, params).token_ids.tolist() == expected
    assert generator._greedy is not None and generator._decode is None  # the device step ran, not the logits one
    stop = expected[0][10]
    stopped = generator.generate(prompts, SamplingParams(max_new_tokens=24), stop_token_ids=[stop])
    assert stopped.token_ids.tolist() == logits_step_tokens(tiny_model, prompts, SamplingParams(max_new_tokens=24),
                                                            [stop])
    one = generator.generate(prompts, SamplingParams(max_new_tokens=1, ignore_eos=True)).token_ids.tolist()
    assert one == [row[:1] for row in expected]


def test_sampling_and_repetition_penalty_keep_the_logits_step(tiny_model):
    generator = Generator(tiny_model, 40)
    generator.generate(random_prompts(1, 6), SamplingParams(max_new_tokens=4, repetition_penalty=1.3, ignore_eos=True))
    assert generator._greedy is None and generator._decode is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode,steps_per_graph", [("graph", 1), ("compile", 1), ("compile", 5)])
def test_captured_greedy_steps_on_cuda_give_the_tokens_of_eager_decoding(mode, steps_per_graph, monkeypatch):
    import llmpress.generation.generator as generator_module
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).to("cuda").eval()
    prompts = random_prompts(2, 9, seed=3).cuda()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)  # 23 steps: 4 runs of 5, then 3 single ones
    expected = logits_step_tokens(model, prompts, params, mode="eager")
    assert logits_step_tokens(model, prompts, params, mode=mode) == expected
    monkeypatch.setattr(generator_module, "greedy_steps_per_graph", steps_per_graph)
    generator = Generator(model, 40, batch_size=2, mode=mode)
    for _ in range(2):
        assert generator.generate(prompts, params).token_ids.tolist() == expected
    assert sorted(generator._greedy._replays) == sorted({1, steps_per_graph})
    stop = expected[1][12]
    stopped = generator.generate(prompts, SamplingParams(max_new_tokens=24), stop_token_ids=[stop])
    assert stopped.token_ids.tolist() == logits_step_tokens(model, prompts, SamplingParams(max_new_tokens=24), [stop],
                                                            mode="eager")

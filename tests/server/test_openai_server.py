"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client (and httpx for raw
requests): greedy text equals llmpress.generation's, streaming, concurrency, errors, disconnects, stop strings,
logprobs in both of OpenAI's shapes, and n choices per request."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import threading
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from llmpress.commands.generate import generate_from_ids  # noqa: E402
from llmpress.engine import EngineConfig, LLMEngine  # noqa: E402
from llmpress.generation import SamplingParams  # noqa: E402
from llmpress.server import AsyncEngine  # noqa: E402
from llmpress.server.app import build_app  # noqa: E402
from llmpress.tokenizer import encode_chat, encode_text  # noqa: E402

MODEL = "smollm2-135m"
MAX_MODEL_LEN = 512
COMPLETION_PROMPT = "The capital of France is"
CHAT_MESSAGES = [{"role": "user", "content": "Name three colours."}]


@dataclass
class Served:
    base_url: str  # http://127.0.0.1:PORT
    async_engine: AsyncEngine

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key="x", max_retries=0, timeout=60)


@contextlib.contextmanager
def running_server(app):
    """uvicorn on a socket bound here (no port race), in a thread; stopped through should_exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: server.started, timeout_s=30), "the server did not start within 30 s"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def wait_until(condition, timeout_s: float, poll_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(poll_s)
    return condition()


@pytest.fixture(scope="module")
def served(embedded):
    # 512 blocks of 16 tokens: room for the 64 concurrent requests plus a long one, ~380 MB of fp32 KV on CPU.
    config = EngineConfig(max_model_len=MAX_MODEL_LEN, num_gpu_blocks=512, max_num_seqs=64, enforce_eager=True)
    async_engine = AsyncEngine(LLMEngine(embedded, config))
    with running_server(build_app(async_engine, MODEL)) as base_url:
        yield Served(base_url, async_engine)
    assert not async_engine.is_healthy  # the app's lifespan shut the engine thread down


def greedy_reference(loaded, prompt_ids, max_tokens: int) -> str:
    """What `llmpress generate` (the static-cache Generator, eager) prints for these prompt ids [1, T]."""
    text, _ = generate_from_ids(loaded, prompt_ids, SamplingParams(max_new_tokens=max_tokens), mode="eager")
    return text


# -- answers -------------------------------------------------------------------------------------
def test_models_lists_the_served_model(served):
    models = served.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_completion_is_the_greedy_generation(served, embedded):
    expected = greedy_reference(embedded, encode_text(embedded.tokenizer, COMPLETION_PROMPT), 12)
    response = served.client().completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=12,
                                                  temperature=0)
    assert response.object == "text_completion" and response.model == MODEL
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason in ("length", "stop")
    prompt_tokens = encode_text(embedded.tokenizer, COMPLETION_PROMPT).shape[1]
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    # Token ids as the prompt give the same answer.
    by_ids = served.client().completions.create(model=MODEL, prompt=encode_text(embedded.tokenizer, COMPLETION_PROMPT)[0].tolist(),
                                                max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == expected


def test_chat_completion_is_the_greedy_generation(served, embedded):
    expected = greedy_reference(embedded, encode_chat(embedded.tokenizer, CHAT_MESSAGES), 16)
    response = served.client().chat.completions.create(messages=CHAT_MESSAGES, model=MODEL,
                                                       max_completion_tokens=16, temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected
    assert response.usage.prompt_tokens == encode_chat(embedded.tokenizer, CHAT_MESSAGES).shape[1]


def test_streaming_chat_concatenates_to_the_full_reply(served):
    client = served.client()
    full = client.chat.completions.create(messages=CHAT_MESSAGES, model=MODEL, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(messages=CHAT_MESSAGES, model=MODEL, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in with_choices][-1] == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == full.usage.completion_tokens


def test_streaming_completion_ends_with_done(served):
    full = served.client().completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=10, temperature=0)
    body = {"model": MODEL, "prompt": COMPLETION_PROMPT, "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{served.base_url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == full.choices[0].text
    assert chunks[-1]["choices"][0]["finish_reason"] == full.choices[0].finish_reason


def test_64_concurrent_requests_are_all_answered(served):
    async def send_all():
        client = openai.AsyncOpenAI(base_url=f"{served.base_url}/v1", api_key="x", max_retries=0, timeout=120)
        async with client:
            return await asyncio.gather(*(
                client.completions.create(model=MODEL, prompt=f"Fact number {i}:" + " and" * (i % 9), max_tokens=8,
                                          temperature=0.7, seed=i, extra_body={"ignore_eos": True})
                for i in range(64)))

    start = time.monotonic()
    responses = asyncio.run(send_all())
    assert time.monotonic() - start < 90
    assert len({r.id for r in responses}) == 64
    for r in responses:
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    assert served.async_engine.num_unfinished() == 0


def test_stop_strings_cut_the_text_and_end_the_request(served):
    client = served.client()
    full = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]  # a few characters from the middle, possibly spanning tokens
    expected = full[:full.index(stop)]
    # A long budget: the request must end at the stop string, not run on to max_tokens.
    long = dict(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=MAX_MODEL_LEN - 16, temperature=0,
                extra_body={"ignore_eos": True})
    response = client.completions.create(stop=["never appears", stop], **long)
    assert response.choices[0].text == expected and response.choices[0].finish_reason == "stop"
    assert response.usage.completion_tokens < 16
    assert wait_until(lambda: served.async_engine.num_unfinished() == 0, timeout_s=3)
    streamed = list(client.completions.create(stop=stop, stream=True, **long))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"
    assert wait_until(lambda: served.async_engine.num_unfinished() == 0, timeout_s=3)


# -- logprobs and n ------------------------------------------------------------------------------
def test_completion_logprobs_in_the_legacy_shape(served):
    client = served.client()
    request = dict(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=10, temperature=0, logprobs=2)
    response = client.completions.create(**request)
    choice = response.choices[0]
    assert choice.finish_reason == "length"  # no EOS: every token's text is in the completion
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert len(lp.tokens) == response.usage.completion_tokens == 10
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and len(top) == 2
        assert top[token] == pytest.approx(logprob) and logprob == pytest.approx(max(top.values()))  # greedy
    without = client.completions.create(**{**request, "logprobs": None})
    assert without.choices[0].text == choice.text and without.choices[0].logprobs is None
    # Streamed: each chunk carries its own tokens' entries; offsets run on across chunks.
    chunks = [c for c in client.completions.create(stream=True, **request) if c.choices]
    assert all(c.choices[0].logprobs is not None for c in chunks)
    assert sum((c.choices[0].logprobs.tokens for c in chunks), []) == lp.tokens
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp.text_offset
    streamed = sum((c.choices[0].logprobs.token_logprobs for c in chunks), [])
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-4)


def check_chat_logprobs(content, num_top: int):
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == num_top
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token and values[0] == pytest.approx(entry.logprob)  # greedy
        assert all(t.bytes == list(t.token.encode("utf-8")) for t in entry.top_logprobs)


def test_chat_logprobs_streaming_and_not(served):
    client = served.client()
    request = dict(messages=CHAT_MESSAGES, model=MODEL, max_completion_tokens=12, temperature=0, logprobs=True,
                   top_logprobs=3)
    response = client.chat.completions.create(**request)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    check_chat_logprobs(content, 3)
    if response.choices[0].finish_reason == "length":
        assert "".join(e.token for e in content) == response.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **request))
    with_tokens = [c for c in chunks if c.choices and c.choices[0].logprobs is not None]
    streamed = sum((c.choices[0].logprobs.content for c in with_tokens), [])
    assert [e.token for e in streamed] == [e.token for e in content]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == response.choices[0].message.content
    plain = client.chat.completions.create(**{**request, "logprobs": None, "top_logprobs": None})
    assert plain.choices[0].logprobs is None
    only_sampled = client.chat.completions.create(**{**request, "top_logprobs": None})
    assert [e.top_logprobs for e in only_sampled.choices[0].logprobs.content] == [[]] * len(content)


def test_n_choices_with_a_seed_differ_and_their_usage_adds_up(served):
    client = served.client()
    request = dict(model=MODEL, prompt=COMPLETION_PROMPT, max_tokens=12, temperature=0.8, seed=7, n=3, logprobs=0)
    response = client.completions.create(**request)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in response.choices)
    assert response.usage.prompt_tokens == client.completions.create(model=MODEL, prompt=COMPLETION_PROMPT,
                                                                      max_tokens=1).usage.prompt_tokens
    texts = [c.text for c in response.choices]
    assert len(set(texts)) > 1  # seeds 7, 8, 9
    again = client.completions.create(**request)
    assert [c.text for c in again.choices] == texts  # seeded: reproducible
    alone = client.completions.create(**{**request, "n": 1})
    assert alone.choices[0].text == texts[0]  # choice 0 samples with the request's own seed
    greedy = client.completions.create(**{**request, "temperature": 0})
    assert len({c.text for c in greedy.choices}) == 1


def test_n_choices_stream_interleaved_by_index(served):
    client = served.client()
    request = dict(messages=CHAT_MESSAGES, model=MODEL, max_completion_tokens=10, temperature=0.8, seed=3, n=3)
    full = client.chat.completions.create(**request)
    assert [c.index for c in full.choices] == [0, 1, 2]
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **request))
    by_index = {i: [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i] for i in range(3)}
    for i, choices in by_index.items():
        assert choices[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in choices) == full.choices[i].message.content
        assert [c.finish_reason for c in choices][-1] == full.choices[i].finish_reason
        assert all(c.finish_reason is None for c in choices[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


# -- errors --------------------------------------------------------------------------------------
CHAT = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = {
    "invalid JSON": ("/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [', 400, None),
    "not an object": ("/v1/completions", b'["a prompt"]', 400, None),
    "missing messages": ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    "negative max_tokens": ("/v1/chat/completions", {"messages": CHAT, "max_tokens": -1}, 400, "max_tokens"),
    "bad role": ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    "prompt too long": ("/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, 400, None),
    "max_tokens past the context": ("/v1/completions", {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, None),
    "n below 1": ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    "best_of": ("/v1/completions", {"prompt": "hi", "n": 2, "best_of": 3}, 400, "best_of"),
    "logprobs above 20": ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    "top_logprobs above 20": ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21},
                              400, "top_logprobs"),
    "top_logprobs without logprobs": ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400,
                                      "top_logprobs"),
    "two prompts": ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    "token id outside the vocabulary": ("/v1/completions", {"prompt": [1, 10 ** 9]}, 400, None),
    "temperature out of range": ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    "unknown model": ("/v1/chat/completions", {"model": "gpt-5", "messages": CHAT}, 404, "model"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_error(served, case):
    path, body, status, param = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{served.base_url}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert error["message"].endswith(".") and "\n" not in error["message"]


def test_openai_client_raises_the_matching_errors_and_the_server_stays_healthy(served):
    client = served.client()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="hi " * 600, max_tokens=8)
    with pytest.raises(openai.BadRequestError, match="prompt has"):  # streaming: refused before the 200
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=MAX_MODEL_LEN, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=4)
    health = httpx.get(f"{served.base_url}/health", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens == 2


def test_an_internal_error_is_a_500_in_openai_shape_and_the_server_stays_healthy(served, monkeypatch):
    def broken_tokenizer(tokenizer, text):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr("llmpress.server.app.encode_text", broken_tokenizer)
    response = httpx.post(f"{served.base_url}/v1/completions", json={"prompt": "hi"}, timeout=30)
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "tokenizer exploded" in error["message"]
    assert httpx.get(f"{served.base_url}/health", timeout=10).status_code == 200


# -- disconnects ---------------------------------------------------------------------------------
def test_closing_a_stream_aborts_its_engine_request(served):
    engine = served.async_engine.engine
    decoded_before = engine.stats.decode_tokens
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{served.base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data: "))
            assert served.async_engine.num_unfinished() == 1
    assert wait_until(lambda: served.async_engine.num_unfinished() == 0, timeout_s=5)
    assert engine.stats.decode_tokens - decoded_before < max_tokens - 1  # stopped early, not run to the end


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_timing_out_aborts_its_non_streaming_request(served, n):
    engine = served.async_engine.engine
    decoded_before = engine.stats.decode_tokens
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": max_tokens, "ignore_eos": True, "n": n}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    assert wait_until(lambda: served.async_engine.num_unfinished() == 0, timeout_s=5)
    assert engine.stats.decode_tokens - decoded_before < n * (max_tokens - 1)


def test_closing_a_stream_of_several_choices_aborts_them_all(served):
    engine = served.async_engine.engine
    decoded_before = engine.stats.decode_tokens
    max_tokens = MAX_MODEL_LEN - 64  # the chat template adds a system prompt
    body = {"model": MODEL, "messages": CHAT, "max_tokens": max_tokens, "ignore_eos": True, "stream": True, "n": 3,
            "logprobs": True, "top_logprobs": 2}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{served.base_url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            for _ in range(6):  # three role chunks, then some tokens
                next(lines)
            assert served.async_engine.num_unfinished() == 3
    assert wait_until(lambda: served.async_engine.num_unfinished() == 0, timeout_s=5)
    assert engine.stats.decode_tokens - decoded_before < 3 * (max_tokens - 1)


# -- the online benchmark ------------------------------------------------------------------------
def test_serving_benchmark_measures_a_few_requests(served, tmp_path):
    from llmpress.bench.serving import format_serving_table, run_serving_benchmark, sample_requests
    result = run_serving_benchmark(served.base_url, num_prompts=4, request_rate=20.0, max_concurrency=2,
                                   input_len_range=(4, 16), output_len_range=(2, 6), seed=0)
    assert result.completed == 4 and result.failed == 0 and result.model == MODEL
    assert result.total_output_tokens == sum(n for _, _, n in sample_requests(4, (4, 16), (2, 6), seed=0))
    for metric in (result.ttft_ms, result.tpot_ms, result.latency_ms):
        assert 0 < metric.p50 <= metric.p90 <= metric.p99
    assert result.ttft_ms.p50 < result.latency_ms.p50
    assert result.output_tokens_per_s > 0 and not math.isnan(result.request_throughput)
    assert "TTFT" in format_serving_table(result)
    result.write_json(tmp_path / "serving.json")
    assert json.loads((tmp_path / "serving.json").read_text())["completed"] == 4

"""The OpenAI-compatible server, live on 127.0.0.1, driven by the official `openai` client (and httpx for raw
requests): greedy text equals llmpress.generation's, streaming, concurrency, errors, disconnects, stop strings."""

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
    "n > 1": ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
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


def test_a_client_timing_out_aborts_its_non_streaming_request(served):
    engine = served.async_engine.engine
    decoded_before = engine.stats.decode_tokens
    max_tokens = MAX_MODEL_LEN - 16
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": max_tokens, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    assert wait_until(lambda: served.async_engine.num_unfinished() == 0, timeout_s=5)
    assert engine.stats.decode_tokens - decoded_before < max_tokens - 1


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

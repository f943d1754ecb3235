"""AsyncEngine over the real LLMEngine (tiny random model): outputs, errors back to the caller, cancellation,
a crashed engine thread, and the `llmpress serve` options."""

from __future__ import annotations

import asyncio

import pytest
import torch

from llmpress.engine import EngineConfig, LLMEngine
from llmpress.errors import LlmpressError
from llmpress.generation import SamplingParams
from llmpress.loading import LoadedModel
from llmpress.loading.resolve import ModelSource
from llmpress.model import LlamaForCausalLM
from llmpress.server import AsyncEngine, EngineDeadError
from tests.conftest import tiny_config


def tiny_engine(max_model_len: int = 128) -> LLMEngine:
    torch.manual_seed(0)
    config = tiny_config()
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    loaded = LoadedModel(model, None, config, "tiny", ModelSource("random", architecture="tiny"))
    return LLMEngine(loaded, EngineConfig(max_model_len=max_model_len, num_gpu_blocks=64, enforce_eager=True))


@pytest.fixture
def async_engine():
    engine = AsyncEngine(tiny_engine())
    engine.start()
    yield engine
    engine.shutdown()


async def collect(async_engine, request_id, prompt, params):
    return [out async for out in async_engine.generate(request_id, prompt, params)]


def test_outputs_stream_until_finished_and_match_the_engine_alone(async_engine):
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def both():
        return await asyncio.gather(collect(async_engine, "a", [1, 2, 3], params),
                                    collect(async_engine, "b", [4, 5, 6, 7], params))

    a, b = asyncio.run(both())
    for outputs in (a, b):
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        assert sum((o.new_token_ids for o in outputs), []) == outputs[-1].output_token_ids
        assert len(outputs[-1].output_token_ids) == 6 and outputs[-1].finish_reason == "length"
    reference = tiny_engine()  # the same weights (seed 0), driven directly
    reference.add_request("a", [1, 2, 3], params)
    finished = {}
    reference.run_to_completion(lambda o: finished.update({o.request_id: o}) if o.finished else None)
    assert finished["a"].output_token_ids == a[-1].output_token_ids
    assert async_engine.num_unfinished() == 0


def test_add_request_errors_reach_the_caller_and_the_engine_lives_on(async_engine):
    with pytest.raises(LlmpressError, match="context"):
        asyncio.run(collect(async_engine, "long", [1] * 100, SamplingParams(max_new_tokens=100)))
    with pytest.raises(LlmpressError, match="empty"):
        asyncio.run(collect(async_engine, "empty", [], SamplingParams(max_new_tokens=4)))
    assert async_engine.is_healthy
    assert len(asyncio.run(collect(async_engine, "ok", [1, 2], SamplingParams(max_new_tokens=3, ignore_eos=True)))
               [-1].output_token_ids) == 3


def test_a_duplicate_id_is_refused_without_disturbing_the_running_request(async_engine):
    async def run():
        first = async_engine.generate("same", [1, 2], SamplingParams(max_new_tokens=40, ignore_eos=True))
        await anext(first)
        with pytest.raises(LlmpressError, match="already running"):
            await collect(async_engine, "same", [3, 4], SamplingParams(max_new_tokens=4))
        return [out async for out in first]

    rest = asyncio.run(run())
    assert rest[-1].finish_reason == "length" and len(rest[-1].output_token_ids) == 40


def test_a_cancelled_consumer_aborts_its_request(async_engine):
    async def run():
        task = asyncio.ensure_future(collect(async_engine, "gone", [1, 2], SamplingParams(max_new_tokens=120,
                                                                                          ignore_eos=True)))
        while async_engine.num_unfinished() == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if async_engine.num_unfinished() == 0:
                return True
            await asyncio.sleep(0.01)
        return False

    assert asyncio.run(run())
    assert async_engine.engine.stats.decode_tokens < 119


def test_abort_by_id_finishes_the_stream_with_abort(async_engine):
    async def run():
        outputs = async_engine.generate("x", [1, 2], SamplingParams(max_new_tokens=120, ignore_eos=True))
        first = await anext(outputs)
        async_engine.abort("x")
        return [first] + [out async for out in outputs]

    outputs = asyncio.run(run())
    assert outputs[-1].finished and outputs[-1].finish_reason == "abort"


def test_a_crashed_engine_fails_pending_requests_and_reports_unhealthy():
    engine = tiny_engine()

    def broken_step():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    engine.step = broken_step
    async_engine = AsyncEngine(engine)
    async_engine.start()
    with pytest.raises(EngineDeadError, match="illegal memory access"):
        asyncio.run(collect(async_engine, "a", [1, 2], SamplingParams(max_new_tokens=4)))
    assert not async_engine.is_healthy
    with pytest.raises(EngineDeadError, match="restart"):  # later requests are refused at once
        asyncio.run(collect(async_engine, "b", [1, 2], SamplingParams(max_new_tokens=4)))

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from llmpress.server.app import build_app
    client = TestClient(build_app(async_engine, "tiny"))  # no lifespan: the app does not restart the engine
    health = client.get("/health")
    assert health.status_code == 503 and "illegal memory access" in health.json()["reason"]
    answer = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
    assert answer.status_code == 500 and answer.json()["error"]["code"] == "engine_dead"


def test_serve_options_map_onto_engine_config():
    from llmpress.cli import build_parser
    from llmpress.commands.engine_args import engine_config_from_args
    args = build_parser().parse_args(["serve", "--port", "9000", "--max-num-seqs", "8", "--block-size", "32",
                                      "--kv-cache-dtype", "int8", "--no-enable-prefix-caching",
                                      "--max-model-len", "1024", "--served-model-name", "m"])
    config = engine_config_from_args(args)
    assert (config.max_num_seqs, config.block_size, config.kv_cache_dtype, config.max_model_len,
            config.enable_prefix_caching) == (8, 32, "int8", 1024, False)
    assert config.max_num_batched_tokens == EngineConfig().max_num_batched_tokens  # untouched: the default
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 9000, "m")

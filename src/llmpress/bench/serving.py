"""Online serving benchmark: a client that loads an OpenAI-compatible server the way vLLM's
`benchmark_serving.py` does, and measures what its users would see.

N requests with seeded prompt and output lengths arrive as a Poisson process at `request_rate` per second
(inf: all at once), at most `max_concurrency` in flight. Each streams /v1/completions with ignore_eos, so
it produces exactly its output length. Per request: TTFT (time to the first streamed token), TPOT
((latency - TTFT) / (output tokens - 1), the decode pace after the first token) and end-to-end latency.
One untimed warm-up request goes first, so compilation and first-touch costs stay out of the numbers.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from llmpress.atomic_write import write_json_atomic
from llmpress.errors import LlmpressError

# Prompts are sampled text, not token ids, so they work with any model's tokenizer; the word count is the
# intended length (common English words are one token each in BPE vocabularies) and the server's usage
# reports the exact prompt tokens.
WORDS = ("the of and to in is was for on that with as by at from his her an which it be were are this had "
         "not but or have they one all their she has been there who more when would time new two first after "
         "year city people world music school group state war film history game team house water river road "
         "light small great long early large local north south common power market field order story").split()


@dataclass
class RequestResult:
    prompt_words: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    prompt_tokens: int = 0  # as the server counted them (usage)
    output_tokens: int = 0
    ttft_s: float = math.nan
    latency_s: float = math.nan

    @property
    def tpot_s(self) -> float:
        if self.output_tokens < 2:
            return math.nan
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass
class Percentiles:
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None

    @classmethod
    def of_ms(cls, seconds: list[float]) -> "Percentiles":
        values = [s * 1e3 for s in seconds if not math.isnan(s)]
        if not values:
            return cls(None, None, None, None)
        p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist()
        return cls(float(np.mean(values)), p50, p90, p99)


@dataclass
class ServingBenchmarkResult:
    base_url: str
    model: str
    num_prompts: int
    request_rate: float  # requests per second offered; inf: all at once
    max_concurrency: int | None
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests per second
    output_tokens_per_s: float
    total_tokens_per_s: float  # input + output
    ttft_ms: Percentiles
    tpot_ms: Percentiles
    latency_ms: Percentiles
    errors: list[str] = field(default_factory=list)  # the first few failures' messages

    def to_dict(self) -> dict:
        record = asdict(self)
        record["request_rate"] = "inf" if math.isinf(self.request_rate) else self.request_rate  # JSON has no inf
        return record

    def write_json(self, path: Path) -> None:
        write_json_atomic(Path(path), self.to_dict())


def run_serving_benchmark(base_url: str, num_prompts: int = 100, request_rate: float = math.inf,
                          max_concurrency: int | None = None, input_len_range: tuple[int, int] = (32, 512),
                          output_len_range: tuple[int, int] = (32, 256), seed: int = 0, model: str | None = None,
                          request_timeout_s: float = 600.0, warmup: bool = True) -> ServingBenchmarkResult:
    """Send `num_prompts` streaming completions to the server at `base_url` (e.g. http://127.0.0.1:8000) and
    measure them. Lengths are drawn uniformly from the inclusive ranges with `seed`; `model`: the server's
    first model by default."""
    if num_prompts < 1:
        raise LlmpressError(f"--num-prompts must be at least 1, got {num_prompts}.")
    if not request_rate > 0:
        raise LlmpressError(f"--request-rate must be > 0 (inf: all at once), got {request_rate}.")
    if max_concurrency is not None and max_concurrency < 1:
        raise LlmpressError(f"--max-concurrency must be at least 1, got {max_concurrency}.")
    for name, (low, high) in (("input", input_len_range), ("output", output_len_range)):
        if not 1 <= low <= high:
            raise LlmpressError(f"the {name} length range must be 1 <= low <= high, got {low}..{high}.")
    return asyncio.run(_benchmark(base_url.rstrip("/"), num_prompts, request_rate, max_concurrency,
                                  input_len_range, output_len_range, seed, model, request_timeout_s, warmup))


def sample_requests(num_prompts: int, input_len_range: tuple[int, int], output_len_range: tuple[int, int],
                    seed: int) -> list[tuple[str, int, int]]:
    """(prompt text, prompt words, max_tokens) per request, the same for the same seed."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        words = rng.randint(*input_len_range)
        requests.append((" ".join(rng.choice(WORDS) for _ in range(words)), words, rng.randint(*output_len_range)))
    return requests


def arrival_delays_s(num_prompts: int, request_rate: float, seed: int) -> list[float]:
    """Start time of each request after the first, in seconds: a Poisson process (exponential gaps)."""
    if math.isinf(request_rate):
        return [0.0] * num_prompts
    rng = random.Random(seed + 1)
    times, now = [], 0.0
    for _ in range(num_prompts):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


async def _benchmark(base_url, num_prompts, request_rate, max_concurrency, input_len_range, output_len_range,
                     seed, model, request_timeout_s, warmup) -> ServingBenchmarkResult:
    import httpx
    requests = sample_requests(num_prompts, input_len_range, output_len_range, seed)
    delays = arrival_delays_s(num_prompts, request_rate, seed)
    connections = max_concurrency or num_prompts
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=base_url, timeout=request_timeout_s, limits=limits) as client:
        if model is None:
            model = await _served_model(client, base_url)
        if warmup:
            prompt, words, max_tokens = requests[0]
            warm = await _stream_completion(client, model, prompt, words, max_tokens)
            if not warm.ok:
                raise LlmpressError(f"the warm-up request to {base_url} failed ({warm.error}).")
        semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

        async def one(delay_s: float, prompt: str, words: int, max_tokens: int) -> RequestResult:
            await asyncio.sleep(delay_s)
            if semaphore is None:
                return await _stream_completion(client, model, prompt, words, max_tokens)
            async with semaphore:
                return await _stream_completion(client, model, prompt, words, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(d, *r) for d, r in zip(delays, requests)))
        duration_s = time.perf_counter() - start
    return _summarize(base_url, model, request_rate, max_concurrency, results, duration_s)


async def _served_model(client, base_url: str) -> str:
    import httpx
    try:
        response = await client.get("/v1/models")
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
        raise LlmpressError(f"could not list the models at {base_url}/v1/models ({type(error).__name__}: {error}); "
                            "is an OpenAI-compatible server running there?") from None


async def _stream_completion(client, model: str, prompt: str, words: int, max_tokens: int) -> RequestResult:
    result = RequestResult(prompt_words=words, max_tokens=max_tokens)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"]["message"]
                    return result
                if chunk.get("choices"):
                    if chunks == 0:
                        result.ttft_s = time.perf_counter() - start
                    chunks += 1
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.latency_s = time.perf_counter() - start
        result.ok = chunks > 0
        if not result.ok:
            result.error = "the stream ended without a token"
    except Exception as error:  # noqa: BLE001 (one failed request is a data point, not the end of the run)
        result.error = f"{type(error).__name__}: {error}"
    return result


def _summarize(base_url, model, request_rate, max_concurrency, results: list[RequestResult],
               duration_s: float) -> ServingBenchmarkResult:
    ok = [r for r in results if r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return ServingBenchmarkResult(
        base_url=base_url, model=model, num_prompts=len(results), request_rate=request_rate,
        max_concurrency=max_concurrency, completed=len(ok), failed=len(results) - len(ok), duration_s=duration_s,
        total_input_tokens=input_tokens, total_output_tokens=output_tokens,
        request_throughput=len(ok) / duration_s, output_tokens_per_s=output_tokens / duration_s,
        total_tokens_per_s=(input_tokens + output_tokens) / duration_s,
        ttft_ms=Percentiles.of_ms([r.ttft_s for r in ok]), tpot_ms=Percentiles.of_ms([r.tpot_s for r in ok]),
        latency_ms=Percentiles.of_ms([r.latency_s for r in ok]),
        errors=[r.error for r in results if not r.ok][:5])


def format_serving_table(result: ServingBenchmarkResult) -> str:
    """vLLM-style summary: totals, then mean / p50 / p90 / p99 of TTFT, TPOT and latency in ms."""
    rate = "inf" if math.isinf(result.request_rate) else f"{result.request_rate:g}"
    lines = [f"serving benchmark: {result.model} at {result.base_url}, request rate {rate}/s, "
             f"max concurrency {result.max_concurrency or 'none'}",
             f"  completed {result.completed}/{result.num_prompts} requests in {result.duration_s:.2f} s "
             f"({result.failed} failed)",
             f"  {result.request_throughput:.2f} requests/s, {result.output_tokens_per_s:.1f} output tokens/s, "
             f"{result.total_tokens_per_s:.1f} total tokens/s "
             f"({result.total_input_tokens} in, {result.total_output_tokens} out)"]
    header = ["metric (ms)", "mean", "p50", "p90", "p99"]
    rows = [[name, *(_ms(v) for v in (p.mean, p.p50, p.p90, p.p99))]
            for name, p in (("TTFT", result.ttft_ms), ("TPOT", result.tpot_ms), ("latency", result.latency_ms))]
    widths = [max(len(str(line[i])) for line in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        lines.append("  " + "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                      for i, (c, w) in enumerate(zip(line, widths))))
    for error in result.errors:
        lines.append(f"  error: {error}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"

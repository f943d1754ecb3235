"""The engine's host-side work per decode step (scheduling, input packing, bookkeeping), with the model
replaced by a stub that returns logits at once: what a GPU step pays on the CPU before and after its kernels.

256 sequences of 300-token prompts decoding together, prefix caching on, as in benchmarks/engine_gpu.py.
Prints the median wall time of a decode step and writes JSON.

    python benchmarks/engine_host_overhead.py --out benchmarks/results/engine_host_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from llmpress.atomic_write import write_json_atomic
from llmpress.bench.roofline import device_name
from llmpress.config import LlamaConfig
from llmpress.engine import EngineConfig, LLMEngine
from llmpress.generation.sampling import SamplingParams
from llmpress.loading.loader import LoadedModel, random_model
from llmpress.loading.resolve import ModelSource


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config = LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096)
    model = random_model(config, torch.device("cpu"), torch.float32)
    loaded = LoadedModel(model, None, config, "stub", ModelSource("random", "stub"))
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=args.num_seqs, num_gpu_blocks=args.num_seqs * 64,
                                            max_num_batched_tokens=8192, max_model_len=2048))
    logits = torch.zeros(args.num_seqs, 8)  # a tiny vocabulary: the stub's argmax costs nothing

    def stub_execute(scheduled, previous_tokens=None):
        engine.runner.prepare(scheduled)  # the input packing a real step does, minus the device copies
        return logits[:sum(c.completes_sequence for c in scheduled.chunks)]

    engine.runner.execute = stub_execute
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=args.steps + 10, ignore_eos=True)
    for i in range(args.num_seqs):
        engine.add_request(str(i), torch.randint(0, 1000, (args.prompt_len,), generator=g).tolist(), params)
    while any(not s.output_token_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill until every sequence decodes
    seconds = []
    for _ in range(args.steps):
        start = time.perf_counter()
        engine.step()
        seconds.append(time.perf_counter() - start)
    result = dict(script="benchmarks/engine_host_overhead.py", date=date.today().isoformat(), device=device_name("cpu"),
                  num_seqs=args.num_seqs, prompt_len=args.prompt_len, steps=args.steps,
                  median_step_ms=statistics.median(seconds) * 1e3, min_step_ms=min(seconds) * 1e3)
    print(f"{device_name('cpu')}: host work per decode step with {args.num_seqs} sequences: median "
          f"{result['median_step_ms']:.2f} ms, min {result['min_step_ms']:.2f} ms over {args.steps} steps")
    if args.out:
        write_json_atomic(Path(args.out), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

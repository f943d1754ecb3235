"""The serving engine on the embedded SmolLM2-135M-Instruct (fp32, CPU): a batch of real prompts through
the engine, with and without n-gram speculation, beside transformers' batched `generate` and our own
one-prompt-at-a-time generator, all in one process. Greedy; every output is checked against the
one-prompt-at-a-time output. Prints a table, writes JSON.

    python benchmarks/engine_cpu.py --out benchmarks/results/engine_cpu_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import date
from pathlib import Path

import torch

from llmpress.atomic_write import write_json_atomic
from llmpress.bench.roofline import device_name
from llmpress.engine import EngineConfig, LLMEngine
from llmpress.eval.data import load_eval_text
from llmpress.generation import Generator, SamplingParams
from llmpress.loading import load_model
from llmpress.tokenizer import encode_chat

CHAT_PROMPTS = [
    "Explain in a few paragraphs how a CPU cache works and why it makes programs faster.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "List five tips for staying focused while studying, with one sentence each.",
    "What is the difference between a list and a tuple in Python? Give examples.",
    "What is the capital of France?",
    "Summarize the plot of Romeo and Juliet in three sentences.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
]
TEXT_PROMPT_TOKENS = 160


def workload(tokenizer, num_text: int) -> list[list[int]]:
    text, _ = load_eval_text("default:heldout")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    stride = (ids.numel() - TEXT_PROMPT_TOKENS) // num_text
    text_prompts = [ids[i * stride:i * stride + TEXT_PROMPT_TOKENS].tolist() for i in range(num_text)]
    chat = [encode_chat(tokenizer, [{"role": "user", "content": p}])[0].tolist() for p in CHAT_PROMPTS]
    return chat + text_prompts


def run_engine(loaded, prompts, params, **config) -> dict:
    engine = LLMEngine(loaded, EngineConfig(max_num_batched_tokens=1024, **config))
    done = {}
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    engine.run_to_completion(lambda o: done.__setitem__(o.request_id, o.output_token_ids) if o.finished else None)
    seconds = time.perf_counter() - start
    outputs = [done[str(i)] for i in range(len(prompts))]
    s = engine.stats
    return dict(seconds=seconds, outputs=outputs, output_tokens=sum(map(len, outputs)), steps=s.steps,
                draft_tokens=s.draft_tokens, accepted_draft_tokens=s.accepted_draft_tokens)


def run_transformers(hf, prompts, params, pad_id: int) -> dict:
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad_id)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):], mask[row, longest - len(p):] = torch.tensor(p), 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=params.max_new_tokens, do_sample=False,
                          pad_token_id=pad_id)
    seconds = time.perf_counter() - start
    eos = set(hf.generation_config.eos_token_id if isinstance(hf.generation_config.eos_token_id, list)
              else [hf.generation_config.eos_token_id])
    outputs = []
    for row in out[:, longest:].tolist():
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        outputs.append(row if stop is None else row[:stop + 1])
    return dict(seconds=seconds, outputs=outputs, output_tokens=sum(map(len, outputs)),
                generated_tokens=out[:, longest:].numel())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-text", type=int, default=8, help="WikiText continuation prompts (beside 8 chat prompts)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--out", default="benchmarks/results/engine_cpu_smollm2.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    prompts = workload(loaded.tokenizer, args.num_text)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    rows = {}
    start = time.perf_counter()
    alone = []
    for p in prompts:
        gen = Generator(loaded.model, max_seq_len=len(p) + args.new_tokens, mode="eager")
        out = gen.generate(torch.tensor([p]), params, stop_token_ids=loaded.stop_token_ids)
        alone.append(out.token_ids[0, :out.num_generated[0]].tolist())
    rows["llmpress generator, one prompt at a time"] = dict(seconds=time.perf_counter() - start, outputs=alone,
                                                            output_tokens=sum(map(len, alone)))
    from transformers import AutoModelForCausalLM
    from llmpress.loading.embedded import embedded_gguf_path
    path = embedded_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    rows["transformers generate, one batch"] = run_transformers(hf, prompts, params, loaded.tokenizer.pad_token_id or 0)
    del hf
    rows["llmpress engine"] = run_engine(loaded, prompts, params)
    rows["llmpress engine + n-gram drafts (k=4)"] = run_engine(loaded, prompts, params, speculative="ngram",
                                                                num_speculative_tokens=4)
    for r in rows.values():
        r["output_tokens_per_s"] = r["output_tokens"] / r["seconds"]
    base = rows["transformers generate, one batch"]
    for r in rows.values():
        r["over_transformers"] = r["output_tokens_per_s"] / base["output_tokens_per_s"]
        r["prompts_equal_to_one_at_a_time"] = sum(a == b for a, b in zip(r["outputs"], alone))
    result = dict(script="benchmarks/engine_cpu.py", date=date.today().isoformat(), device=device_name("cpu"),
                  model=loaded.name, num_prompts=len(prompts), prompt_tokens=sum(map(len, prompts)),
                  new_tokens=args.new_tokens, rows=rows)
    write_json_atomic(Path(args.out), result)
    print(f"\n{result['model']} fp32 on {result['device']}: {len(prompts)} prompts (8 chat, {args.num_text} WikiText), "
          f"greedy, up to {args.new_tokens} new tokens")
    print(f"{'system':42s} {'seconds':>8s} {'out tok/s':>10s} {'x HF':>6s} {'same as alone':>14s} {'drafts kept':>12s}")
    for name, r in rows.items():
        kept = f"{r['accepted_draft_tokens']}/{r['draft_tokens']}" if r.get("draft_tokens") else "-"
        print(f"{name:42s} {r['seconds']:8.1f} {r['output_tokens_per_s']:10.1f} {r['over_transformers']:6.2f} "
              f"{r['prompts_equal_to_one_at_a_time']:>8d}/{len(prompts):<5d} {kept:>12s}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

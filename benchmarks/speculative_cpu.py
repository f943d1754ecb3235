"""Speculative decoding on CPU with the embedded SmolLM2-135M-Instruct (fp32) as target.

Drafters: n-gram prompt lookup, self-speculative (the target's first N layers + head), and the target's
own 4-bit RTN g128 copy; fixed k against adaptive k. Two tasks: chat prompts (chat template) and text
continuation of WikiText-2 passages (the held-out articles). Greedy decoding, stop tokens honoured,
every configuration run right after plain decoding of the same prompt in the same process; speedup =
plain wall time / speculative wall time over all prompts of a task (same tokens: greedy is lossless,
and the script checks it).

The int4 draft: on CPU QuantLinear runs the dequantize-then-matmul reference path, several times slower
than the fp32 model it approximates. Its acceptance is a property of the int4 weights, so the timed runs
use the same int4 weights dequantized once to fp32 (identical outputs to the QuantLinear model up to
rounding); the real int4 path's one-token step time is measured separately and reported.

    python benchmarks/speculative_cpu.py --out benchmarks/results/speculative_smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from llmpress.atomic_write import write_atomic, write_json_atomic
from llmpress.eval.data import load_eval_text
from llmpress.generation import Generator, SamplingParams
from llmpress.loading import load_model
from llmpress.speculative import (ModelDrafter, NGramDrafter, SelfSpeculativeDrafter, SpeculativeConfig,
                                  SpeculativeGenerator, SpeculativeStats)
from llmpress.tokenizer import encode_chat

CHAT_PROMPTS = [
    "Explain in a few paragraphs how a CPU cache works and why it makes programs faster.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "List five tips for staying focused while studying, with one sentence each.",
    "What is the difference between a list and a tuple in Python? Give examples.",
]
TEXT_OFFSETS = (2000, 60000, 120000)  # token offsets into the held-out WikiText-2 articles
TEXT_PROMPT_TOKENS = 192


def prompts(tokenizer) -> dict[str, list[torch.Tensor]]:
    text, _ = load_eval_text("default:heldout")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return {"chat": [encode_chat(tokenizer, [{"role": "user", "content": p}]) for p in CHAT_PROMPTS],
            "text": [ids[o:o + TEXT_PROMPT_TOKENS][None] for o in TEXT_OFFSETS]}


def int4_copy(loaded, fake: bool):
    """The target's RTN 4-bit g128 copy: QuantLinear layers (fake=False) or the same weights dequantized (fake=True)."""
    from llmpress.commands.quantize import quantize_loaded, quantized_copy
    from llmpress.quant.scheme import QuantScheme
    scheme = QuantScheme(bits=4, group_size=128)
    if not fake:
        return quantized_copy(loaded, "rtn", scheme).model
    variant = copy.copy(loaded)
    variant.model = copy.deepcopy(loaded.model)
    quantize_loaded(variant, "rtn", scheme)  # writes the quantize-dequantize weights in place
    return variant.model


def step_ms(model, context_len: int = 200, steps: int = 8) -> float:
    """Mean one-token decode step of `model` on CPU (eager), after a prefill of `context_len` tokens."""
    gen = Generator(model, context_len + steps + 2, mode="eager")
    prompt = torch.randint(0, model.config.vocab_size, (1, context_len), generator=torch.Generator().manual_seed(0))
    out = gen.generate(prompt, SamplingParams(max_new_tokens=steps + 1, ignore_eos=True))
    return 1e3 * out.decode_s / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per round (start value when adaptive)")
    parser.add_argument("--self-layers", default="24", help="N values for self:N drafting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one prompt per task, 16 tokens (a logic check)")
    parser.add_argument("--out", default="benchmarks/results/speculative_smollm2.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    new_tokens = 16 if args.quick else args.new_tokens
    started = time.perf_counter()

    loaded = load_model("smollm2-135m", dtype="float32", device="cpu")
    target, tokenizer = loaded.model, loaded.tokenizer
    tasks = prompts(tokenizer)
    if args.quick:
        tasks = {name: items[:1] for name, items in tasks.items()}
    max_len = max(p.shape[1] for items in tasks.values() for p in items) + new_tokens
    int4_fake = int4_copy(loaded, fake=True)
    drafters = [("ngram", NGramDrafter())]
    drafters += [(f"self:{n}", SelfSpeculativeDrafter(target, int(n))) for n in args.self_layers.split(",")]
    drafters += [("int4 RTN copy", ModelDrafter(int4_fake, name="int4:rtn"))]
    configs = []
    for name, drafter in drafters:
        for adaptive in (False, True):
            label = f"{name}, {'adaptive k from ' if adaptive else 'k='}{args.k}"
            gen = SpeculativeGenerator(target, drafter, max_len, SpeculativeConfig(args.k, adaptive=adaptive), mode="eager")
            configs.append((label, name, adaptive, gen))
    plain = Generator(target, max_len, mode="eager")
    params = SamplingParams(max_new_tokens=new_tokens)
    stops = loaded.stop_token_ids
    plain.generate(tasks["chat"][0], SamplingParams(max_new_tokens=4))  # first-touch allocations

    records = {task: {"plain_s": 0.0, "tokens": 0, "configs": {label: {"seconds": 0.0, "identical": 0,
                                                                        "stats": SpeculativeStats()}
                                                                for label, *_ in configs}}
               for task in tasks}
    total_runs = sum(len(items) for items in tasks.values()) * (1 + len(configs))
    done = 0
    for task, items in tasks.items():
        rec = records[task]
        for prompt in items:
            # Plain and every speculative configuration back to back, so CPU contention drifts equally.
            out = plain.generate(prompt, params, stops)
            reference = out.token_ids[0].tolist()
            rec["plain_s"] += out.prefill_s + out.decode_s
            rec["tokens"] += len(reference)
            done += 1
            for label, _, _, gen in configs:
                spec = gen.generate(prompt, params, stops)
                c = rec["configs"][label]
                c["seconds"] += spec.prefill_s + spec.decode_s
                c["identical"] += spec.token_ids[0].tolist() == reference
                c["stats"].merge(spec.stats)
                done += 1
            print(f"[{done}/{total_runs} runs, {time.perf_counter() - started:.0f} s] {task} prompt done", flush=True)

    rows = []
    for task, rec in records.items():
        n_prompts = len(tasks[task])
        rows.append({"task": task, "config": "plain decoding", "drafter": None, "adaptive": False,
                     "tokens_per_s": rec["tokens"] / rec["plain_s"], "speedup": 1.0, "identical_outputs": n_prompts,
                     "prompts": n_prompts, "tokens": rec["tokens"], "seconds": rec["plain_s"]})
        for label, name, adaptive, _ in configs:
            c = rec["configs"][label]
            rows.append({"task": task, "config": label, "drafter": name, "adaptive": adaptive,
                         "tokens_per_s": rec["tokens"] / c["seconds"], "speedup": rec["plain_s"] / c["seconds"],
                         "identical_outputs": c["identical"], "prompts": n_prompts, "tokens": rec["tokens"],
                         "seconds": c["seconds"], **c["stats"].to_dict()})
    target_ms = step_ms(target)
    int4_real = int4_copy(loaded, fake=False)
    int4_ms = step_ms(int4_real)
    result = {"target": "smollm2-135m (SmolLM2-135M-Instruct, float32)", "device": "cpu",
              "cpu_threads": args.threads, "cpu_count": os.cpu_count(), "new_tokens": new_tokens,
              "k": args.k, "decoding": "greedy, stop tokens honoured", "date": date.today().isoformat(),
              "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv),
              "note": "CPU shared with other jobs; speedup compares runs interleaved prompt by prompt. The int4 "
                      "draft's timed runs use its weights dequantized to fp32 (see int4_reference_path).",
              "int4_reference_path": {"target_fp32_step_ms": target_ms, "int4_quantlinear_step_ms": int4_ms},
              "rows": rows, "seconds": round(time.perf_counter() - started, 1)}
    print(format_table(result))
    out = Path(args.out)
    write_json_atomic(out, result)
    write_atomic(out.with_suffix(".png"), plot(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def format_table(result: dict) -> str:
    header = ["task", "config", "accept", "tok/round", "draft ms/rd", "verify ms/rd", "tok/s", "speedup", "same"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for r in result["rows"]:
        get = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)  # noqa: E731
        lines.append(" | ".join([r["task"], r["config"], get("acceptance_rate", ".0%"), get("tokens_per_round", ".2f"),
                                 get("draft_ms_per_round", ".0f"), get("verify_ms_per_round", ".0f"),
                                 f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
                                 f"{r['identical_outputs']}/{r['prompts']}"]))
    ref = result["int4_reference_path"]
    lines.append(f"one-token step: fp32 target {ref['target_fp32_step_ms']:.0f} ms, int4 QuantLinear copy (CPU reference "
                 f"path) {ref['int4_quantlinear_step_ms']:.0f} ms")
    return "\n".join(lines)


def plot(result: dict) -> bytes:
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(11, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    tasks = sorted({r["task"] for r in result["rows"]})
    configs = [r["config"] for r in result["rows"] if r["task"] == tasks[0] and r["drafter"]]
    for i, (key, title) in enumerate((("speedup", "Wall-clock speedup over plain decoding"),
                                      ("acceptance_rate", "Draft acceptance rate"))):
        ax = fig.add_subplot(1, 2, i + 1)
        width = 0.8 / len(tasks)
        for j, task in enumerate(tasks):
            values = [next(r[key] for r in result["rows"] if r["task"] == task and r["config"] == c) for c in configs]
            ax.barh([y + j * width for y in range(len(configs))], values, height=width, label=task)
        ax.set_yticks([y + width * (len(tasks) - 1) / 2 for y in range(len(configs))], configs, fontsize=7)
        if key == "speedup":
            ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct fp32 on CPU ({result['cpu_threads']} threads), greedy, "
                 f"{result['new_tokens']} new tokens max", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())

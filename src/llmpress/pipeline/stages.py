"""Pipeline stages. Each takes the shared context and records what it measured.

Stages that make a new model (fine-tuning, quantization; later issues) append a `Variant`;
measuring stages (eval, bench) measure every variant made so far, so the results table grows
one row per variant with no change here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llmpress.loading import LoadedModel

if TYPE_CHECKING:
    from llmpress.pipeline.runner import PipelineConfig

@dataclass
class Variant:
    """One model the pipeline measures: the base model, or one a stage produced from it."""
    method: str  # the results table's Method column, e.g. "Baseline (float32)"
    loaded: LoadedModel
    metrics: dict = field(default_factory=dict)


@dataclass
class PipelineContext:
    config: PipelineConfig
    out_dir: Path
    variants: list[Variant] = field(default_factory=list)
    analysis: dict | None = None
    framework: str = ""  # the Framework column: engine and decode mode


def stage_analyze(ctx: PipelineContext) -> None:
    """Step 1 of the workflow: parameters and bytes per module, and the decode roofline."""
    from llmpress.analyze import format_analysis
    from llmpress.commands.analyze import analyze_for_device, _to_dict
    base = ctx.variants[0].loaded
    analysis, roofline, counted = analyze_for_device(base, base.model.device, measure_bandwidth=True)
    print(format_analysis(analysis, roofline), flush=True)
    ctx.analysis = _to_dict(analysis, roofline, counted)


def stage_quantize(ctx: PipelineContext) -> None:
    """One variant per method: the base model with its decoder linears quantized (QuantLinear layers)."""
    from llmpress.commands.quantize import quantized_copy
    from llmpress.quant.scheme import QuantScheme
    cfg = ctx.config
    scheme = QuantScheme(bits=cfg.quant_bits, group_size=cfg.quant_group_size)
    base = ctx.variants[0].loaded
    for method in cfg.quant_methods:
        start = time.perf_counter()
        variant = quantized_copy(base, method, scheme, calib=cfg.calib, nsamples=cfg.calib_nsamples,
                                 seqlen=cfg.calib_seqlen, seed=0)
        seconds = time.perf_counter() - start
        label = f"{method.upper()} ({scheme.bits}-bit g{scheme.group_size})"
        print(f"{label}: quantized in {seconds:.1f} s", flush=True)
        ctx.variants.append(Variant(label, variant, {"quantize_seconds": seconds}))
    # A fine-tuned variant (finetune stage) is quantized too: the workflow's "fine-tune, then quantize" row.
    for tuned in [v for v in ctx.variants if "finetune" in v.metrics]:
        method = cfg.finetune_quant_method
        start = time.perf_counter()
        variant = quantized_copy(tuned.loaded, method, scheme, calib=cfg.calib, nsamples=cfg.calib_nsamples,
                                 seqlen=cfg.calib_seqlen, seed=0)
        seconds = time.perf_counter() - start
        label = f"LoRA + {method.upper()} ({scheme.bits}-bit g{scheme.group_size})"
        print(f"{label}: quantized in {seconds:.1f} s", flush=True)
        ctx.variants.append(Variant(label, variant, {"quantize_seconds": seconds}))


def stage_finetune(ctx: PipelineContext) -> None:
    """LoRA on the calibration articles (never on the perplexity text), merged into a plain model: the "LoRA" row."""
    from llmpress.finetune.lora import LoRAConfig
    from llmpress.finetune.run import finetune, merge_adapters
    from llmpress.finetune.trainer import TrainConfig
    cfg = ctx.config
    lora = LoRAConfig(r=cfg.finetune_r, alpha=cfg.finetune_alpha, dropout=0.05, targets=cfg.finetune_targets)
    train = TrainConfig(lr=cfg.finetune_lr, max_steps=cfg.finetune_steps, batch_size=cfg.finetune_batch_size,
                        seq_len=cfg.finetune_seq_len, eval_every=max(1, cfg.finetune_steps // 4), eval_windows=2)
    result = finetune(ctx.variants[0].loaded, lora, train, cfg.finetune_data)
    state = result.train.state
    print(f"LoRA: {state.step} steps in {result.train.seconds:.0f} s, validation perplexity "
          f"{state.evals[0]['val_ppl']:.3f} -> {state.best_val_ppl:.3f} (best, step {state.best_step})", flush=True)
    label = f"LoRA (r{lora.r}, {'/'.join(t.removesuffix('_proj') for t in lora.targets)})"
    ctx.variants.append(Variant(label, merge_adapters(result), {
        "finetune": {"steps": state.step, "seconds": result.train.seconds, "best_step": state.best_step,
                     "best_val_ppl": state.best_val_ppl, "evals": state.evals, "data": result.data_description}}))


def stage_eval(ctx: PipelineContext) -> None:
    """WikiText-2 perplexity of every variant (same text, same windows)."""
    from llmpress.eval.perplexity import PerplexityConfig, run_perplexity
    cfg = ctx.config
    ppl_config = PerplexityConfig(seq_len=cfg.ppl_seq_len, max_windows=cfg.ppl_max_windows)
    for variant in ctx.variants:
        result = run_perplexity(variant.loaded, cfg.data, ppl_config)
        print(f"{variant.method}: perplexity {result.ppl:.3f} over {result.num_tokens_scored} tokens "
              f"({result.num_windows} x {result.seq_len})", flush=True)
        variant.metrics["ppl"] = result.ppl
        variant.metrics["ppl_detail"] = vars(result)


def stage_bench(ctx: PipelineContext) -> None:
    """Decode throughput of every variant at the configured batch sizes."""
    from llmpress.commands.bench import format_bench, run_bench
    cfg = ctx.config
    for variant in ctx.variants:
        new_tokens = cfg.new_tokens or (256 if variant.loaded.model.device.type == "cuda" else 32)
        result = run_bench(variant.loaded, cfg.batch_sizes, new_tokens, mode=cfg.decode_mode, repeats=cfg.repeats)
        print(format_bench(result), flush=True)
        batch1 = next((r for r in result["rows"] if r["batch_size"] == 1), result["rows"][0])
        variant.metrics["throughput_tokens_per_s"] = batch1["decode_tokens_per_s"]
        variant.metrics["bench"] = result
        ctx.framework = f"llmpress ({result['mode']} decode, {result['device']})"


def stage_speculative(ctx: PipelineContext) -> None:
    """Batch-1 speculative decoding of the base model with the configured draft: one more table row.

    Speculative decoding is lossless (greedy output is plain greedy output; sampled output has the target's
    distribution), so the row's PPL is the base model's, not a new measurement. It runs after eval and bench,
    which would otherwise measure the row as if it were a plain model. Not a default stage: on CPU the drafts
    rarely pay for the wider verify pass (see the README's speculative decoding section).
    """
    from llmpress.bench.throughput import prompt_token_ids
    from llmpress.errors import LlmpressError
    from llmpress.speculative import SpeculativeConfig
    from llmpress.speculative.benchmark import benchmark_speculative, format_speculative
    from llmpress.speculative.factory import build_drafter
    cfg = ctx.config
    later = [s for s in cfg.stages[cfg.stages.index("speculative") + 1:] if s in ("eval", "bench")]
    if later:
        raise LlmpressError(f"the speculative stage must come after {', '.join(later)}; list it last in --stages.")
    base = ctx.variants[0]
    loaded = base.loaded
    new_tokens = cfg.new_tokens or (256 if loaded.model.device.type == "cuda" else 32)
    drafter = build_drafter(cfg.speculative_draft, loaded)
    spec_config = SpeculativeConfig(cfg.num_speculative_tokens)
    prompt = prompt_token_ids(loaded.tokenizer, None, loaded.config.vocab_size).to(loaded.model.device)
    result = benchmark_speculative(loaded.model, drafter, prompt, new_tokens, spec_config, mode=cfg.decode_mode,
                                   repeats=cfg.repeats)
    plain = base.metrics.get("throughput_tokens_per_s")
    print(format_speculative(result, plain), flush=True)
    label = f"Speculative ({drafter.name}, k={spec_config.num_speculative_tokens}; lossless: {base.method} PPL)"
    ctx.variants.append(Variant(label, loaded, {"throughput_tokens_per_s": result["decode_tokens_per_s"],
                                                "ppl": base.metrics.get("ppl"), "lossless": True,
                                                "speedup_over_plain": result["decode_tokens_per_s"] / plain if plain else None,
                                                "speculative": result}))


def stage_engine(ctx: PipelineContext) -> None:
    """Every variant so far behind the serving engine: N requests at once (offline throughput, as vLLM's
    benchmark_throughput). One more row per variant, with that variant's PPL: the engine computes the same
    function (its greedy outputs equal plain decoding, tests/engine), so perplexity is not measured again."""
    from llmpress.bench.engine_throughput import format_offline, random_workload, run_offline
    from llmpress.bench.roofline import device_name
    from llmpress.engine import EngineConfig, LLMEngine
    from llmpress.errors import LlmpressError
    cfg = ctx.config
    later = [s for s in cfg.stages[cfg.stages.index("engine") + 1:] if s in ("eval", "bench")]
    if later:
        raise LlmpressError(f"the engine stage must come after {', '.join(later)}; list it last in --stages.")
    for variant in list(ctx.variants):
        if variant.metrics.get("lossless"):  # a speculative row is the base model again
            continue
        loaded = variant.loaded
        on_cuda = loaded.model.device.type == "cuda"
        num_prompts = cfg.engine_num_prompts or (256 if on_cuda else 8)
        input_len, output_len = ((128, 1024), (128, 512)) if on_cuda else ((32, 128), (16, 32))
        workload = random_workload(num_prompts, input_len, output_len, loaded.config.vocab_size, seed=0)
        engine = LLMEngine(loaded, EngineConfig(max_num_seqs=num_prompts, max_model_len=input_len[1] + output_len[1],
                                                max_num_batched_tokens=8192 if on_cuda else 512))
        result = run_offline(engine, workload, progress=False)
        device = device_name(loaded.model.device)
        print(format_offline(result, variant.method, device), flush=True)
        framework = f"llmpress engine ({num_prompts} requests at once, {device})"
        ctx.variants.append(Variant(f"{variant.method}, engine", loaded,
                                    {"throughput_tokens_per_s": result.output_tokens_per_s, "ppl": variant.metrics.get("ppl"),
                                     "framework": framework, "engine": result.to_dict(), "lossless": True}))
        del engine


STAGES: dict[str, Callable[[PipelineContext], None]] = {
    "analyze": stage_analyze,
    "finetune": stage_finetune,
    "quantize": stage_quantize,
    "eval": stage_eval,
    "bench": stage_bench,
    "speculative": stage_speculative,  # opt-in: --stages analyze,quantize,eval,bench,speculative
    "engine": stage_engine,  # opt-in: --stages analyze,quantize,eval,bench,engine
}
# finetune is opt-in (--stages analyze,finetune,quantize,eval,bench): on 2 CPU cores its training, and the
# GPTQ, perplexity and decoding of its two extra rows, add several minutes to the default run.
DEFAULT_STAGES = ("analyze", "quantize", "eval", "bench")

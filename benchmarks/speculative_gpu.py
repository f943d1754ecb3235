"""Speculative decoding speedup as a function of acceptance, batch 1, one run beside plain decoding.

Random-weight Llama-3.2-3B target and Llama-3.2-1B draft (same 128256-token vocabulary, no download).
Random models do not agree with each other, so acceptance is set by an oracle drafter: it proposes the
target's own greedy continuation with each token replaced by a wrong one with probability 1 - alpha,
and it runs the 1B draft model on those tokens so that drafting costs what a real 1B draft costs.

  1. plain greedy decoding of the target (the reference continuation, and the baseline speed);
  2. lossless check: speculative greedy output with the real 1B draft (nearly every draft rejected) and
     with the alpha = 1 oracle, compared token by token with plain greedy output;
  3. for each alpha: an untimed pass; if bf16 rounding made the verify pass (k+1 tokens per forward) pick
     another argmax than the one-token plain step somewhere, the oracle's reference becomes that pass's
     output and the pass repeats (at most --max-passes), so the oracle's right answers are right for this
     path; then timed runs (median); tokens/s, speedup over plain, measured acceptance;
  4. int4: the target's and the draft's RTN g128 copies; oracle (alpha 0.8) + int4 draft vs int4 plain.
Prints a table and writes JSON (+ PNG).

    python benchmarks/speculative_gpu.py --out benchmarks/results/speculative_h100.json
    python benchmarks/speculative_gpu.py --arch tiny --device cpu --new-tokens 16 --out /tmp/spec_tiny.json
    python benchmarks/speculative_gpu.py --mode compile --int4-only   # plain bf16, then step 4 only
    python benchmarks/speculative_gpu.py --mode compile --int4-only --int4-head draft   # the draft's head in int4 too
    python benchmarks/speculative_gpu.py ... --rounds both   # each int4 row with device rounds and host-driven rounds
    python benchmarks/speculative_gpu.py --summarize benchmarks/results/speculative_h200_s15.json   # a result's table
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

from llmpress.atomic_write import write_atomic, write_json_atomic
from llmpress.config import KNOWN_ARCHITECTURES, LlamaConfig
from llmpress.generation import Generator, SamplingParams
from llmpress.kernels import ops
from llmpress.loading.loader import LoadedModel, random_model
from llmpress.loading.resolve import ModelSource
from llmpress.speculative import ModelDrafter, OracleDrafter, SpeculativeConfig, SpeculativeGenerator, SpeculativeStats
from llmpress.speculative.device_rounds import greedy_keep


def architectures(arch: str) -> tuple[LlamaConfig, LlamaConfig]:
    if arch == "tiny":  # a CPU logic check: same code path, toy sizes
        common = dict(vocab_size=512, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
        return (LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, **common),
                LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, **common))
    target, draft = arch.split(",") if "," in arch else ("llama-3.2-3b", "llama-3.2-1b")
    return KNOWN_ARCHITECTURES[target], KNOWN_ARCHITECTURES[draft]


def int4_copy(model, name: str, head: bool = False):
    """RTN int4 g128 copy of `model`'s decoder linears (and of its lm_head, untied, with `head`)."""
    from llmpress.commands.quantize import quantized_copy
    from llmpress.quant.scheme import QuantScheme
    loaded = LoadedModel(model, None, model.config, name, ModelSource("random", architecture=name))
    scheme = QuantScheme(bits=4, group_size=128)
    return quantized_copy(loaded, "rtn", scheme, lm_head=scheme if head else None).model


def time_plain(model, prompt, new_tokens: int, mode: str, repeats: int) -> tuple[list[int], float]:
    """Greedy continuation of new_tokens and the median decode tokens/s (tokens after the first)."""
    gen = Generator(model, prompt.shape[1] + new_tokens, mode=mode)
    gen.warmup()
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    runs = [gen.generate(prompt, params) for _ in range(repeats + 1)][1:]
    decode_s = statistics.median(r.decode_s for r in runs)
    del gen
    return runs[0].token_ids[0].tolist(), (new_tokens - 1) / decode_s


class ImposedAcceptanceGenerator(SpeculativeGenerator):
    """Speculative decoding whose rounds keep the oracle's right proposals (the prefix equal to its reference) and
    add the reference's next token, whatever the target's argmax says; the verify forward, its argmax and the
    host's read of it run as in any round, so a round costs what it costs. For verify steps that are not
    bit-reproducible (the accumulating products add by atomics in whatever order they land): on random weights
    the logits of replays of one step lie 2% of the largest apart (results/verify_probe_h200_s13f.*) while the
    top two are often tied in bf16, so the target's greedy path changes from run to run and an oracle that follows
    one run's path falls off it at the first change (acceptance 0.00-0.03 measured). Real acceptance needs the
    plain verify; this measures the speed at the oracle's acceptance."""

    def _accept(self, target_logits, context, draft, params, generator):
        super()._accept(target_logits, context, draft, params, generator)  # the round's own work, result unused
        oracle = self.drafter
        done = len(context) - oracle.prompt_len
        truth = oracle.reference[done:done + draft.tokens.shape[0] + 1]
        kept = common_prefix(draft.tokens.tolist(), truth)
        return kept, truth[:kept + 1]

    def _keep_on_device(self, drafts, target_tokens, length):
        # The same rule on the device rounds' tensors: greedy acceptance against the reference instead of the
        # target's argmax (target_tokens, computed all the same).
        return greedy_keep(drafts, self.drafter.reference_on_device(length, drafts.shape[0] + 1), length)


def run_speculative(target, drafter, prompt, new_tokens, k, mode, repeats=0, imposed=False, device_rounds=None):
    """One SpeculativeGenerator (ImposedAcceptanceGenerator with `imposed`): the first run's tokens, plus the
    median decode tok/s and merged stats of `repeats` further timed runs (none: only the tokens).
    device_rounds: SpeculativeConfig's (None: the generator's default, on in the graph modes)."""
    cls = ImposedAcceptanceGenerator if imposed else SpeculativeGenerator
    config = SpeculativeConfig(k, device_rounds=device_rounds)
    gen = cls(target, drafter, prompt.shape[1] + new_tokens, config, mode=mode)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    first = gen.generate(prompt, params)
    runs = [gen.generate(prompt, params) for _ in range(repeats)]
    stats = SpeculativeStats()
    for r in runs or [first]:
        stats.merge(r.stats)
    rate = (new_tokens - 1) / statistics.median(r.decode_s for r in runs) if runs else None
    return first.token_ids[0].tolist(), rate, stats


def catch_up_check(model, prompt, mode: str) -> dict:
    """A drafter's catch-up step (the two tokens a fully accepted round leaves, in one step: ModelDrafter.run)
    against the same two tokens in two one-token steps, over two caches: the last logits' relative difference and
    whether their argmax agree (the oracle's forced tokens would hide a wrong draft). `mode` eager or graph: the
    decode layouts it sets up (fused or not) are those that later steps of another mode then find."""
    from llmpress.speculative.steps import CachedModel
    pair = prompt[:, -2:]
    runs = []
    with torch.inference_mode():
        for chunks in ([pair], [pair[:, :1], pair[:, 1:]]):
            runner = CachedModel(model, prompt.shape[1] + 4, mode)
            runner.prefill(prompt[:, :-2])
            for j, chunk in enumerate(chunks):
                logits = runner.step(chunk, prompt.shape[1] - 2 + j)[0, -1].float()
            runs.append(logits)
    one, two = runs
    return {"rel_diff": ((one - two).norm() / two.norm()).item(), "same_argmax": bool(one.argmax() == two.argmax())}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def oracle_row(label, target, draft_model, reference, alpha, prompt, args, plain_rate, vocab,
               imposed: bool = False, k: int | None = None) -> dict:
    """Untimed passes until the oracle's reference is this path's own greedy output, then timed runs. `imposed`:
    no passes; the rounds keep what the oracle got right (ImposedAcceptanceGenerator). k: args.k unless given."""
    k = k or args.k
    if imposed:
        oracle = OracleDrafter(reference, alpha, vocab, seed=args.seed, draft=ModelDrafter(draft_model))
        _, rate, stats = run_speculative(target, oracle, prompt, args.new_tokens, k, args.mode, args.repeats,
                                         imposed=True, device_rounds=args.device_rounds)
        return {"config": label, "alpha": alpha, "k": k, "tokens_per_s": rate, "speedup": rate / plain_rate,
                "acceptance_imposed": True, **stats.to_dict()}
    for passes in range(1, args.max_passes + 1):
        oracle = OracleDrafter(reference, alpha, vocab, seed=args.seed, draft=ModelDrafter(draft_model))
        tokens, _, _ = run_speculative(target, oracle, prompt, args.new_tokens, k, args.mode,
                                       device_rounds=args.device_rounds)
        consistent = tokens == reference[:args.new_tokens]
        if consistent:
            break
        reference = tokens + reference[len(tokens):]  # past the end: the oracle only needs k spare tokens
    oracle = OracleDrafter(reference, alpha, vocab, seed=args.seed, draft=ModelDrafter(draft_model))
    _, rate, stats = run_speculative(target, oracle, prompt, args.new_tokens, k, args.mode, args.repeats,
                                     device_rounds=args.device_rounds)
    return {"config": label, "alpha": alpha, "k": k, "tokens_per_s": rate, "speedup": rate / plain_rate,
            "oracle_passes": passes, "oracle_consistent": consistent, **stats.to_dict()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama-3.2-3b,llama-3.2-1b", help="TARGET,DRAFT architectures or 'tiny'")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mode", default=None, help="decode mode (default: graph on CUDA, eager on CPU)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--alphas", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--int4-alpha", type=float, default=0.8)
    parser.add_argument("--int4-ks", default=None,
                        help="int4 rows: a row for each of these draft lengths (comma list; default --k)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-passes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-int4", action="store_true")
    parser.add_argument("--int4-only", action="store_true",
                        help="plain bf16 for reference, then only the int4 rows (skips the bf16 draft and alpha sweep)")
    parser.add_argument("--int4-head", choices=("none", "draft", "both"), default="none",
                        help="int4 rows: also quantize the lm_head of the draft (or of both models) to int4 g128")
    parser.add_argument("--int4-tensor-cores", action="store_true",
                        help="int4 rows: run the products of 1..8 rows on the tensor-core GEMV (kernels/triton_int4_frag.py, "
                             "ops.int4_tensor_core_gemv), the verify step's included")
    parser.add_argument("--int4-swiglu", action="store_true",
                        help="with --int4-tensor-cores: silu(gate) * up in the gate|up GEMV's last step "
                             "(ops.int4_tensor_core_swiglu)")
    parser.add_argument("--int4-fold-rows", action="store_true",
                        help="with --int4-tensor-cores: the verify step's RMSNorm and residual add folded into the "
                             "tensor-core GEMV too (ops.int4_tensor_core_fold_rows; measured slower)")
    parser.add_argument("--int4-verify", choices=("default", "plain", "accumulating", "both"), default="default",
                        help="with --int4-tensor-cores: the int4 verify step on the layers as written (plain), on the "
                             "accumulating decode (ops.int4_accumulate_rows, model/decode_accumulate.py), ops' default, "
                             "or both, a row each")
    parser.add_argument("--imposed-check", action="store_true",
                        help="the plain int4 verify's row a second time with the oracle's acceptance imposed, as the "
                             "accumulating verify's row always is (ImposedAcceptanceGenerator)")
    parser.add_argument("--int4-accumulate-rows", dest="int4_verify", action="store_const", const="both",
                        help="the same as --int4-verify both (earlier sessions' commands)")
    parser.add_argument("--triton-verify-attention", action="store_true",
                        help="the verify step's attention through the Triton decode kernel (ops.triton_verify_attention)"
                             " instead of SDPA with a mask, for every row of the run")
    parser.add_argument("--pdl-rows", type=int, default=None,
                        help="with --int4-tensor-cores: launch the tensor-core GEMV under PDL up to this many rows "
                             "(triton_int4_frag.PDL_MAX_ROWS; default its value: 1, so verify steps run without)")
    parser.add_argument("--accumulate-configs", default=None, metavar="JSON",
                        help="int4 rows: these accumulating-product tiles beside triton_int4_accumulate.CONFIGS "
                             "(latency_floor_gpu.py --sweep-configs writes them, for the 1B say)")
    parser.add_argument("--rounds", choices=("device", "host", "both"), default="device",
                        help="speculative rows with greedy rounds on the device (device_rounds.py), driven by the host "
                             "(a sync a round, as before session 15), or both (int4 rows: one each; others: device)")
    parser.add_argument("--out", default="benchmarks/results/speculative_h100.json")
    parser.add_argument("--summarize", metavar="JSON", default=None,
                        help="print the table of a result file this script wrote, and exit (no model is built)")
    args = parser.parse_args()
    if args.summarize:
        import json
        print(format_table(json.loads(Path(args.summarize).read_text())))
        return 0
    round_kinds = {"device": [True], "host": [False], "both": [True, False]}[args.rounds]
    args.device_rounds = round_kinds[0]
    int4_ks = [int(k) for k in args.int4_ks.split(",")] if args.int4_ks else [args.k]
    ops.triton_verify_attention = args.triton_verify_attention
    device = torch.device(args.device)
    args.mode = args.mode or ("graph" if device.type == "cuda" else "eager")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    target_cfg, draft_cfg = architectures(args.arch)
    assert target_cfg.vocab_size == draft_cfg.vocab_size
    vocab = target_cfg.vocab_size
    target = random_model(target_cfg, device, dtype, seed=0)
    draft = random_model(draft_cfg, device, dtype, seed=1)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed)).to(device)
    spare = max([args.k, *int4_ks]) + 1  # the oracle proposes up to k tokens past the last one generated

    def log(msg):
        print(f"[{time.perf_counter() - started:.0f} s] {msg}", flush=True)

    reference, plain_rate = time_plain(target, prompt, args.new_tokens + spare, args.mode, args.repeats)
    log(f"plain: {plain_rate:.1f} tok/s")
    rows = [{"config": "plain bf16" if dtype == torch.bfloat16 else "plain", "tokens_per_s": plain_rate, "speedup": 1.0}]
    checks = {}
    if args.int4_only:
        args.alphas = ""
    else:
        tokens, rate, stats = run_speculative(target, ModelDrafter(draft), prompt, args.new_tokens, args.k, args.mode,
                                              args.repeats, device_rounds=args.device_rounds)
        checks["real_draft_matching_tokens"] = common_prefix(tokens, reference)
        rows.append({"config": "random 1B draft (real)", "k": args.k, "tokens_per_s": rate, "speedup": rate / plain_rate,
                     **stats.to_dict()})
        tokens, _, _ = run_speculative(target, OracleDrafter(reference, 1.0, vocab), prompt, args.new_tokens, args.k,
                                       args.mode, device_rounds=args.device_rounds)
        checks["oracle_alpha1_matching_tokens"] = common_prefix(tokens, reference)
        checks["new_tokens"] = args.new_tokens
        checks["lossless"] = checks["real_draft_matching_tokens"] == checks["oracle_alpha1_matching_tokens"] == args.new_tokens
        log(f"lossless check: {checks}")
    for alpha in [float(a) for a in args.alphas.split(",") if a]:
        rows.append(oracle_row(f"oracle alpha={alpha:g} + 1B draft", target, draft, reference, alpha, prompt, args,
                               plain_rate, vocab))
        log(f"{rows[-1]['config']}: {rows[-1]['tokens_per_s']:.1f} tok/s, acceptance {rows[-1]['acceptance_rate']:.2f}")
    if not args.skip_int4:
        target4 = int4_copy(target, "target", head=args.int4_head == "both")
        draft4 = int4_copy(draft, "draft", head=args.int4_head != "none")
        del target, draft
        ops.int4_tensor_core_gemv = args.int4_tensor_cores  # the int4 models' steps build their fragments
        ops.int4_tensor_core_fold_rows = args.int4_tensor_cores and args.int4_fold_rows
        ops.int4_tensor_core_swiglu = args.int4_tensor_cores and args.int4_swiglu
        ops.int4_tensor_core_max_rows = ops.FRAG_MAX_M if args.int4_tensor_cores else 1  # the verify step's k + 1 rows too
        if args.accumulate_configs:
            import llmpress.kernels.triton_int4_accumulate as accumulate
            from latency_floor_gpu import read_sweep_configs  # benchmarks/
            accumulate.CONFIGS.update(read_sweep_configs(args.accumulate_configs))
            log(f"accumulating tiles: {accumulate.CONFIGS}")
        if args.pdl_rows is not None:
            import llmpress.kernels.triton_int4_frag as frag
            frag.PDL_MAX_ROWS = args.pdl_rows
        checks["int4_draft_catch_up"] = catch_up_check(draft4, prompt, "eager" if args.mode == "eager" else "graph")
        log(f"int4 draft's 2-token catch-up step against two 1-token steps: {checks['int4_draft_catch_up']}")
        reference4, plain4 = time_plain(target4, prompt, args.new_tokens + spare, args.mode, args.repeats)
        rows.append({"config": "plain int4 target", "tokens_per_s": plain4, "speedup": plain4 / plain_rate})
        def int4_row(suffix: str = "", imposed: bool = False, k: int = args.k) -> dict:
            row = oracle_row(f"int4: oracle alpha={args.int4_alpha:g} + int4 1B draft, k={k}{suffix}", target4,
                             draft4, reference4, args.int4_alpha, prompt, args, plain4, vocab, imposed, k)
            row["speedup_over_plain_bf16"] = row["tokens_per_s"] / plain_rate
            rows.append(row)
            return row
        default_rows = ops.int4_accumulate_rows
        if args.rounds == "both":  # device rounds against host rounds on a real (greedy) draft, plain verify
            ops.int4_accumulate_rows = False
            torch._dynamo.reset()
            n = min(64, args.new_tokens)
            runs = {rounds: run_speculative(target4, ModelDrafter(draft4), prompt, n, int4_ks[0], args.mode,
                                            device_rounds=rounds)[0] for rounds in (True, False)}
            checks["int4_real_draft_device_vs_host_rounds"] = {
                "new_tokens": n, "device_vs_host": common_prefix(runs[True], runs[False]),
                "device_vs_plain": common_prefix(runs[True], reference4), "host_vs_plain": common_prefix(runs[False], reference4)}
            log(f"int4 real draft, matching tokens: {checks['int4_real_draft_device_vs_host_rounds']}")
        verifies = {"default": [default_rows], "plain": [False], "accumulating": [True], "both": [False, True]}
        # without tensor-core fragments the accumulating decode does not apply: the layers as written
        for accumulating in verifies[args.int4_verify] if args.int4_tensor_cores else [False]:
            ops.int4_accumulate_rows = accumulating
            torch._dynamo.reset()
            # the accumulating verify is not bit-reproducible: acceptance imposed (and, with --imposed-check, the
            # plain verify's too, beside its real one, to compare the two methods where both apply)
            for imposed in ([False, True] if args.imposed_check and not accumulating else [accumulating]):
                suffix = (", accumulating verify" if accumulating else "") + (", acceptance imposed" if imposed else "")
                for k in int4_ks:
                    for device_rounds in round_kinds:
                        args.device_rounds = device_rounds  # oracle_row reads it
                        where = ", device rounds" if args.device_rounds else ", host rounds"
                        row = int4_row(suffix + where, imposed, k)
                        log(f"int4: plain {plain4:.1f} tok/s, speculative k={k}{suffix}{where} "
                            f"{row['tokens_per_s']:.1f} tok/s, acceptance {row['acceptance_rate']:.2f}")
        ops.int4_accumulate_rows = default_rows
    from llmpress.bench.roofline import device_name
    result = {"target": args.arch.split(",")[0], "draft": args.arch.split(",")[-1], "device": device_name(device),
              "int4_ks": int4_ks,
              "dtype": str(dtype).removeprefix("torch."), "mode": args.mode, "batch_size": 1,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "k": args.k, "int4_head": args.int4_head,
              "int4_tensor_cores": args.int4_tensor_cores, "int4_fragments_only": ops.int4_fragments_only,
              "int4_fold_rows": ops.int4_tensor_core_fold_rows, "int4_swiglu": ops.int4_tensor_core_swiglu,
              "int4_pdl_rows": args.pdl_rows, "triton_verify_attention": args.triton_verify_attention,
              "int4_verify": args.int4_verify, "rounds": args.rounds, "accumulate_configs": args.accumulate_configs, "checks": checks,
              "rows": rows, "seconds": round(time.perf_counter() - started, 1), "date": date.today().isoformat(),
              "torch": torch.__version__, "python": platform.python_version(), "command": " ".join(sys.argv)}
    print(format_table(result))
    out = Path(args.out)
    write_json_atomic(out, result)
    write_atomic(out.with_suffix(".png"), plot(result))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


def expected_tokens_per_round(alpha: float, k: int) -> float:
    """Tokens a round yields on average when each draft is right with probability alpha, independently:
    1 + alpha + ... + alpha^k (the accepted prefix, then the target's own token)."""
    return sum(alpha ** i for i in range(k + 1))


def at_expected_acceptance(row: dict) -> float | None:
    """The row's tok/s had its rounds yielded the expected tokens at its alpha, at the round cost measured: the
    oracle's draws over a short generation land above or below the expectation (same seed, same draws every row)."""
    if "alpha" not in row or not row.get("tokens_per_round"):
        return None
    return row["tokens_per_s"] * expected_tokens_per_round(row["alpha"], row["k"]) / row["tokens_per_round"]


def format_table(result: dict) -> str:
    header = ["config", "accept", "tok/step", "draft ms/step", "verify ms/step", "tok/s", "speedup",
              "tok/s at E[tok/step]"]
    lines = [f"{result['target']} target, {result['draft']} draft, {result['dtype']}, {result['mode']} mode, "
             f"batch 1, {result['new_tokens']} new tokens, k={result['k']} on {result['device']}",
             f"checks: {result['checks']}", " | ".join(header)]
    for r in result["rows"]:
        get = lambda key, spec: "-" if r.get(key) is None else format(r[key], spec)  # noqa: E731
        lines.append(" | ".join([r["config"], get("acceptance_rate", ".2f"), get("tokens_per_round", ".2f"),
                                 get("draft_ms_per_round", ".2f"), get("verify_ms_per_round", ".2f"),
                                 f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
                                 "-" if at_expected_acceptance(r) is None else f"{at_expected_acceptance(r):.1f}"]))
    return "\n".join(lines)


def plot(result: dict) -> bytes:
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    oracle = [r for r in result["rows"] if "alpha" in r and not r["config"].startswith("int4")]
    ax.plot([r["acceptance_rate"] for r in oracle], [r["speedup"] for r in oracle], "o-", label="bf16 target + 1B draft")
    for r in oracle:
        ax.annotate(f"α={r['alpha']:g}", (r["acceptance_rate"], r["speedup"]), fontsize=7)
    int4 = [r for r in result["rows"] if r["config"].startswith("int4")]
    if int4:
        ax.plot([r["acceptance_rate"] for r in int4], [r["speedup"] for r in int4], "s", label="int4 target + int4 draft (vs int4 plain)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("measured acceptance rate")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(f"{result['target']} + {result['draft']} draft, k={result['k']}, {result['device']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


if __name__ == "__main__":
    raise SystemExit(main())

"""`llmpress quantize`: 2-8-bit weight-only post-training quantization (RTN, GPTQ, AWQ) into a model directory."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from llmpress.commands.common import add_model_args
from llmpress.errors import LlmpressError

PACKABLE_BITS = {"gptq": (2, 4, 8), "awq": (4,)}


def register(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="quantize a model's linear layers (RTN, GPTQ, AWQ)",
                                   description=__doc__)
    add_model_args(parser)
    parser.set_defaults(dtype="float32")  # the algorithms' arithmetic; the checkpoint is written in fp16
    parser.add_argument("--method", choices=("rtn", "gptq", "awq"), default="gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128, help="-1 for one group per output channel")
    sym = parser.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", help="symmetric (zero point fixed at 2^(bits-1))")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric, with zero points (default)")
    parser.set_defaults(sym=False)
    parser.add_argument("--act-order", action="store_true", help="GPTQ desc_act: columns by decreasing Hessian diagonal")
    parser.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=None,
                        help="also quantize lm_head (RTN, --group-size, untied from the embeddings); default: float")
    parser.add_argument("--calib", default="default", help="calibration text: default | wikitext2 | c4 | PATH")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", dest="fmt", choices=("auto", "gptq", "awq", "fake"), default="auto",
                        help="auto: awq for --method awq, gptq otherwise; fake: dequantized fp16 weights "
                             "(any bit width, for quality evaluation)")
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llmpress.quant.scheme import QuantScheme
    scheme = QuantScheme(bits=args.bits, group_size=args.group_size, sym=args.sym, act_order=args.act_order)
    fmt = args.fmt if args.fmt != "auto" else ("awq" if args.method == "awq" else "gptq")
    if fmt != "fake" and args.bits not in PACKABLE_BITS[fmt]:
        raise LlmpressError(f"{args.bits}-bit weights cannot be packed in the {fmt} format (it holds "
                            f"{', '.join(map(str, PACKABLE_BITS[fmt]))}-bit); pass --format fake to write dequantized weights.")
    if args.act_order and args.method != "gptq":
        raise LlmpressError("--act-order is a GPTQ option; drop it or use --method gptq.")
    lm_head = lm_head_scheme(args.lm_head_bits, scheme, fmt)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LlmpressError(f"{out} already exists and is not empty; choose a new --out (llmpress never overwrites files).")

    from llmpress.commands.common import load_from_args
    loaded = load_from_args(args)
    started = time.perf_counter()
    quantized = quantize_loaded(loaded, args.method, scheme, args.calib, args.nsamples, args.seqlen, args.seed,
                                lm_head=lm_head)
    seconds = time.perf_counter() - started
    save_quantized_model(loaded, quantized, scheme, fmt, out, method=args.method)
    size_mb = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
    print(f"{args.method.upper()} {scheme.bits}-bit g{scheme.group_size} {'sym' if scheme.sym else 'asym'}"
          f"{' act-order' if scheme.act_order else ''}{f' + lm_head RTN {lm_head.bits}-bit' if lm_head else ''}: "
          f"{len(quantized)} linears in {seconds:.1f} s; "
          f"wrote {out} ({fmt}, {size_mb:.1f} MB)")
    return 0


def lm_head_scheme(bits: int | None, scheme, fmt: str):
    """The head's QuantScheme for --lm-head-bits (None: float head), refused where `fmt` cannot store it."""
    if bits is None:
        return None
    if fmt == "awq":
        raise LlmpressError("AWQ checkpoints keep lm_head unquantized; use --format gptq (or --format fake) "
                            "with --lm-head-bits.")
    if fmt == "gptq" and bits != scheme.bits:
        # quantization_config holds one `bits` for every packed layer, the head included.
        raise LlmpressError(f"a GPTQ checkpoint holds one bit width for the layers and the head, so --lm-head-bits {bits} needs "
                            f"--bits {bits}; use --lm-head-bits {scheme.bits} or --format fake.")
    from llmpress.quant.scheme import QuantScheme
    # Same group size and symmetry as the layers: the checkpoint's quantization_config describes both.
    return QuantScheme(bits=bits, group_size=scheme.group_size, sym=scheme.sym)


def quantize_loaded(loaded, method: str, scheme, calib: str = "default", nsamples: int = 128, seqlen: int = 2048,
                    seed: int = 0, lm_head=None) -> dict:
    """Quantize `loaded.model` in place (fake-quantized weights) and return the QuantizedWeight per linear.
    `lm_head`: a QuantScheme to RTN-quantize the head too (see quantize_model)."""
    from llmpress.quant.calibration import CalibrationConfig, load_calibration_tokens, quantize_model
    tokens = None
    if method != "rtn":
        if loaded.tokenizer is None:
            raise LlmpressError(f"{method} needs calibration text, but this model has no tokenizer; use --method rtn.")
        tokens = load_calibration_tokens(loaded.tokenizer, CalibrationConfig(calib, nsamples, seqlen, seed))
    return quantize_model(loaded.model, method, scheme, tokens, lm_head=lm_head)


def save_quantized_model(loaded, quantized: dict, scheme, fmt: str, out: Path, method: str) -> Path:
    """Packed (gptq/awq) or dequantized fp16 (fake) model directory with the tokenizer and generation config."""
    if fmt == "fake":
        from llmpress.loading.save import save_hf_checkpoint
        note = {"llmpress_fake_quantization": dict(scheme.to_dict(), method=method)}
        if "lm_head" in quantized:  # always RTN (quantize_lm_head)
            note["llmpress_fake_quantization"]["lm_head"] = dict(quantized["lm_head"].scheme.to_dict(), method="rtn")
        return save_hf_checkpoint(loaded.model, loaded.tokenizer, out, torch.float16, loaded.generation_defaults, note)
    from llmpress.quant.checkpoint import save_quantized
    return save_quantized(loaded.model, quantized, loaded.tokenizer, out, scheme, fmt=fmt,
                          generation_config=loaded.generation_defaults or None, quant_config_extra={"method": method})


def quantized_copy(loaded, method: str, scheme, **calibration) -> "object":
    """A LoadedModel whose decoder linears are QuantLinear layers (the base model is left untouched)."""
    from llmpress.quant.linear import replace_linears
    variant = copy.copy(loaded)
    variant.model = copy.deepcopy(loaded.model)
    quantized = quantize_loaded(variant, method, scheme, **calibration)
    replace_linears(variant.model, quantized)
    return variant

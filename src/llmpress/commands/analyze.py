"""`llmpress analyze`: parameter/byte breakdown and the batch-1 decode bandwidth roofline."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmpress.atomic_write import write_json_atomic
from llmpress.analyze import ModelAnalysis, analyze_model, count_parameters, format_analysis
from llmpress.bench.roofline import DecodeRoofline, decode_roofline, device_name, measure_copy_bandwidth
from llmpress.commands.common import add_model_args, load_from_args
from llmpress.config import KNOWN_ARCHITECTURES, LlamaConfig
from llmpress.loading import LoadedModel, resolve_device, resolve_dtype
from llmpress.loading.resolve import RANDOM_PREFIX, resolve_model_spec
from llmpress.model import LlamaForCausalLM


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="parameter/byte breakdown and the decode bandwidth roofline",
                                   description=__doc__)
    add_model_args(parser)
    parser.add_argument("--no-bandwidth", action="store_true",
                        help="skip the bandwidth measurement (bytes per token are still shown)")
    parser.add_argument("--context-len", type=int, default=0,
                        help="cached tokens whose K/V each decode step reads (default: 0, weights only)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.model.startswith(RANDOM_PREFIX):
        # Random weights carry no information beyond the architecture: analyse the config and skip
        # allocating (and filling) gigabytes of weights.
        target = KNOWN_ARCHITECTURES[resolve_model_spec(args.model).architecture]
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    else:
        target = load_from_args(args)
        device, dtype = target.model.device, target.model.dtype
    analysis, roofline, counted = analyze_for_device(target, device, not args.no_bandwidth, dtype=dtype,
                                                     context_len=args.context_len, name=args.model)
    print(format_analysis(analysis, roofline))
    if args.json:
        write_json_atomic(Path(args.json), _to_dict(analysis, roofline, counted))
        print(f"\nwrote {args.json}")
    return 0


def analyze_for_device(target: LoadedModel | LlamaForCausalLM | LlamaConfig, device: str | torch.device = "auto",
                       measure_bandwidth: bool = True, dtype: torch.dtype | str | None = None,
                       context_len: int = 0, name: str | None = None,
                       ) -> tuple[ModelAnalysis, DecodeRoofline, int | None]:
    """Analysis, roofline and (for a real model) its counted parameters; dtype defaults to the model's."""
    model = target.model if isinstance(target, LoadedModel) else None
    if isinstance(target, LlamaForCausalLM):
        model = target
    config = target if isinstance(target, LlamaConfig) else target.config
    if name is None:
        name = target.name if isinstance(target, LoadedModel) else ""
    device = resolve_device(device)
    if dtype is None:
        dtype = model.dtype if model is not None else "auto"
    dtype = resolve_dtype(dtype, device)
    bytes_per_param = float(torch.empty((), dtype=dtype).element_size())
    analysis = analyze_model(config, bytes_per_param, name=name)
    bandwidth = measure_copy_bandwidth(device) if measure_bandwidth else None
    roofline = decode_roofline(config, dtype, device_name(device), bandwidth, context_len=context_len)
    counted = sum(count_parameters(model).values()) if model is not None else None
    return analysis, roofline, counted


def run_analysis(loaded_model_or_config: LoadedModel | LlamaForCausalLM | LlamaConfig,
                 device: str | torch.device = "auto", measure_bandwidth: bool = True, **kwargs) -> dict:
    """The analysis as a JSON-able dict (tables and roofline numbers), for the pipeline to record.

    kwargs go to `analyze_for_device` (dtype, context_len, name).
    """
    return _to_dict(*analyze_for_device(loaded_model_or_config, device, measure_bandwidth, **kwargs))


def _to_dict(analysis: ModelAnalysis, roofline: DecodeRoofline, counted_params: int | None) -> dict:
    d = analysis.to_dict()
    d["counted_params"] = counted_params  # from the loaded tensors; None when only the config was analysed
    d["roofline"] = roofline.to_dict()
    return d

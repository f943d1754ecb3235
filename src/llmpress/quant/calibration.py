"""Calibration data, and the layer-by-layer loop that quantizes a whole model with RTN, GPTQ or AWQ.

The loop is sequential (GPTQ paper, Sec. 4; GPTQ reference `llama_sequential`): the calibration samples
are embedded once, then each decoder layer is calibrated on its inputs, quantized, and run again,
quantized, to produce the next layer's inputs, so every layer sees the errors of the quantized layers
before it. Inputs of linears are read with forward hooks while the whole layer runs; nothing stops the
forward early (STYLE 16). The embeddings and final norm stay in float; lm_head too, unless
`quantize_model(..., lm_head=scheme)` asks for it (RTN only, see `quantize_lm_head`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from llmpress.errors import LlmpressError
from llmpress.eval.data import DEFAULT_NAME, load_eval_text
from llmpress.eval.perplexity import tokenize_for_ppl
from llmpress.model.fusion import unfuse_projections
from llmpress.quant.awq import ActivationStats, AwqConfig, awq_quantize_layer
from llmpress.quant.gptq import GptqConfig, HessianAccumulator, gptq_quantize_layer
from llmpress.quant.layer_groups import LLAMA_LINEAR_GROUPS, LinearGroup, group_linears, linear_names
from llmpress.quant.rtn import quantize_rtn, split_rows
from llmpress.quant.scheme import QuantizedWeight, QuantScheme

log = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq")
CALIB_SOURCES = ("default", "wikitext2", "c4")  # or a PATH to a UTF-8 text file
# The first C4 English validation shard, as the GPTQ and AWQ references use it (about 45k documents).
C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"


@dataclass
class CalibrationConfig:
    source: str = "default"  # default (packaged WikiText-2, calib articles) | wikitext2 (train) | c4 | PATH
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1:
            raise LlmpressError(f"--nsamples must be at least 1, got {self.nsamples}.")
        if self.seqlen < 2:
            raise LlmpressError(f"--seqlen must be at least 2, got {self.seqlen}.")


def load_calibration_tokens(tokenizer, config: CalibrationConfig | None = None) -> torch.Tensor:
    """nsamples random windows of seqlen tokens, LongTensor [nsamples, seqlen], the same for the same seed."""
    config = config or CalibrationConfig()
    generator = torch.Generator().manual_seed(config.seed)
    if config.source == "c4":
        return _c4_windows(tokenizer, config, generator)
    ids = tokenize_for_ppl(tokenizer, _calibration_text(config.source))
    if ids.numel() < config.seqlen:
        raise LlmpressError(f"--calib {config.source} has only {ids.numel()} tokens, fewer than one window of "
                            f"--seqlen {config.seqlen}; lower --seqlen or use a longer text.")
    if config.nsamples * config.seqlen > ids.numel():
        log.warning("--calib %s: %d tokens for %d x %d calibration tokens, so windows overlap.",
                    config.source, ids.numel(), config.nsamples, config.seqlen)
    # Random windows anywhere in the stream (GPTQ reference `get_wikitext2`).
    starts = torch.randint(0, ids.numel() - config.seqlen + 1, (config.nsamples,), generator=generator)
    return torch.stack([ids[s:s + config.seqlen] for s in starts.tolist()])


def _calibration_text(source: str) -> str:
    if source == DEFAULT_NAME:
        # Only the calibration articles, so perplexity on `default:heldout` is measured on unseen text.
        return load_eval_text(f"{DEFAULT_NAME}:calib")[0]
    if source == "wikitext2":
        rows = _load_hub_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
        return "\n\n".join(rows)
    path = os.path.expanduser(source)
    if not os.path.isfile(path):
        raise LlmpressError(f"--calib {source}: not a file; use --calib {' | '.join(CALIB_SOURCES)} or a "
                            "path to a UTF-8 text file.")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise LlmpressError(f"--calib {source} is not UTF-8 text; pass a plain-text file.") from None


def _c4_windows(tokenizer, config: CalibrationConfig, generator: torch.Generator) -> torch.Tensor:
    """GPTQ reference `get_c4`: a random document long enough for a window, then a random window in it."""
    documents = _load_hub_dataset("allenai/c4", data_files={"validation": C4_SHARD}, split="validation")["text"]
    samples = []
    for _ in range(100 * config.nsamples):
        if len(samples) == config.nsamples:
            return torch.stack(samples)
        doc = documents[int(torch.randint(0, len(documents), (1,), generator=generator))]
        ids = tokenize_for_ppl(tokenizer, doc)
        if ids.numel() > config.seqlen:
            begin = int(torch.randint(0, ids.numel() - config.seqlen + 1, (1,), generator=generator))
            samples.append(ids[begin:begin + config.seqlen])
    raise LlmpressError(f"--calib c4: too few documents reach --seqlen {config.seqlen} tokens; lower --seqlen.")


def _load_hub_dataset(*args, **kwargs):
    try:
        import datasets
    except ImportError:
        raise LlmpressError("this --calib source needs the `datasets` package (pip install datasets); "
                            "without it, use --calib default or --calib PATH.") from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as error:  # offline, hub and cache errors all surface as different types
        raise LlmpressError(f"the calibration data could not be loaded from the Hugging Face hub "
                            f"({type(error).__name__}); use --calib default or --calib PATH.") from None


# --- the layer-by-layer loop ------------------------------------------------------------------------

LayerRunner = Callable[[nn.Module], list[torch.Tensor]]


@torch.no_grad()
def quantize_model(model, method: str, scheme: QuantScheme, calib_tokens: torch.Tensor | None = None,
                   progress: bool = True, batch_size: int = 8, gptq: GptqConfig | None = None,
                   awq: AwqConfig | None = None, lm_head: QuantScheme | None = None) -> dict[str, QuantizedWeight]:
    """Quantize every decoder-layer linear of `model` in place (fake-quantized float weights) and return
    their QuantizedWeight by parameter prefix ("model.layers.0.self_attn.q_proj").
    calib_tokens: LongTensor [nsamples, seqlen] (not needed for rtn); `batch_size` samples run at a time.
    AWQ also divides the layers' norm gains by its scales, in place: a checkpoint must take them from `model`.
    `lm_head`: also quantize the head with this scheme, always by RTN whatever `method` is (GPTQ/AWQ
    calibration of the head is not built), under the key "lm_head"; a tied head is untied first."""
    if method not in METHODS:
        raise LlmpressError(f"unknown quantization method {method!r}; choose {', '.join(METHODS)}.")
    if method != "rtn" and calib_tokens is None:
        raise LlmpressError(f"{method} needs calibration tokens; see load_calibration_tokens.")
    unfuse_projections(model)  # fused q|k|v buffers would bypass the per-projection modules the hooks watch
    layers = model.model.layers
    run_layer = None if method == "rtn" else CalibrationInputs(model, calib_tokens, batch_size)
    result = {}
    bar = tqdm(layers, desc=f"{method} {scheme.bits}-bit", unit="layer", disable=not progress)
    for index, layer in enumerate(bar):
        start = time.perf_counter()
        if method == "rtn":
            quantized = {name: quantize_rtn(layer.get_submodule(name).weight, scheme) for name in linear_names()}
            _write_fake_quantized(layer, quantized)
        elif method == "gptq":
            quantized = _gptq_decoder_layer(layer, run_layer, scheme, gptq or GptqConfig())
        else:
            quantized = _awq_decoder_layer(layer, run_layer, scheme, awq or AwqConfig())
        if run_layer is not None:
            run_layer.advance(layer)  # the next layer's inputs, computed by this layer quantized
        result.update({f"model.layers.{index}.{name}": q for name, q in quantized.items()})
        bar.set_postfix(layer_s=f"{time.perf_counter() - start:.1f}")
    if lm_head is not None:
        result["lm_head"] = quantize_lm_head(model, lm_head)
    return result


@torch.no_grad()
def quantize_lm_head(model, scheme: QuantScheme) -> QuantizedWeight:
    """RTN-quantize `model.lm_head` in place (fake-quantized float weight), untying it from embed_tokens first.

    RTN needs no data, and the head sees the final norm's output, which no layer loop produces; GPTQ/AWQ
    calibration of the head is not built. The input embedding keeps its float weights."""
    start = time.perf_counter()
    _untie_lm_head(model)
    quantized = {"lm_head": quantize_rtn(model.lm_head.weight, scheme)}
    _write_fake_quantized(model, quantized)
    log.info("lm_head RTN %d-bit g%d in %.1f s", scheme.bits, scheme.group_size, time.perf_counter() - start)
    return quantized["lm_head"]


def _untie_lm_head(model) -> None:
    """Give lm_head its own copy of the weight, and a config that says so (so `tie_weights()` and the savers
    treat it as a separate matrix). The config is replaced, not edited: it may be shared (KNOWN_ARCHITECTURES)."""
    head, embed = model.lm_head, model.model.embed_tokens
    if head.weight is embed.weight:
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    if model.config.tie_word_embeddings:
        model.config = dataclasses.replace(model.config, tie_word_embeddings=False)


class CalibrationInputs:
    """The calibration samples' hidden states between layers; calling it runs one layer over all of them in chunks."""

    def __init__(self, model, calib_tokens: torch.Tensor, batch_size: int):
        assert calib_tokens.dim() == 2, f"calib_tokens must be [nsamples, seqlen], got {tuple(calib_tokens.shape)}"
        device = model.device
        self.positions = torch.arange(calib_tokens.shape[1], device=device)
        self.cos, self.sin = model.model.rotary_emb(self.positions, model.dtype)
        self.hidden = [model.model.embed_tokens(chunk.to(device)) for chunk in calib_tokens.split(batch_size)]

    def __call__(self, layer: nn.Module) -> list[torch.Tensor]:
        return [layer(h, self.cos, self.sin, self.positions, None) for h in self.hidden]

    def advance(self, layer: nn.Module) -> None:
        self.hidden = self(layer)


def capture_input_stats(layer: nn.Module, groups: tuple[LinearGroup, ...], run_layer: LayerRunner,
                        make_stats: type[HessianAccumulator]) -> list[HessianAccumulator]:
    """Run the layer over every sample once and accumulate the inputs of each group (read at its first linear)."""
    stats, handles = [], []
    for group in groups:
        first = group_linears(layer, group)[0]
        acc = make_stats(first.in_features, first.weight.device)
        handles.append(first.register_forward_hook(lambda module, args, output, acc=acc: acc.add_batch(args[0])))
        stats.append(acc)
    try:
        run_layer(layer)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def _gptq_decoder_layer(layer, run_layer: LayerRunner, scheme: QuantScheme, config: GptqConfig) -> dict[str, QuantizedWeight]:
    quantized = {}
    for group in LLAMA_LINEAR_GROUPS:
        # Inputs recomputed with every earlier group of this layer already quantized (true sequential).
        hessian = capture_input_stats(layer, (group,), run_layer, HessianAccumulator)[0].hessian
        linears = group_linears(layer, group)
        stacked = torch.cat([linear.weight for linear in linears])  # one Hessian, one pass for q|k|v
        qw = gptq_quantize_layer(stacked, hessian, scheme, config.damp_percent, config.block_size)
        parts = dict(zip(group.linears, split_rows(qw, [linear.out_features for linear in linears])))
        _write_fake_quantized(layer, parts)
        quantized.update(parts)
    return quantized


def _awq_decoder_layer(layer, run_layer: LayerRunner, scheme: QuantScheme, config: AwqConfig) -> dict[str, QuantizedWeight]:
    # One pass of the float layer gives every group's inputs, as in llm-awq (scales fold without changing them).
    stats = capture_input_stats(layer, LLAMA_LINEAR_GROUPS, run_layer, ActivationStats)
    quantized = awq_quantize_layer(layer, stats, scheme, config)
    _write_fake_quantized(layer, quantized)
    return quantized


def _write_fake_quantized(layer: nn.Module, quantized: dict[str, QuantizedWeight]) -> None:
    for name, qw in quantized.items():
        weight = layer.get_submodule(name).weight
        weight.copy_(qw.dequantize(weight.dtype).to(weight.device))

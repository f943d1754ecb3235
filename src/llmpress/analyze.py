"""Where a Llama model's parameters and bytes live: per decoder layer and for the whole model.

Counts come from config arithmetic (no weights needed, so a 70B architecture analyses instantly);
`count_parameters` counts a real model's tensors the same way so tests can check the arithmetic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from llmpress.config import LlamaConfig

# Per-architecture facts as data: the parameterised modules of one decoder layer, in forward order,
# and the whole-model group each module type belongs to ("norm" is the final RMSNorm).
LAYER_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "input_layernorm", "post_attention_layernorm")
MODULE_GROUPS = {
    "embed_tokens": "embed_tokens",
    "q_proj": "attention", "k_proj": "attention", "v_proj": "attention", "o_proj": "attention",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
    "input_layernorm": "norms", "post_attention_layernorm": "norms", "norm": "norms",
    "lm_head": "lm_head",
}
MODEL_GROUPS = ("embed_tokens", "attention", "mlp", "norms", "lm_head")


def layer_module_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Weight shape of each module in one decoder layer: [out, in] for linears, [hidden] for norms."""
    h, i = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim  # grouped-query attention: fewer k/v heads
    return {"q_proj": (q_out, h), "k_proj": (kv_out, h), "v_proj": (kv_out, h), "o_proj": (h, q_out),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
            "input_layernorm": (h,), "post_attention_layernorm": (h,)}


def layer_parameter_counts(config: LlamaConfig) -> dict[str, int]:
    """Parameters of each module in one decoder layer (weights plus biases where the config has them)."""
    counts = {}
    for name, shape in layer_module_shapes(config).items():
        counts[name] = shape[0] * shape[1] if len(shape) == 2 else shape[0]
        has_bias = config.attention_bias if MODULE_GROUPS[name] == "attention" else config.mlp_bias
        if len(shape) == 2 and has_bias:
            counts[name] += shape[0]
    return counts


def model_parameter_counts(config: LlamaConfig) -> dict[str, int]:
    """Parameters per module type over the whole model; a tied lm_head counts 0 (it is embed_tokens)."""
    embed = config.vocab_size * config.hidden_size
    counts = {"embed_tokens": embed}
    counts.update({name: config.num_hidden_layers * n for name, n in layer_parameter_counts(config).items()})
    counts["norm"] = config.hidden_size
    counts["lm_head"] = 0 if config.tie_word_embeddings else embed
    return counts


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters per module type of a real model, each tensor counted once (tied weights deduplicated)."""
    counts: dict[str, int] = {}
    seen: set[int] = set()
    # remove_duplicate=False plus our own id() check makes the tie handling explicit; named_parameters'
    # default dedup would hide it. The module type is the attribute name that owns the tensor.
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            continue
        seen.add(id(p))
        module_type = name.split(".")[-2]
        counts[module_type] = counts.get(module_type, 0) + p.numel()
    return counts


@dataclass
class ParamRow:
    name: str
    detail: str  # weight shape, or what a group contains
    params: int
    bytes: int
    share_pct: float  # of the layer (per-layer table) or of the model (whole-model table)


@dataclass
class ModelAnalysis:
    name: str
    config: LlamaConfig
    bytes_per_param: float
    per_layer: list[ParamRow]  # LAYER_MODULES, then "layer total"
    whole_model: list[ParamRow]  # MODEL_GROUPS, then "total"

    @property
    def num_params(self) -> int:
        return self.whole_model[-1].params

    def to_dict(self) -> dict:
        d = asdict(self)
        d["config"] = self.config.to_hf_dict()
        d["num_params"] = self.num_params
        return d


def analyze_model(config: LlamaConfig, bytes_per_param: float, name: str = "") -> ModelAnalysis:
    """Parameter and byte breakdown of one decoder layer and of the whole model at `bytes_per_param`."""
    def row(row_name: str, detail: str, params: int, total: int) -> ParamRow:
        share_pct = 100.0 * params / total if total else 0.0
        return ParamRow(row_name, detail, params, round(params * bytes_per_param), share_pct)

    shapes, layer_counts = layer_module_shapes(config), layer_parameter_counts(config)
    layer_total = sum(layer_counts.values())
    per_layer = [row(m, " x ".join(map(str, shapes[m])), layer_counts[m], layer_total) for m in LAYER_MODULES]
    per_layer.append(row("layer total", "", layer_total, layer_total))

    counts = model_parameter_counts(config)
    grouped = {g: sum(n for m, n in counts.items() if MODULE_GROUPS[m] == g) for g in MODEL_GROUPS}
    total = sum(grouped.values())
    n_layers = config.num_hidden_layers
    details = {
        "embed_tokens": f"{config.vocab_size} x {config.hidden_size}",
        "attention": f"q/k/v/o x {n_layers} layers",
        "mlp": f"gate/up/down x {n_layers} layers",
        "norms": f"2 x {n_layers} layers + final",
        "lm_head": ("tied to embed_tokens" if config.tie_word_embeddings
                    else f"{config.vocab_size} x {config.hidden_size}"),
    }
    whole_model = [row(g, details[g], grouped[g], total) for g in MODEL_GROUPS]
    whole_model.append(row("total", "", total, total))
    return ModelAnalysis(name, config, bytes_per_param, per_layer, whole_model)


def format_bytes(n: float) -> str:
    """Decimal units, to match the GB/s of bandwidth figures."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _table(headers: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[bool, ...]) -> list[str]:
    widths = [max(len(str(r[c])) for r in [headers, *rows]) for c in range(len(headers))]

    def line(cells) -> str:
        return "  ".join(str(v).rjust(w) if r else str(v).ljust(w) for v, w, r in zip(cells, widths, right)).rstrip()
    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _param_rows(rows: list[ParamRow]) -> list[tuple[str, ...]]:
    return [(r.name, r.detail, f"{r.params:,}", format_bytes(r.bytes), f"{r.share_pct:.1f}%") for r in rows]


def format_analysis(analysis: ModelAnalysis, roofline=None) -> str:
    """Plain-text tables (per layer; whole model) and, given a `bench.roofline.DecodeRoofline`, the roofline."""
    c = analysis.config
    right = (False, False, True, True, True)
    lines = [
        f"{analysis.name or 'model'}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, intermediate "
        f"{c.intermediate_size}, {c.num_attention_heads} heads ({c.num_key_value_heads} kv) x {c.head_dim}, "
        f"vocab {c.vocab_size}, {'tied' if c.tie_word_embeddings else 'untied'} embeddings; "
        f"{analysis.bytes_per_param:g} bytes/param",
        "",
        f"Per decoder layer (x{c.num_hidden_layers})",
        *_table(("module", "shape [out x in]", "params", "bytes", "share"), _param_rows(analysis.per_layer), right),
        "",
        "Whole model",
        *_table(("group", "contents", "params", "bytes", "share"), _param_rows(analysis.whole_model), right),
    ]
    if roofline is not None:
        lines += ["", f"Decode roofline: batch {roofline.batch_size}, context {roofline.context_len} tokens "
                      "(every weight read once per step; lm_head read in full even when tied)",
                  f"device          {roofline.device}"]
        if roofline.bandwidth_bytes_per_s is None:
            lines.append("copy bandwidth  not measured")
        else:
            lines.append(f"copy bandwidth  {roofline.bandwidth_bytes_per_s / 1e9:,.1f} GB/s measured "
                         "(read + write of a large same-device copy, median)")
        rows = [(r.label, format_bytes(r.bytes_per_token),
                 "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.1f}") for r in roofline.rows]
        lines += _table(("weights", "bytes/token", "roofline tokens/s"), rows, (False, True, True))
        if any(r.estimate for r in roofline.rows):
            lines.append("estimates: int4 g128 priced at 4.25 bits/param (4-bit weights + per-128 scale and zero); "
                         "real kernels reach a fraction of any roofline.")
    return "\n".join(lines)

"""`llmpress analyze`: parameter arithmetic against real models and published counts, the decode roofline, the CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from llmpress.analyze import analyze_model, count_parameters, format_analysis, model_parameter_counts
from llmpress.bench.roofline import (decode_bytes_per_token, decode_roofline, measure_copy_bandwidth,
                                     roofline_tokens_per_s)
from llmpress.config import KNOWN_ARCHITECTURES
from llmpress.model import LlamaForCausalLM
from tests.conftest import TINY_VARIANTS, tiny_config

VARIANTS = dict(TINY_VARIANTS, **{"biases-untied": dict(attention_bias=True, mlp_bias=True),
                                  "biases-tied": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)})


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_arithmetic_matches_real_model(variant):
    config = tiny_config(**VARIANTS[variant])
    model = LlamaForCausalLM(config)
    arithmetic = model_parameter_counts(config)
    counted = count_parameters(model)
    # a tied lm_head owns no tensor of its own, so the real model has no lm_head entry at all
    assert counted == {name: n for name, n in arithmetic.items() if n}
    unique_total = sum(p.numel() for p in model.parameters())  # parameters() deduplicates tied tensors
    analysis = analyze_model(config, bytes_per_param=4.0)
    assert analysis.num_params == unique_total == sum(counted.values())
    assert analysis.whole_model[-1].bytes == 4 * unique_total


@pytest.mark.parametrize("arch, published", [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824)])
def test_known_architectures_match_published_counts(arch, published):
    config = KNOWN_ARCHITECTURES[arch]
    analysis = analyze_model(config, bytes_per_param=2.0)
    assert analysis.num_params == published == config.num_params
    groups = {row.name: row for row in analysis.whole_model}
    assert groups["lm_head"].params == 0 and groups["lm_head"].detail == "tied to embed_tokens"
    assert groups["total"].bytes == 2 * published
    assert math.isclose(sum(row.share_pct for row in analysis.whole_model[:-1]), 100.0)


def test_llama_3b_layer_ordering():
    """The MLP projections dominate a layer; GQA makes k/v the smallest linears."""
    layer = {row.name: row.params for row in analyze_model(KNOWN_ARCHITECTURES["llama-3.2-3b"], 2.0).per_layer}
    assert layer["gate_proj"] == layer["up_proj"] == layer["down_proj"]
    assert layer["q_proj"] == layer["o_proj"]
    assert layer["k_proj"] == layer["v_proj"]
    assert layer["down_proj"] > layer["q_proj"] > layer["k_proj"]


def test_decode_bytes_tied_bf16_is_weights_plus_kv():
    config = KNOWN_ARCHITECTURES["llama-3.2-3b"]
    context = 1024
    kv = config.num_hidden_layers * 2 * context * config.num_key_value_heads * config.head_dim * 2
    expected = 2 * config.num_params + kv
    got = decode_bytes_per_token(config, 2.0, context_len=context, kv_bytes_per_elem=2.0)
    # Tied: the full matrix is read once as lm_head, plus one embedding row for the lookup
    # (2 * hidden bytes); the stated tolerance is 1e-5 relative, and the difference is exactly that row.
    assert got == pytest.approx(expected, rel=1e-5)
    assert got - expected == 2 * config.hidden_size


def test_decode_bytes_untied_and_batched():
    config = tiny_config()  # untied
    h, v = config.hidden_size, config.vocab_size
    # untied: embed_tokens contributes only the looked-up rows; lm_head is read in full
    assert decode_bytes_per_token(config, 2.0) == 2 * (config.num_params - v * h + h)
    one = decode_bytes_per_token(config, 2.0, context_len=100, batch_size=1)
    four = decode_bytes_per_token(config, 2.0, context_len=100, batch_size=4)
    kv_per_seq = config.num_hidden_layers * 2 * 100 * config.num_key_value_heads * config.head_dim * 2
    assert four - one == 3 * kv_per_seq + 3 * 2 * h  # weights are shared by the batch; KV and rows are not
    # int4 with bf16 embed/lm_head sits between all-int4 and all-bf16
    assert (decode_bytes_per_token(config, 0.53125) < decode_bytes_per_token(config, 0.53125, head_bytes_per_param=2.0)
            < decode_bytes_per_token(config, 2.0))


def test_roofline_tokens_per_s():
    assert roofline_tokens_per_s(2e9, 3e12) == pytest.approx(1500.0)
    assert roofline_tokens_per_s(2e9, 3e12, batch_size=8) == pytest.approx(12000.0)


def test_copy_bandwidth_cpu_is_positive_and_finite():
    bandwidth = measure_copy_bandwidth("cpu", nbytes=1 << 22, repeats=5)
    assert math.isfinite(bandwidth) and bandwidth > 0


def test_format_analysis_with_roofline():
    import torch
    config = KNOWN_ARCHITECTURES["llama-3.2-1b"]
    roofline = decode_roofline(config, torch.bfloat16, "test device", bandwidth_bytes_per_s=3e12)
    assert roofline.rows[0].bytes_per_token == decode_bytes_per_token(config, 2.0)
    text = format_analysis(analyze_model(config, 2.0, name="llama-3.2-1b"), roofline)
    for expected in ("q_proj", "tied to embed_tokens", "test device", "3,000.0 GB/s", "bfloat16", "estimate"):
        assert expected in text


def test_run_analysis_on_a_model_is_json_able():
    from llmpress.commands.analyze import run_analysis
    config = tiny_config(tie_word_embeddings=True)
    result = json.loads(json.dumps(run_analysis(LlamaForCausalLM(config), "cpu", measure_bandwidth=False)))
    assert result["num_params"] == result["counted_params"] == config.num_params
    assert result["roofline"]["bandwidth_bytes_per_s"] is None
    fp32_bytes = decode_bytes_per_token(config, 4.0, kv_bytes_per_elem=4.0)
    assert result["roofline"]["rows"][0]["bytes_per_token"] == fp32_bytes


def _analyze_parser() -> argparse.ArgumentParser:
    from llmpress.commands import analyze
    parser = argparse.ArgumentParser(prog="llmpress")
    analyze.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_analyze_command_random_architecture(capsys, tmp_path):
    out = tmp_path / "sub" / "analysis.json"
    args = _analyze_parser().parse_args(["analyze", "--model", "random:llama-3.2-1b", "--no-bandwidth",
                                         "--json", str(out)])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "q_proj" in text and "1,235,814,400" in text
    data = json.loads(out.read_text())
    assert data["num_params"] == 1_235_814_400 and data["counted_params"] is None
    assert [p.name for p in out.parent.iterdir()] == ["analysis.json"]  # no temp file left behind


def test_cli_analyze(capsys):
    from llmpress.cli import main
    assert main(["analyze", "--model", "random:llama-3.2-1b", "--no-bandwidth"]) == 0
    assert "q_proj" in capsys.readouterr().out

"""Calibration data (seeded windows, the article split) and the layer-by-layer loop, on tiny and real models."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.eval.data import (ARTICLE_TITLE, _packaged_text, article_part, load_eval_text, rows_from_text,
                                split_articles)
from llmpress.eval.perplexity import tokenize_for_ppl
from llmpress.loading.loader import random_model
from llmpress.quant.calibration import (CalibrationConfig, CalibrationInputs, load_calibration_tokens,
                                        quantize_model)
from llmpress.quant.rtn import quantize_rtn
from llmpress.quant.scheme import QuantScheme
from tests.conftest import tiny_config

# --- the article split of the packaged text -----------------------------------------------------------


def test_article_split_is_disjoint_and_complete():
    rows = rows_from_text(_packaged_text())
    articles = split_articles(rows)
    assert len(articles) == 62  # WikiText-2's test split holds 62 articles
    calib, heldout = article_part(articles, "calib"), article_part(articles, "heldout")
    assert len(calib) == 16 and len(heldout) == 46
    assert calib[0] is articles[0] and calib[1] is articles[4] and heldout[0] is articles[1]
    # Every row lands in exactly one part, each article whole and in order.
    assert sorted(map(id, calib + heldout)) == sorted(map(id, articles))
    assert [row for a in articles for row in a] == rows
    for article in calib + heldout:
        assert ARTICLE_TITLE.fullmatch(article[0].rstrip("\n"))
        assert not any(ARTICLE_TITLE.fullmatch(row.rstrip("\n")) for row in article[1:])
    # Section headings (" = = Career = = ") stay inside their article.
    assert any(row.startswith(" = = ") for row in articles[0])


def test_default_calib_and_heldout_sources():
    calib, calib_description = load_eval_text("default:calib")
    heldout, heldout_description = load_eval_text("default:heldout")
    assert calib.startswith(" = Robert Boulter = ") and heldout.startswith(" = Du Fu = ")
    assert "16 of 62 articles" in calib_description and "46 of 62 articles" in heldout_description
    assert " = Du Fu = " not in calib and " = Robert Boulter = " not in heldout
    whole, _ = load_eval_text("default")
    assert len(calib) + len(heldout) + 2 == len(whole)  # the same rows, one "\n\n" seam fewer
    with pytest.raises(LlmpressError, match="default:calib or default:heldout"):
        load_eval_text("default:train")


# --- calibration tokens -------------------------------------------------------------------------------


def test_calibration_windows_are_seeded_and_from_the_calibration_articles(embedded):
    config = CalibrationConfig(nsamples=6, seqlen=64, seed=0)
    ids = load_calibration_tokens(embedded.tokenizer, config)
    assert ids.shape == (6, 64) and ids.dtype == torch.int64
    assert torch.equal(ids, load_calibration_tokens(embedded.tokenizer, config))
    assert not torch.equal(ids, load_calibration_tokens(embedded.tokenizer, CalibrationConfig(nsamples=6, seqlen=64, seed=1)))
    # Each window is a slice of the calib articles' token stream.
    stream = tokenize_for_ppl(embedded.tokenizer, load_eval_text("default:calib")[0])
    windows = stream.unfold(0, 64, 1)
    assert all((windows == row).all(dim=1).any() for row in ids)


def test_calibration_from_a_text_file_and_clear_errors(embedded, tmp_path, monkeypatch):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 50)
    ids = load_calibration_tokens(embedded.tokenizer, CalibrationConfig(str(path), nsamples=3, seqlen=32))
    assert ids.shape == (3, 32)
    with pytest.raises(LlmpressError, match="fewer than one window"):
        load_calibration_tokens(embedded.tokenizer, CalibrationConfig(str(path), nsamples=1, seqlen=100_000))
    with pytest.raises(LlmpressError, match="not a file"):
        load_calibration_tokens(embedded.tokenizer, CalibrationConfig(str(tmp_path / "missing.txt")))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    for source in ("wikitext2", "c4"):
        with pytest.raises(LlmpressError, match="datasets.*--calib default"):
            load_calibration_tokens(embedded.tokenizer, CalibrationConfig(source))
    with pytest.raises(LlmpressError, match="--nsamples"):
        CalibrationConfig(nsamples=0)


# --- the layer-by-layer loop on a tiny model ----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config(hidden_size=128, intermediate_size=256)
    return random_model(config, torch.device("cpu"), torch.float32, seed=0)


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_model_writes_fake_quantized_weights_and_keeps_the_rest(tiny_model, method):
    model = copy.deepcopy(tiny_model)
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=4, group_size=32)
    result = quantize_model(model, method, scheme, calib, progress=False, batch_size=3)
    expected = {f"model.layers.{i}.{name}" for i in range(2) for name in
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(result) == expected
    params = dict(model.named_parameters())
    for prefix, qw in result.items():
        assert torch.equal(params[f"{prefix}.weight"], qw.dequantize())
        assert qw.qweight.shape == params[f"{prefix}.weight"].shape
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(params[name], dict(tiny_model.named_parameters())[name])
    if method == "rtn":  # RTN needs no data, and is quantize_rtn on each original weight
        original = dict(tiny_model.named_parameters())
        assert all(torch.equal(qw.qweight, quantize_rtn(original[f"{p}.weight"], scheme).qweight)
                   for p, qw in result.items())


def test_quantize_model_errors(tiny_model):
    with pytest.raises(LlmpressError, match="unknown quantization method"):
        quantize_model(copy.deepcopy(tiny_model), "nf4", QuantScheme())
    with pytest.raises(LlmpressError, match="needs calibration tokens"):
        quantize_model(copy.deepcopy(tiny_model), "gptq", QuantScheme())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantize_model_on_cuda_matches_cpu(tiny_model, method):
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    scheme = QuantScheme(bits=4, group_size=32)
    on_cpu = quantize_model(copy.deepcopy(tiny_model), method, scheme, calib, progress=False)
    on_gpu = quantize_model(copy.deepcopy(tiny_model).cuda(), method, scheme, calib, progress=False)
    for prefix, qw in on_cpu.items():
        # Float sums in another order can flip a rare rounding; the weights must agree almost everywhere.
        agree = (on_gpu[prefix].qweight.cpu() == qw.qweight).float().mean().item()
        assert agree > 0.99, (prefix, agree)


# --- the real embedded model --------------------------------------------------------------------------

REAL_LAYERS = 3


@pytest.fixture(scope="module")
def real_layer_errors(embedded):
    """Each method on the first layers of SmolLM2-135M (8 x 256 calibration tokens, 4-bit g128), and each
    layer's output error on the calibration data, every layer fed the float model's inputs."""
    base = copy.deepcopy(embedded.model)
    base.model.layers = base.model.layers[:REAL_LAYERS]
    calib = load_calibration_tokens(embedded.tokenizer, CalibrationConfig(nsamples=8, seqlen=256))
    scheme = QuantScheme(bits=4, group_size=128)
    quantized = {}
    for method in ("rtn", "gptq", "awq"):
        quantized[method] = copy.deepcopy(base)
        quantize_model(quantized[method], method, scheme, calib, progress=False)
    inputs, errors = CalibrationInputs(base, calib, batch_size=8), {m: [] for m in quantized}
    with torch.no_grad():
        for i, layer in enumerate(base.model.layers):
            args = (inputs.cos, inputs.sin, inputs.positions, None)
            reference = layer(inputs.hidden[0], *args)
            for method, model in quantized.items():
                errors[method].append((model.model.layers[i](inputs.hidden[0], *args) - reference).pow(2).mean().item())
            inputs.advance(layer)
    return errors


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_real_model_layer_error_lower_than_rtn(real_layer_errors, method):
    # Measured on 2026-12-02: GPTQ 0.24, 0.25, 0.89x and AWQ 0.68, 0.49, 0.32x RTN's error on these layers (0.56x
    # and 0.46x summed). GPTQ's third layer was 0.24-0.27x before, with the same code, on 2026-12-01's package
    # versions: its inputs carry massive activations (a token's hidden state reaching 290 against a median of 32),
    # and one such token then holds 9% of GPTQ's error there. So: below RTN on every layer, and well below in sum.
    errors, rtn_errors = real_layer_errors[method], real_layer_errors["rtn"]
    for layer, (error, rtn_error) in enumerate(zip(errors, rtn_errors)):
        assert error < rtn_error, (layer, error, rtn_error)
    assert sum(errors) < 0.7 * sum(rtn_errors), (errors, rtn_errors)

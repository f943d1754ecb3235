"""Quantized lm_head (RTN, 4 or 8 bits): untied from the embeddings, a QuantLinear that gives the fake-quantized
logits, a GPTQ checkpoint that reloads with identical logits, and a CLI that refuses formats that cannot hold it."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from llmpress import cli
from llmpress.kernels import ops
from llmpress.loading import load_model
from llmpress.loading.loader import random_model
from llmpress.loading.save import save_hf_checkpoint
from llmpress.quant.calibration import quantize_lm_head, quantize_model
from llmpress.quant.checkpoint import save_quantized
from llmpress.quant.linear import QuantLinear, replace_linears
from llmpress.quant.scheme import QuantScheme
from tests.conftest import tiny_config

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
G32 = QuantScheme(bits=4, group_size=32)
HEAD_8BIT = QuantScheme(bits=8, group_size=32)
DECODER_LINEARS = 2 * 7  # tiny_config: 2 layers of q, k, v, o, gate, up, down


def tied_model(fp16_exact: bool = False):
    """The tiny 2-layer Llama with tied embeddings, random fp32 weights (fp16-exact for checkpoint round trips)."""
    model = random_model(tiny_config(tie_word_embeddings=True), torch.device("cpu"), torch.float32, seed=0)
    if fp16_exact:  # the checkpoint stores the float weights in fp16
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad(), ops.use_backend("torch"):  # the CPU reference for QuantLinear
        return model(IDS)


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got - ref).norm() / ref.norm())


def test_tied_head_is_untied_quantized_and_the_embedding_keeps_its_weights():
    model = tied_model()
    config = model.config
    embed_before = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    result = quantize_model(model, "rtn", G32, progress=False, lm_head=G32)
    assert "lm_head" in result and len(result) == DECODER_LINEARS + 1
    assert result["lm_head"].scheme == G32 and result["lm_head"].qweight.shape == (256, 64)
    assert torch.equal(model.model.embed_tokens.weight, embed_before)  # bitwise: the input side stays float
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, result["lm_head"].dequantize())
    assert not torch.equal(model.lm_head.weight, embed_before)
    # The model now says it is untied, so tie_weights() cannot put the float matrix back; the config it
    # was built with (possibly shared) is left alone.
    assert model.config.tie_word_embeddings is False and config.tie_word_embeddings is True
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, result["lm_head"].dequantize())


def test_head_stays_float_by_default():
    model = tied_model()
    result = quantize_model(model, "rtn", G32, progress=False)
    assert "lm_head" not in result and model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_head_is_rtn_whatever_the_layers_method(method):
    model = tied_model()
    head = model.lm_head.weight.detach().clone()
    calib = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    result = quantize_model(model, method, G32, calib, progress=False, batch_size=4, lm_head=G32)
    from llmpress.quant.rtn import quantize_rtn
    assert torch.equal(result["lm_head"].qweight, quantize_rtn(head, G32).qweight)


def test_quantlinear_head_gives_the_fake_quantized_logits():
    model = tied_model()
    quantized = quantize_model(model, "rtn", G32, progress=False, lm_head=G32)
    fake = logits(model)
    replace_linears(model, quantized, torch.float32)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.bits == 4
    assert type(model.model.embed_tokens) is torch.nn.Embedding
    torch.testing.assert_close(logits(model), fake, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_checkpoint_with_quantized_head_reloads_with_identical_logits(tmp_path, bits):
    scheme = QuantScheme(bits=bits, group_size=32)
    model = tied_model(fp16_exact=True)
    quantized = quantize_model(model, "rtn", scheme, progress=False, lm_head=scheme)
    # The checkpoint stores fp16 scales: round them here so the in-memory model is the one on disk.
    quantized = {name: dataclasses.replace(qw, scales=qw.scales.half().float()) for name, qw in quantized.items()}
    replace_linears(model, quantized, torch.float32)
    out = save_quantized(model, quantized, None, tmp_path / "out", scheme, fmt="gptq")

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True and config["quantization_config"]["bits"] == bits
    assert config["tie_word_embeddings"] is False
    loaded = load_model(str(out), dtype="float32", device="cpu")
    assert isinstance(loaded.model.lm_head, QuantLinear) and loaded.model.lm_head.bits == bits
    assert loaded.model.config.tie_word_embeddings is False
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)


def test_8bit_head_runs_on_the_cpu_reference_close_to_float():
    model = tied_model()
    ref = logits(model)
    errors = {}
    for bits in (4, 8):
        head_only = copy.deepcopy(model)
        qw = quantize_lm_head(head_only, QuantScheme(bits=bits, group_size=32))
        replace_linears(head_only, {"lm_head": qw}, torch.float32)
        assert isinstance(head_only.lm_head, QuantLinear) and head_only.lm_head.bits == bits
        errors[bits] = relative_error(logits(head_only), ref)
    # RTN error per weight is uniform within scale/2: 16x smaller steps at 8 bits than at 4. Measured on
    # this model: ~0.4% (8-bit) vs ~7% (4-bit) relative error of the logits.
    assert errors[8] < 0.01 and errors[8] < errors[4] / 8, errors


# -- the CLI -----------------------------------------------------------------------------------------

@pytest.fixture
def no_model_load(monkeypatch):
    """Refusals must come before any work: loading the model fails the test."""
    def fail(args):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr("llmpress.commands.common.load_from_args", fail)


@pytest.mark.parametrize("argv,fix", [
    (["--method", "rtn", "--lm-head-bits", "4", "--format", "awq"], "--format gptq"),
    (["--method", "awq", "--lm-head-bits", "4"], "--format gptq"),  # --format auto is awq for AWQ
    (["--method", "rtn", "--bits", "4", "--lm-head-bits", "8"], "--format fake"),
], ids=["rtn-awq-format", "awq-auto-format", "gptq-mixed-bits"])
def test_cli_refuses_a_head_the_format_cannot_hold(tmp_path, capsys, no_model_load, argv, fix):
    out = tmp_path / "q"
    assert cli.main(["quantize", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fix in err and "head" in err
    assert not out.exists()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """The tiny tied model as a Hugging Face directory (no tokenizer: RTN needs no text)."""
    return save_hf_checkpoint(tied_model(fp16_exact=True), None, tmp_path / "tiny", torch.float32)


def test_cli_writes_a_gptq_checkpoint_with_a_4bit_head(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                     "--lm-head-bits", "4", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["lm_head"] is True
    loaded = load_model(str(out), dtype="float32", device="cpu")
    assert isinstance(loaded.model.lm_head, QuantLinear) and loaded.model.lm_head.group_size == 32
    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert relative_error(logits(loaded.model), logits(base.model)) < 0.2  # 4-bit everywhere: ~0.11 measured


def test_cli_writes_a_fake_checkpoint_with_an_8bit_head(tmp_path, tiny_model_dir):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--group-size", "32",
                     "--lm-head-bits", "8", "--format", "fake", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert config["llmpress_fake_quantization"]["lm_head"]["bits"] == 8
    loaded = load_model(str(out), dtype="float32", device="cpu")
    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert torch.equal(loaded.model.model.embed_tokens.weight, base.model.model.embed_tokens.weight)
    assert not torch.equal(loaded.model.lm_head.weight, base.model.lm_head.weight)
    assert relative_error(loaded.model.lm_head.weight, base.model.lm_head.weight) < 0.01  # ~0.005 measured

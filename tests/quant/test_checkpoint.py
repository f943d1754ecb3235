"""Quantized checkpoints: what we write reloads with identical logits, reads like other engines read it,
never half-exists after a crash, and unsupported variants are refused with one clear sentence."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmpress.errors import LlmpressError, ModelLoadError
from llmpress.loading import load_model
from llmpress.quant.checkpoint import save_quantized
from llmpress.quant.linear import QuantLinear, replace_linears
from llmpress.quant.scheme import QuantScheme
from tests.conftest import TINY_VARIANTS, hf_pair, tiny_config
from tests.quant.packing_fixtures import quantize_model

IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
Q_PROJ = "model.layers.0.self_attn.q_proj"


def quantized_model(variant: str = "llama2-mha-untied", scheme: QuantScheme = QuantScheme(bits=4, group_size=32),
                    swap: bool = True, **overrides):
    """(model with QuantLinear layers, {name: QuantizedWeight}); float weights fp16-exact, like the checkpoint.
    `swap=False` keeps the float linears (3-bit weights have no packed layer)."""
    _, model = hf_pair(tiny_config(**TINY_VARIANTS[variant], **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    quantized = quantize_model(model, scheme)
    if swap:
        replace_linears(model, quantized, torch.float32)
    return model, quantized


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def edit_config(directory, **quantization) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(quantization)
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    """A saved act-order GPTQ checkpoint and the in-memory model it came from."""
    scheme = QuantScheme(bits=4, group_size=32, act_order=True)
    model, quantized = quantized_model(scheme=scheme)
    out = tmp_path_factory.mktemp("ckpt") / "gptq"
    save_quantized(model, quantized, None, out, scheme, fmt="gptq")
    return out, model, quantized


@pytest.fixture
def gptq_copy(tmp_path, gptq_dir):
    """A private copy of the GPTQ checkpoint, for tests that edit it."""
    import shutil
    out = tmp_path / "ckpt"
    shutil.copytree(gptq_dir[0], out)
    return out


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,scheme,variant,bias", [
    ("gptq", QuantScheme(bits=4, group_size=32), "llama2-mha-untied", False),
    ("gptq", QuantScheme(bits=4, group_size=32, sym=True, act_order=True), "gqa-tied", True),
    ("gptq", QuantScheme(bits=8, group_size=-1), "llama3-rope-gqa-tied", False),
    ("gptq", QuantScheme(bits=2, group_size=32), "gqa-tied", False),
    ("awq", QuantScheme(bits=4, group_size=32), "llama2-mha-untied", True),
    ("awq", QuantScheme(bits=4, group_size=32, sym=True), "gqa-tied", False),
], ids=["gptq4", "gptq4-sym-actorder-bias", "gptq8-perchannel", "gptq2", "awq-bias", "awq-sym"])
def test_save_load_round_trip_gives_identical_logits(tmp_path, fmt, scheme, variant, bias):
    model, quantized = quantized_model(variant, scheme, attention_bias=bias, mlp_bias=bias)
    out = save_quantized(model, quantized, None, tmp_path / "out", scheme, fmt=fmt,
                         generation_config={"eos_token_id": [255, 7]})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert config["torch_dtype"] == "float16" and quant["quant_method"] == fmt and quant["bits"] == scheme.bits
    assert quant["group_size"] == scheme.group_size
    if fmt == "gptq":
        assert quant["checkpoint_format"] == "gptq" and quant["sym"] == scheme.sym
        assert quant["desc_act"] == scheme.act_order and quant["lm_head"] is False
        assert json.loads((out / "quantize_config.json").read_text()) == quant
    else:
        assert quant["version"] == "gemm" and quant["zero_point"] == (not scheme.sym) and quant["sym"] == scheme.sym
    tensors = load_file(str(out / "model.safetensors"))
    assert ("lm_head.weight" in tensors) == (not model.config.tie_word_embeddings)
    assert f"{Q_PROJ}.weight" not in tensors
    assert (f"{Q_PROJ}.g_idx" in tensors) == (fmt == "gptq") and (f"{Q_PROJ}.bias" in tensors) == bias
    assert tensors["model.embed_tokens.weight"].dtype == torch.float16
    assert tensors[f"{Q_PROJ}.scales"].dtype == torch.float16 and tensors[f"{Q_PROJ}.qweight"].dtype == torch.int32

    loaded = load_model(str(out), dtype="float32", device="cpu")
    assert isinstance(loaded.model.get_submodule(Q_PROJ), QuantLinear)
    assert loaded.generation_defaults == {"eos_token_id": [255, 7]}
    assert loaded.stop_token_ids == [7, 255]
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=0, atol=0)


def test_loaded_quantized_model_saves_again_unchanged(tmp_path, gptq_dir):
    out, model, _ = gptq_dir
    loaded = load_model(str(out), dtype="float32", device="cpu")
    scheme = QuantScheme(bits=4, group_size=32, act_order=True)
    again = save_quantized(loaded.model, {}, None, tmp_path / "again", scheme, fmt="gptq")
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_tokenizer_files_are_saved(tmp_path):
    class Tokenizer:
        def save_pretrained(self, directory):
            (tmp_path / "seen").write_text(directory)
            with open(f"{directory}/tokenizer.json", "w") as f:
                f.write("{}")

    model, quantized = quantized_model()
    out = save_quantized(model, quantized, Tokenizer(), tmp_path / "out", QuantScheme(bits=4, group_size=32))
    assert (out / "tokenizer.json").is_file()
    assert (tmp_path / "seen").read_text() != str(out)  # written into the temporary directory, then renamed


# -- compatibility: other engines' dequantization recipes ------------------------------------------

def test_gptq_files_decode_with_the_autogptq_vllm_recipe(gptq_dir):
    """AutoGPTQ's / vLLM's torch fallback for v1 checkpoints: shift by wf, mask, zeros + 1, scales[g_idx]."""
    out, _, quantized = gptq_dir
    tensors = load_file(str(out / "model.safetensors"))
    bits = json.loads((out / "config.json").read_text())["quantization_config"]["bits"]
    wf = torch.arange(0, 32, bits, dtype=torch.int32).unsqueeze(0)
    for name in (Q_PROJ, "model.layers.1.mlp.down_proj"):
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        scales, g_idx = tensors[f"{name}.scales"], tensors[f"{name}.g_idx"].long()
        zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.unsqueeze(0))
        zeros = (torch.bitwise_and(zeros, 2 ** bits - 1) + 1).reshape(scales.shape)
        weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.unsqueeze(-1))
        weight = torch.bitwise_and(weight, 2 ** bits - 1).reshape(-1, qweight.shape[1])
        W = scales[g_idx].float() * (weight - zeros[g_idx]).float()  # [in, out]
        torch.testing.assert_close(W.T, quantized[name].dequantize(), rtol=0, atol=0)


def test_awq_files_decode_with_the_autoawq_recipe(tmp_path):
    """AutoAWQ's dequantize_gemm: unpack 8 nibbles per word, undo the [0, 4, 1, 5, 2, 6, 3, 7] interleave."""
    scheme = QuantScheme(bits=4, group_size=32)
    model, quantized = quantized_model(scheme=scheme)
    out = save_quantized(model, quantized, None, tmp_path / "awq", scheme, fmt="awq")
    tensors = load_file(str(out / "model.safetensors"))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    reverse_order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])

    def unpack(packed):
        nibbles = torch.bitwise_right_shift(packed[:, :, None], shifts[None, None, :]).reshape(packed.shape[0], -1)
        nibbles = nibbles.reshape(-1, 8)[:, reverse_order].reshape(packed.shape[0], -1)
        return torch.bitwise_and(nibbles, 0xF)

    for name in (Q_PROJ, "model.layers.1.mlp.down_proj"):
        weight, zeros = unpack(tensors[f"{name}.qweight"]), unpack(tensors[f"{name}.qzeros"])
        scales = tensors[f"{name}.scales"].float()
        zeros, scales = zeros.repeat_interleave(32, dim=0), scales.repeat_interleave(32, dim=0)
        W = (weight - zeros).float() * scales  # [in, out]
        torch.testing.assert_close(W.T, quantized[name].dequantize(), rtol=0, atol=0)


# -- never a half-written or overwritten directory ------------------------------------------------

def test_crash_while_saving_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    model, quantized = quantized_model()
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, quantized, None, tmp_path / "out", QuantScheme(bits=4, group_size=32))
    assert list(tmp_path.iterdir()) == []


def test_existing_non_empty_directory_is_refused(tmp_path):
    model, quantized = quantized_model()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(LlmpressError, match="already exists and is not empty"):
        save_quantized(model, quantized, None, out, QuantScheme(bits=4, group_size=32))
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    save_quantized(model, quantized, None, empty, QuantScheme(bits=4, group_size=32))
    assert (empty / "model.safetensors").is_file()


def test_unpackable_schemes_are_refused_before_writing(tmp_path):
    scheme = QuantScheme(bits=3, group_size=32)
    model, quantized = quantized_model(scheme=scheme, swap=False)
    with pytest.raises(LlmpressError, match="3-bit weights can be evaluated with fake quantization but not packed"):
        save_quantized(model, quantized, None, tmp_path / "out", scheme)
    act_order = QuantScheme(bits=4, group_size=32, act_order=True)
    model, quantized = quantized_model(scheme=act_order)
    with pytest.raises(LlmpressError, match="--format gptq"):
        save_quantized(model, quantized, None, tmp_path / "out", act_order, fmt="awq")
    assert list(tmp_path.iterdir()) == []


# -- refused variants ------------------------------------------------------------------------------

@pytest.mark.parametrize("quantization,message", [
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ({"quant_method": "fp8"}, "quant_method 'fp8' is not supported"),
    ({"bits": 3}, "3-bit GPTQ checkpoints are not supported"),
    ({"checkpoint_format": "gptq_v2"}, "checkpoint_format 'gptq_v2' is not supported"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin' is not supported"),
    ({"is_marlin_format": True}, "checkpoint_format 'marlin' is not supported"),
    ({"desc_act": False}, "g_idx reorders input channels but desc_act is false"),
    ({"group_size": 16}, "cannot be read as a 4-bit GPTQ layer"),
])
def test_unsupported_gptq_variants_are_refused(gptq_copy, quantization, message):
    out = gptq_copy
    edit_config(out, **quantization)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(out), dtype="float32", device="cpu")


def test_out_of_range_g_idx_is_refused(gptq_copy):
    out = gptq_copy
    tensors = load_file(str(out / "model.safetensors"))
    tensors[f"{Q_PROJ}.g_idx"][0] = 7  # only 2 groups
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=f"{Q_PROJ} cannot be read.*g_idx holds groups"):
        load_model(str(out), dtype="float32", device="cpu")


@pytest.mark.parametrize("quantization,message", [
    ({"version": "gemv"}, "AWQ version 'gemv' is not supported"),
    ({"version": "marlin"}, "AWQ version 'marlin' is not supported"),
    ({"version": "exllama"}, "AWQ version 'exllama' is not supported"),
    ({"bits": 8}, "8-bit AWQ checkpoints are not supported"),
])
def test_unsupported_awq_variants_are_refused(tmp_path, quantization, message):
    scheme = QuantScheme(bits=4, group_size=32)
    model, quantized = quantized_model(scheme=scheme)
    out = save_quantized(model, quantized, None, tmp_path / "awq", scheme, fmt="awq")
    edit_config(out, **quantization)
    with pytest.raises(ModelLoadError, match=message):
        load_model(str(out), dtype="float32", device="cpu")


def test_old_autogptq_side_file_is_read(gptq_copy, gptq_dir):
    """Checkpoints from older AutoGPTQ keep the settings in quantize_config.json only."""
    out = gptq_copy
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    side = json.loads((out / "quantize_config.json").read_text())
    del side["quant_method"]
    (out / "quantize_config.json").write_text(json.dumps(side))
    loaded = load_model(str(out), dtype="float32", device="cpu")
    torch.testing.assert_close(logits(loaded.model), logits(gptq_dir[1]), rtol=0, atol=0)

"""`llmpress quantize` end to end on the embedded model: packed and fake checkpoints that the other commands load."""

import json

import pytest
import torch

from llmpress import cli
from llmpress.loading import load_model
from llmpress.quant.linear import QuantLinear


@pytest.fixture(scope="module")
def rtn_gptq_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "rtn4"
    assert cli.main(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "128", "--out", str(out)]) == 0
    return out


def test_quantized_directory_reloads_as_quantlinear_and_answers(rtn_gptq_dir, embedded):
    config = json.loads((rtn_gptq_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    loaded = load_model(str(rtn_gptq_dir), dtype="float32", device="cpu")
    layer = loaded.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and isinstance(layer.mlp.down_proj, QuantLinear)
    from llmpress.commands.generate import generate_text
    from llmpress.generation import SamplingParams
    text, _ = generate_text(loaded, "What is the capital of France?", SamplingParams(max_new_tokens=12))
    assert "Paris" in text
    # 4-bit RTN moves the next-token distributions by ~0.3 nats on this 135M model (measured); a packing
    # bug (nibble order, zero offset) scrambles the weights and costs several nats.
    ids = loaded.tokenizer("The tower is located in Paris, the capital of", return_tensors="pt").input_ids
    with torch.inference_mode():
        got, ref = loaded.model(ids)[0], embedded.model(ids)[0]
    kl = torch.nn.functional.kl_div(got.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert 1e-3 < kl.mean() < 0.6
    assert got[-1].argmax() == ref[-1].argmax()


def test_unpackable_bits_are_refused_with_the_fix(tmp_path, capsys):
    assert cli.main(["quantize", "--method", "rtn", "--bits", "3", "--out", str(tmp_path / "q3")]) == 2
    assert "--format fake" in capsys.readouterr().err
    assert not (tmp_path / "q3").exists()


def test_fake_format_writes_a_plain_checkpoint(tmp_path):
    out = tmp_path / "q3"
    assert cli.main(["quantize", "--method", "rtn", "--bits", "3", "--format", "fake", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["llmpress_fake_quantization"]["bits"] == 3
    loaded = load_model(str(out), dtype="float32", device="cpu")
    weight = loaded.model.model.layers[0].mlp.up_proj.weight
    # 3-bit with zero points: at most 8 distinct levels in each group of 128 inputs of a row
    assert len(torch.unique(weight[0, :128])) <= 8


def test_existing_output_is_never_overwritten(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli.main(["quantize", "--method", "rtn", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"

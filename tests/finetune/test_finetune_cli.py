"""`llmpress finetune` end to end on the embedded model (a few tiny steps), and its one-line errors."""

import json
import math

import pytest
import torch

from llmpress import cli
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity
from llmpress.finetune.data import load_training_tokens
from llmpress.finetune.lora import LoRAConfig
from llmpress.finetune.run import finetune, merge_adapters, qlora_base
from llmpress.finetune.trainer import TrainConfig
from llmpress.quant.linear import QuantLinear
from llmpress.loading import load_model

TINY_RUN = ["--max-steps", "2", "--batch-size", "1", "--seq-len", "64", "--eval-every", "1", "--eval-windows", "1",
            "--lr", "1e-3"]


def error_of(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmpress: error: ") and "\n" not in err  # one line, no traceback
    return err


def test_lora_run_writes_adapter_log_curve_and_a_loadable_merged_model(tmp_path, capsys, embedded):
    out = tmp_path / "run"
    assert cli.main(["finetune", *TINY_RUN, "--dtype", "float32", "--device", "cpu", "--targets", "q_proj,v_proj",
                     "--out", str(out), "--merge"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "merged", "train_log.json", "training_curve.png"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_done"] == 2 and [e["step"] for e in log["evals"]] == [0, 1, 2]
    assert log["settings"]["lora"]["targets"] == ["q_proj", "v_proj"]
    assert (out / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "merged" / "config.json").read_text())
    assert config["llmpress_lora_merged"]["targets"] == ["q_proj", "v_proj"]

    # The merged checkpoint (fp16 on disk) computes what was trained: its validation perplexity is the
    # best one the run logged, and the base model's is the step-0 value.
    merged = load_model(str(out / "merged"), dtype="float32", device="cpu")
    validation = load_training_tokens(merged.tokenizer, "default", 64).validation[:64]
    window = PerplexityConfig(seq_len=64, max_windows=1)
    assert evaluate_perplexity(merged.model, validation, window, progress=False).ppl == \
        pytest.approx(log["best_val_ppl"], rel=2e-3)
    assert evaluate_perplexity(embedded.model, validation, window, progress=False).ppl == \
        pytest.approx(log["evals"][0]["val_ppl"], rel=1e-6)
    assert log["best_val_ppl"] < log["evals"][0]["val_ppl"]


def test_errors_are_one_line_and_come_before_loading(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "unknown LoRA target qkv" in error_of(capsys, ["finetune", "--targets", "q_proj,qkv", "--out", out])
    assert "no such file or directory" in error_of(capsys, ["finetune", "--data", str(tmp_path / "missing.txt"),
                                                            "--out", out])
    assert "is the text perplexity is reported on" in error_of(capsys, ["finetune", "--data", "default:heldout",
                                                                        "--out", out])
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    assert "already exists and is not empty" in error_of(capsys, ["finetune", "--out", out])
    assert "holds no checkpoint" in error_of(capsys, ["finetune", "--out", out, "--resume"])
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert "needs bitsandbytes" in error_of(capsys, ["finetune", "--optimizer", "adamw8bit",
                                                         "--out", str(tmp_path / "new")])


def test_qlora_trains_over_the_int4_base_and_merges_to_the_same_function(embedded):
    base = qlora_base(embedded, "rtn", group_size=64)
    assert base is not embedded and any(isinstance(m, QuantLinear) for m in base.model.modules())
    config = TrainConfig(lr=1e-3, max_steps=1, batch_size=1, seq_len=64, eval_every=0, eval_windows=1)
    result = finetune(base, LoRAConfig(targets=("q_proj", "o_proj")), config, "default", progress=False)
    assert math.isfinite(result.train.final_loss)
    assert all(isinstance(m.base_layer, QuantLinear) for m in result.adapters.values())
    assert any(m.lora_B.weight.abs().sum() > 0 for m in result.adapters.values())  # it trained
    x = torch.arange(100, 132)[None]
    with torch.no_grad():
        unmerged = result.loaded.model(x)
        merged = merge_adapters(result).model(x)
    # a plain float model: the targets merged, the other int4 projections dequantized
    assert not any(isinstance(m, QuantLinear) for m in result.loaded.model.modules())
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)

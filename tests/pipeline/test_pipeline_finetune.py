"""The opt-in finetune stage: a "LoRA" row, and a "LoRA + <method>" row from the quantize stage."""

import json

from llmpress import cli

SMALL = ["--stages", "finetune,quantize,eval", "--ppl-seq-len", "256", "--ppl-max-windows", "1",
         "--quant-methods", "rtn", "--finetune-quant-method", "rtn", "--finetune-steps", "2",
         "--finetune-batch-size", "1", "--finetune-seq-len", "64"]


def test_finetune_stage_adds_lora_and_quantized_lora_rows(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["pipeline", *SMALL, "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    methods = [r["method"] for r in record["results"]]
    assert methods == ["Baseline (float32)", "LoRA (r8, q/k/v)", "RTN (4-bit g128)", "LoRA + RTN (4-bit g128)"]
    ppl = {r["method"]: r["ppl"] for r in record["results"]}
    assert all(2 < p < 200 for p in ppl.values())
    assert ppl["LoRA (r8, q/k/v)"] != ppl["Baseline (float32)"]  # the merged adapters changed the model
    tuned = record["variants"]["LoRA (r8, q/k/v)"]["finetune"]
    assert tuned["steps"] == 2 and "default:heldout" in tuned["data"]  # trained on calib, told so
    assert "| LoRA + RTN (4-bit g128) |" in (out / "results.md").read_text()

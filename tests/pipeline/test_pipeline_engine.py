"""The pipeline's opt-in engine stage: one more row per model, served N requests at once."""

import json

from llmpress import cli

SMALL = ["--ppl-seq-len", "128", "--ppl-max-windows", "1", "--new-tokens", "4", "--repeats", "1"]


def test_engine_stage_adds_a_row_per_model_with_its_ppl(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["pipeline", *SMALL, "--stages", "quantize,eval,bench,engine", "--quant-methods", "rtn",
                     "--engine-num-prompts", "3", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    rows = {r["method"]: r for r in record["results"]}
    assert len(rows) == 4
    for name in ("Baseline (float32)", "RTN (4-bit g128)"):
        engine_row = rows[f"{name}, engine"]
        assert engine_row["ppl"] == rows[name]["ppl"] and engine_row["throughput_tokens_per_s"] > 0
        assert engine_row["framework"].startswith("llmpress engine (3 requests at once")
        assert record["variants"][f"{name}, engine"]["engine"]["num_prompts"] == 3
    assert "llmpress engine" in (out / "results.md").read_text()


def test_engine_stage_must_come_after_eval_and_bench(tmp_path, capsys):
    assert cli.main(["pipeline", *SMALL, "--stages", "engine,eval", "--out", str(tmp_path / "x")]) == 2
    assert "must come after eval" in capsys.readouterr().err

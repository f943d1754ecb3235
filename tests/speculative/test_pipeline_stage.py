"""The pipeline's opt-in speculative stage adds a lossless row: its own throughput, the base model's PPL."""

import json

from llmpress import cli

SMALL = ["--ppl-seq-len", "128", "--ppl-max-windows", "1", "--new-tokens", "8", "--repeats", "1"]


def test_speculative_stage_adds_a_row_with_the_targets_ppl(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["pipeline", *SMALL, "--stages", "eval,bench,speculative", "--draft", "ngram",
                     "--num-speculative-tokens", "3", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    base, spec = record["results"]
    assert spec["method"] == "Speculative (ngram, k=3; lossless: Baseline (float32) PPL)"
    assert spec["ppl"] == base["ppl"] and spec["throughput_tokens_per_s"] > 0
    metrics = record["variants"][spec["method"]]
    assert metrics["lossless"] and metrics["speculative"]["rounds"] > 0
    assert "Speculative (ngram, k=3" in (out / "results.md").read_text()


def test_speculative_stage_must_come_after_eval_and_bench(tmp_path, capsys):
    assert cli.main(["pipeline", *SMALL, "--stages", "speculative,bench", "--out", str(tmp_path / "x")]) == 2
    assert "must come after bench" in capsys.readouterr().err

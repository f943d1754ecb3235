"""The main job end to end on the embedded model, at a size that runs in well under a minute."""

import json

from llmpress import cli

SMALL = ["--ppl-seq-len", "256", "--ppl-max-windows", "2", "--new-tokens", "8", "--repeats", "1",
         "--quant-methods", "rtn"]  # GPTQ and AWQ are tested in tests/quant; RTN keeps this test short


def test_pipeline_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["pipeline", *SMALL, "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    row, rtn = record["results"]
    assert row["method"] == "Baseline (float32)" and rtn["method"] == "RTN (4-bit g128)"
    assert 2 < row["ppl"] < 100 and row["throughput_tokens_per_s"] > 0
    assert row["ppl"] < rtn["ppl"] < 2 * row["ppl"]  # 4-bit costs some perplexity, not all of it
    assert rtn["throughput_tokens_per_s"] > 0
    assert record["analysis"]["num_params"] == 134_515_008  # SmolLM2-135M, tied embeddings
    markdown = (out / "results.md").read_text()
    assert "| Method | Framework | Throughput (tok/s) | PPL |" in markdown
    assert f"{row['ppl']:.3f}" in markdown and f"{rtn['ppl']:.3f}" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "results.png"]  # no temp files

    # A second run never overwrites the first one's report.
    before = (out / "results.json").read_bytes()
    assert cli.main(["pipeline", *SMALL, "--out", str(out)]) == 2
    assert "already holds a pipeline report" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before


def test_pipeline_rejects_unknown_stage_before_loading(tmp_path, capsys):
    assert cli.main(["pipeline", "--stages", "analyze,quantise", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown pipeline stage(s) quantise" in err and "analyze" in err
    assert not (tmp_path / "x").exists()

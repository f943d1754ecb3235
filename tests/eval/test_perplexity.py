"""Perplexity: the windowing protocol against transformers' own loss, data loading, and `llmpress eval ppl`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from llmpress.errors import LlmpressError
from llmpress.eval import perplexity
from llmpress.eval.data import load_eval_text, rows_from_text
from llmpress.eval.perplexity import (PerplexityConfig, evaluate_perplexity, plan_windows, run_perplexity,
                                      tokenize_for_ppl)
from tests.conftest import hf_pair, tiny_config


def hf_reference_ppl(hf, ids: torch.Tensor, seq_len: int, stride: int, max_windows: int | None = None) -> float:
    """Hugging Face's documented loop: full windows every `stride` tokens, earlier-scored labels set to -100."""
    nll, count, scored_until = 0.0, 0, 0
    with torch.no_grad():
        for n, begin in enumerate(range(0, ids.numel() - seq_len + 1, stride)):
            if n == max_windows:
                break
            window = ids[begin:begin + seq_len][None]
            labels = window.clone()
            labels[:, :max(0, scored_until - begin)] = -100
            scored = int((labels[:, 1:] != -100).sum())  # transformers shifts: label 0 is never predicted
            nll += hf(window, labels=labels).loss.double().item() * scored
            count += scored
            scored_until = begin + seq_len
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def tiny():
    return hf_pair(tiny_config(), seed=0)


@pytest.fixture(scope="module")
def stream():
    # 5 full windows of 64 plus a partial one, which the protocol drops.
    return torch.randint(0, 256, (5 * 64 + 23,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("stride", [None, 64, 40, 24])
def test_matches_transformers_on_tiny_model(tiny, stream, stride):
    hf, ours = tiny
    result = evaluate_perplexity(ours, stream, PerplexityConfig(seq_len=64, stride=stride), progress=False)
    expected = hf_reference_ppl(hf, stream, 64, stride or 64)
    assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert result.stride == (stride or 64)
    if stride is None:
        assert (result.num_windows, result.num_tokens_scored) == (5, 5 * 63)


def test_batching_and_loss_chunks_do_not_change_the_result(tiny, stream, monkeypatch):
    _, ours = tiny
    config = PerplexityConfig(seq_len=64, stride=24)
    one = evaluate_perplexity(ours, stream, config, progress=False)
    monkeypatch.setattr(perplexity, "LOSS_CHUNK_ELEMENTS", 5 * 256)  # 5 rows of logits at a time
    batched = evaluate_perplexity(ours, stream, PerplexityConfig(seq_len=64, stride=24, batch_size=4), progress=False)
    assert batched.num_windows == one.num_windows
    assert batched.num_tokens_scored == one.num_tokens_scored
    assert batched.ppl == pytest.approx(one.ppl, rel=1e-6)


@pytest.mark.parametrize("stride", [64, 24, 1])
def test_windows_score_each_token_at_most_once(stride):
    windows = plan_windows(300, 64, stride)
    scored = [t for w in windows for t in range(w.begin + w.first_scored, w.begin + 64)]
    assert len(scored) == len(set(scored))
    unscored = set(range(windows[-1].begin + 64)) - set(scored)
    # Overlapping windows leave only token 0 unscored; disjoint ones leave each window's first (GPTQ).
    assert unscored == ({0} if stride < 64 else {w.begin for w in windows})
    assert windows[-1].begin + 64 + stride > 300  # no further full window fits
    assert len(plan_windows(300, 64, stride, max_windows=2)) == 2


def test_too_short_text_and_too_long_window_are_clear_errors(tiny):
    _, ours = tiny
    with pytest.raises(LlmpressError, match=r"only 50 tokens.*--seq-len"):
        evaluate_perplexity(ours, torch.zeros(50, dtype=torch.int64), PerplexityConfig(seq_len=64), progress=False)
    with pytest.raises(LlmpressError, match="max_position_embeddings"):
        evaluate_perplexity(ours, torch.zeros(2000, dtype=torch.int64), PerplexityConfig(seq_len=1024), progress=False)
    with pytest.raises(LlmpressError, match="--stride"):
        PerplexityConfig(seq_len=64, stride=65)
    with pytest.raises(LlmpressError, match="no tokenizer"):
        tokenize_for_ppl(None, "text")


# --- the embedded real model ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def default_ids(embedded):
    text, _ = load_eval_text("default")
    return tokenize_for_ppl(embedded.tokenizer, text)


def test_embedded_model_matches_transformers_on_default_text(embedded, hf_embedded, default_ids):
    config = PerplexityConfig(seq_len=256, max_windows=4)
    result = evaluate_perplexity(embedded.model, default_ids, config, progress=False)
    expected = hf_reference_ppl(hf_embedded, default_ids, 256, 256, max_windows=4)
    assert result.num_windows == 4 and result.num_tokens_scored == 4 * 255
    assert result.ppl == pytest.approx(expected, rel=1e-3)
    # A broken tokenizer or weight layout gives hundreds or thousands; SmolLM2-135M is near 35 here.
    assert 2 < result.ppl < 100
    assert run_perplexity(embedded, "default", config, progress=False).ppl == pytest.approx(result.ppl, rel=1e-6)


def test_cli_eval_ppl_writes_json(tmp_path, capsys):
    from llmpress import cli
    out = tmp_path / "results" / "ppl.json"
    assert cli.main(["eval", "ppl", "--max-windows", "1", "--seq-len", "128", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert math.isfinite(record["ppl"]) and record["ppl"] > 1
    assert (record["num_windows"], record["seq_len"], record["data"]) == (1, 128, "default")
    assert "PPL" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["ppl.json"]  # no temporary file left behind
    # A bad --data fails before the model load, as one line and exit code 2.
    assert cli.main(["eval", "ppl", "--data", str(tmp_path / "missing.raw")]) == 2
    assert "missing.raw" in capsys.readouterr().err


# --- data loading ---------------------------------------------------------------------------------

def test_default_text_is_the_packaged_wikitext2_test_split():
    text, description = load_eval_text("default")
    assert text.startswith(" = Robert Boulter = ")
    assert "\r" not in text and len(text) > 1_000_000
    assert "non-empty rows" in description and "not identical" in description


def test_rows_follow_the_hugging_face_wikitext_loader(tmp_path):
    # The loader keeps each line's "\n" and turns whitespace-only lines into "".
    assert rows_from_text(" \n = A = \n \n B .\n") == ["", " = A = \n", "", " B .\n"]
    assert rows_from_text(" = A = \r\n B .") == [" = A = \n", " B ."]
    (tmp_path / "wiki.test.raw").write_bytes(b" \r\n = A = \r\n \r\n B .\r\n")
    text, _ = load_eval_text(str(tmp_path))  # a directory holding wiki.test.raw
    assert text == "\n\n".join(["", " = A = \n", "", " B .\n"])


def test_missing_path_names_the_path():
    with pytest.raises(LlmpressError, match=r"/no/such/wiki\.test\.raw.*--data default"):
        load_eval_text("/no/such/wiki.test.raw")


def test_missing_optional_packages_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(LlmpressError, match="--data PATH"):
        load_eval_text("wikitext2")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    with pytest.raises(LlmpressError, match="pyarrow"):
        load_eval_text(str(tmp_path))


def test_parquet_rows_are_used_as_they_are(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["", " = A = \n", "", " B .\n"]}), tmp_path / "test-00000-of-00001.parquet")
    text, _ = load_eval_text(str(tmp_path))
    assert text == "\n\n".join(["", " = A = \n", "", " B .\n"])

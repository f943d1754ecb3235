"""`llmpress generate/bench --draft ...` on the embedded model, and --draft specs."""

import json

import pytest

from llmpress import cli
from llmpress.errors import LlmpressError
from llmpress.speculative import NGramDrafter, SelfSpeculativeDrafter
from llmpress.speculative.factory import build_drafter
from tests.speculative.helpers import loaded, tiny_model

QUESTION = "What is the capital of France?"


def test_cli_generate_with_a_draft_matches_plain_and_reports_acceptance(capsys, tmp_path):
    plain, spec = tmp_path / "plain.json", tmp_path / "spec.json"
    args = ["generate", "--prompt", QUESTION, "--max-new-tokens", "12"]
    assert cli.main(args + ["--json", str(plain)]) == 0
    capsys.readouterr()
    assert cli.main(args + ["--json", str(spec), "--draft", "self:20", "--num-speculative-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "[speculative self:20, k=3: acceptance" in captured.err and "tokens per target step" in captured.err
    plain_result, = json.loads(plain.read_text())["results"]
    spec_result, = json.loads(spec.read_text())["results"]
    assert spec_result["token_ids"] == plain_result["token_ids"]  # greedy speculative decoding is lossless
    assert spec_result["speculative"]["k"] == 3 and spec_result["speculative"]["rounds"] > 0


def test_cli_bench_with_ngram_draft_reports_speedup(capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--new-tokens", "8", "--repeats", "1", "--draft", "ngram", "--adaptive",
                     "--num-speculative-tokens", "2", "--json", str(out)]) == 0
    assert "speculative (ngram, adaptive k from 2): acceptance" in capsys.readouterr().out
    spec = json.loads(out.read_text())["speculative"]
    assert spec["lossless"] and spec["decode_tokens_per_s"] > 0 and spec["speedup_over_plain"] > 0


def test_bad_options_fail_before_loading(capsys, monkeypatch):
    def no_load(args):
        raise AssertionError("the model should not be loaded when an option is invalid")
    monkeypatch.setattr("llmpress.commands.common.load_from_args", no_load)
    assert cli.main(["generate", "--prompt", "hi", "--draft", "ngram", "--num-speculative-tokens", "0"]) == 2
    assert "--num-speculative-tokens must be at least 1" in capsys.readouterr().err


def test_draft_specs():
    target = loaded(tiny_model(0, num_hidden_layers=3))
    assert isinstance(build_drafter("ngram", target), NGramDrafter)
    assert build_drafter("ngram:5", target).max_ngram == 5
    drafter = build_drafter("self:2", target)
    assert isinstance(drafter, SelfSpeculativeDrafter) and drafter.model.num_layers == 2
    for bad, message in (("self:3", "1 <= N < 3"), ("self:x", "self:N"), ("ngram:0", "ngram:N"),
                         ("int4:fp8", "int4:rtn")):
        with pytest.raises(LlmpressError, match=message):
            build_drafter(bad, target)


def test_mismatched_tokenizer_is_refused():
    from llmpress.speculative import check_same_vocabulary

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    a, b, c = loaded(tiny_model(0)), loaded(tiny_model(1)), loaded(tiny_model(2, vocab_size=300))
    with pytest.raises(LlmpressError, match="vocabulary of 300 tokens but the target has 256"):
        check_same_vocabulary(a, c)
    a.tokenizer, b.tokenizer = Tok({"x": 0, "y": 1}), Tok({"x": 1, "y": 0})
    with pytest.raises(LlmpressError, match="tokenizer maps tokens to different ids"):
        check_same_vocabulary(a, b)
    b.tokenizer = Tok({"x": 0, "y": 1})
    check_same_vocabulary(a, b)  # same vocabulary: accepted

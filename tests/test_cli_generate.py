"""`llmpress generate | chat | bench`: the library functions on the embedded model, and the CLI end to end."""

from __future__ import annotations

import io
import json

import pytest

from llmpress import cli
from llmpress.commands.bench import parse_batch_sizes
from llmpress.commands.chat import ChatSession
from llmpress.commands.generate import generate_text
from llmpress.errors import LlmpressError
from llmpress.generation import Generator, SamplingParams
from llmpress.tokenizer import encode_chat

QUESTION = "What is the capital of France?"


@pytest.fixture
def cli_main():
    return cli.main


# -- library -----------------------------------------------------------------------------------

def test_generate_text_greedy_answers_and_streams(embedded):
    pieces = []
    text, output = generate_text(embedded, QUESTION, SamplingParams(max_new_tokens=32), on_text=pieces.append)
    assert "Paris" in text
    assert "".join(pieces) == text  # the stream is the whole reply, piece by piece
    assert output.finish_reasons == ["stop"]  # <|im_end|> ended it, and is not part of the text
    assert output.token_ids[0, output.num_generated[0] - 1].item() in embedded.stop_token_ids
    assert "<|im_end|>" not in text


def test_generate_text_rejects_empty_and_too_long_prompts(embedded):
    with pytest.raises(LlmpressError, match="empty"):
        generate_text(embedded, " \n", SamplingParams())
    context = embedded.config.max_position_embeddings
    with pytest.raises(LlmpressError, match="context"):
        generate_text(embedded, QUESTION, SamplingParams(max_new_tokens=context))


def test_seeded_sampling_is_reproducible(embedded):
    prompt = encode_chat(embedded.tokenizer, [{"role": "user", "content": "Tell me a story."}])
    generator = Generator(embedded.model, prompt.shape[1] + 12)

    def sample(seed: int) -> list[int]:
        params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=seed, ignore_eos=True)
        return generator.generate(prompt, params).token_ids[0].tolist()

    assert sample(0) == sample(0)
    assert len({tuple(sample(seed)) for seed in (1, 2, 3)}) > 1


def test_chat_session_keeps_history_and_reuses_its_cache(embedded):
    session = ChatSession(embedded, SamplingParams(max_new_tokens=16))
    assert "Paris" in session.reply(QUESTION)[0]
    generator = session.generator
    assert "Berlin" in session.reply("And of Germany?")[0]  # only the history says what "of" refers to
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert session.generator is generator  # the second turn fitted the first turn's cache
    session.reset()
    assert session.messages == []
    with_system = ChatSession(embedded, SamplingParams(max_new_tokens=16), system="Answer in French.")
    with_system.reset()
    assert with_system.messages == [{"role": "system", "content": "Answer in French."}]


# -- CLI (each call loads the model: ~15 s on CPU) ------------------------------------------------

def test_cli_generate_streams_and_writes_json(cli_main, capsys, tmp_path):
    from llmpress.kernels import ops
    out = tmp_path / "gen.json"
    try:  # --int4-tensor-cores switches the GPU kernel; on the CPU (and for a float model) nothing changes
        assert cli_main(["generate", "--prompt", QUESTION, "--max-new-tokens", "16", "--json", str(out),
                         "--int4-tensor-cores"]) == 0
        assert ops.int4_tensor_core_gemv
    finally:
        ops.int4_tensor_core_gemv = False
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "prompt +" in captured.err and "finish: stop" in captured.err  # the stats line
    record = json.loads(out.read_text())
    result, = record["results"]
    assert result["prompt"] == QUESTION and "Paris" in result["text"] and result["text"] in captured.out
    assert record["chat"] is True and record["sampling"]["max_new_tokens"] == 16
    assert 0 < result["new_tokens"] <= 16 and result["ttft_ms"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["gen.json"]  # no temp file left behind


def test_cli_chat_over_a_pipe(cli_main, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{QUESTION}\n/exit\nnever read\n"))
    assert cli_main(["chat", "--max-new-tokens", "24"]) == 0
    out = capsys.readouterr().out
    assert "Paris" in out
    assert out.count("you> ") == 2  # the question, then /exit: nothing after it is read


def test_cli_bench_writes_one_row_per_batch_size(cli_main, capsys, tmp_path):
    out = tmp_path / "bench.json"
    assert cli_main(["bench", "--model", "smollm2-135m", "--batch-sizes", "1,2", "--new-tokens", "8",
                     "--repeats", "1", "--json", str(out)]) == 0
    assert "decode tok/s" in capsys.readouterr().out
    record = json.loads(out.read_text())
    assert [row["batch_size"] for row in record["rows"]] == [1, 2]
    for row in record["rows"]:
        assert row["new_tokens"] == 8 and row["prompt_len"] == record["prompt_len"] > 0
        assert row["decode_tokens_per_s"] > 0 and row["e2e_tokens_per_s"] > 0
        assert 0 < row["roofline_fraction"] and row["roofline_tokens_per_s"] > 0
    assert record["copy_bandwidth_bytes_per_s"] > 0


@pytest.mark.parametrize("sizes", ["a,b", "0", "1,,2", "4,-1"])
def test_cli_bench_rejects_bad_batch_sizes_before_loading(cli_main, capsys, monkeypatch, sizes):
    def no_load(args):
        raise AssertionError("the model should not be loaded when an option is invalid")
    monkeypatch.setattr("llmpress.commands.common.load_from_args", no_load)
    assert cli_main(["bench", "--batch-sizes", sizes]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-sizes" in err and repr(sizes) in err


def test_parse_batch_sizes():
    assert parse_batch_sizes("1") == [1]
    assert parse_batch_sizes("1, 8,32") == [1, 8, 32]


@pytest.mark.parametrize("command,flag,max_batch,expected", [
    ("generate", [], 1, True),  # auto: one sequence stays within the tensor-core GEMV's 8 rows
    ("bench", [], 8, True),
    ("bench", [], 16, False),  # auto: a batch of 16 runs faster on the row layout
    ("serve", [], None, False),  # auto: the engine's batches are unbounded
    ("generate", ["--int4-tensor-cores", "off"], 1, False),
    ("serve", ["--int4-tensor-cores"], None, True),  # the bare flag still means on
])
def test_int4_tensor_cores_auto_follows_the_batch(command, flag, max_batch, expected):
    from llmpress.commands.generate import apply_kernel_args
    from llmpress.kernels import ops
    args = cli.build_parser().parse_args([command, *(["--prompt", "hi"] if command == "generate" else []), *flag])
    saved = ops.int4_tensor_core_gemv
    try:
        apply_kernel_args(args, max_batch=max_batch)
        assert ops.int4_tensor_core_gemv is expected
    finally:
        ops.int4_tensor_core_gemv = saved


@pytest.mark.parametrize("flag,expected", [([], True), (["--int4-accumulate", "off"], False),
                                           (["--int4-accumulate", "on"], True)])
def test_int4_accumulate_switches_the_accumulating_decode(flag, expected):
    from llmpress.commands.generate import apply_kernel_args
    from llmpress.kernels import ops
    args = cli.build_parser().parse_args(["generate", "--prompt", "hi", *flag])
    saved = ops.int4_accumulate_decode
    try:
        apply_kernel_args(args, max_batch=1)
        assert ops.int4_accumulate_decode is expected
    finally:
        ops.int4_accumulate_decode = saved

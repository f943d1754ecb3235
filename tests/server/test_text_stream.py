"""CompletionText: incremental text equals one decode, multi-byte characters stay whole, stop strings cut."""

from __future__ import annotations

import pytest

from llmpress.server.text_stream import CompletionText

TEXT = "Café au lait — 東京 😀 costs 3€, said the naïve señor."


@pytest.fixture(scope="module")
def tokenizer(embedded):
    return embedded.tokenizer


def stream(tokenizer, ids: list[int], stop=None, tokens_per_push: int = 1) -> tuple[list[str], CompletionText]:
    text = CompletionText(tokenizer, stop)
    pieces = []
    for i in range(0, len(ids), tokens_per_push):
        pieces.append(text.push(ids[i:i + tokens_per_push]))
        if text.stopped:
            break
    pieces.append(text.finish())
    return pieces, text


@pytest.mark.parametrize("tokens_per_push", [1, 3])
def test_pieces_join_to_the_full_decode_without_broken_characters(tokenizer, tokens_per_push):
    ids = tokenizer(TEXT).input_ids
    pieces, text = stream(tokenizer, ids, tokens_per_push=tokens_per_push)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in piece for piece in pieces) and not text.stopped


@pytest.mark.parametrize("stop", ["東京", "3€,", "ñor", "lait — "])
def test_stop_string_cuts_the_text_even_across_tokens(tokenizer, stop):
    pieces, text = stream(tokenizer, tokenizer(TEXT).input_ids, stop=["not in the text", stop])
    assert text.stopped
    assert "".join(pieces) == TEXT[:TEXT.index(stop)]


def test_text_that_might_start_a_stop_string_is_held_back_until_it_cannot(tokenizer):
    text = CompletionText(tokenizer, stop=["STOP NOW"])
    released = "".join(text.push(tokenizer(" STOP").input_ids))
    assert "STOP" not in released  # could still become "STOP NOW"
    released += text.push(tokenizer(" later").input_ids) + text.finish()
    assert released == " STOP later" and not text.stopped


def test_no_tokenizer_gives_empty_text():
    text = CompletionText(None, stop=["x"])
    assert text.push([1, 2, 3]) == "" and text.finish() == ""

"""Streaming detokenization: the pieces add up to the full decode, multi-byte characters never split."""

from llmpress.tokenizer import IncrementalDecoder


def test_incremental_pieces_concatenate_to_the_full_decode(embedded):
    tokenizer = embedded.tokenizer
    text = "Café, naïve façade — 東京 🎉🎉 and\n\n  spaced   words; déjà vu! " * 5
    ids = tokenizer(text).input_ids + [tokenizer.eos_token_id] + tokenizer("après").input_ids
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == decoder.printed
    assert all("\ufffd" not in p for p in pieces)

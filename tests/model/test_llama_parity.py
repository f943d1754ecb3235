"""Our Llama equals transformers' LlamaForCausalLM: full forward, cached decode, chunked prefill, every variant."""

from __future__ import annotations

import pytest
import torch

from llmpress.kernels import ops
from llmpress.model import StaticKVCache
from tests.conftest import TINY_VARIANTS, hf_pair, tiny_config

VARIANTS = dict(TINY_VARIANTS, **{"biases-gqa-untied": dict(attention_bias=True, mlp_bias=True)})
BATCH, SEQ_LEN, CACHE_LEN = 2, 40, 64


def random_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def logits_through_cache(model, ids: torch.Tensor, chunk_sizes: list[int]) -> torch.Tensor:
    """Feed `ids` [B, T] through a StaticKVCache in consecutive chunks; returns the logits of every token [B, T, V]."""
    assert sum(chunk_sizes) == ids.shape[1]
    cache = StaticKVCache(model.config, ids.shape[0], CACHE_LEN, model.dtype, model.device)
    logits, start = [], 0
    for size in chunk_sizes:
        positions = torch.arange(start, start + size)
        logits.append(model(ids[:, start:start + size], positions, cache))
        start += size
    return torch.cat(logits, dim=1)


@pytest.fixture(params=list(VARIANTS), ids=list(VARIANTS))
def pair(request):
    """(config, transformers model, our model, input ids [B, T], transformers' full-forward logits [B, T, V])."""
    config = tiny_config(**VARIANTS[request.param])
    hf, ours = hf_pair(config)
    ids = random_ids(config.vocab_size)
    with torch.no_grad():
        expected = hf(ids).logits
    return config, hf, ours, ids, expected


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    _, _, ours, ids, expected = pair
    torch.testing.assert_close(ours(ids), expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_prefill_then_one_token_decode_matches_transformers(pair):
    _, _, ours, ids, expected = pair
    got = logits_through_cache(ours, ids, [25] + [1] * (SEQ_LEN - 25))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_chunked_prefill_matches_transformers(pair):
    _, _, ours, ids, expected = pair
    chunks = [7] * (SEQ_LEN // 7) + [SEQ_LEN % 7]
    got = logits_through_cache(ours, ids, chunks)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@torch.no_grad()
def test_last_only_is_the_last_row_of_the_full_logits(pair):
    _, _, ours, ids, expected = pair
    torch.testing.assert_close(ours(ids, last_only=True), expected[:, -1:], rtol=0, atol=1e-4)


@torch.no_grad()
def test_bfloat16_is_close_to_transformers_bfloat16(pair):
    config, hf, ours, ids, _ = pair
    hf, ours = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    ours.materialize_buffers("cpu")  # as the loader does: rope frequencies stay float32
    expected, got = hf(ids).logits.float(), ours(ids).float()
    assert ours.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in ours.parameters())
    relative_error = ((got - expected).norm() / expected.norm()).item()
    assert relative_error < 2e-2, relative_error


@torch.no_grad()
def test_reference_backend_matches_default_backend(pair):
    _, _, ours, ids, _ = pair
    default_full = ours(ids)
    default_cached = logits_through_cache(ours, ids, [25] + [1] * (SEQ_LEN - 25))
    with ops.use_backend("torch"):
        reference_full = ours(ids)
        reference_cached = logits_through_cache(ours, ids, [25] + [1] * (SEQ_LEN - 25))
    assert ops.get_backend() == "auto"  # the context manager restores the default
    torch.testing.assert_close(reference_full, default_full, rtol=0, atol=1e-5)
    torch.testing.assert_close(reference_cached, default_cached, rtol=0, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("variant", ["llama3-rope-gqa-tied", "linear-rope-untied"])
def test_rope_scaling_changes_the_logits(variant):
    """Guards the parity tests above: the scaled variants really exercise the scaling (40 tokens is enough)."""
    config = tiny_config(**VARIANTS[variant])
    hf, _ = hf_pair(config)
    _, unscaled = hf_pair(tiny_config(**dict(VARIANTS[variant], rope_scaling=None)))
    ids = random_ids(config.vocab_size)
    assert (unscaled(ids) - hf(ids).logits).abs().max() > 1e-3

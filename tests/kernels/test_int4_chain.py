"""kernels/triton_int4_chain.py (CUDA): a layer's o, gate|up, down and next products in one persistent kernel give
the same bits as the four tensor-core GEMVs one after another, eagerly and from a CUDA graph, on any grid, and a
model decoding through it the same logits as without it."""

import pytest
import torch

from llmpress.kernels import ops
from tests.kernels.test_int4_matmul import cuda_only
from tests.kernels.test_int4_rows import random_rows


def weight(k: int, n: int):
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    (qweight, scales, zeros), _, _ = random_rows(k, n, 128, "cuda")
    return (rows_to_fragments(qweight, 128), *fragment_scales_zeros(scales, zeros))


@cuda_only
@pytest.mark.parametrize("with_next", [True, False])
@pytest.mark.parametrize("pdl_mode", ["early", "off"])
def test_chain_gives_the_bits_of_the_gemvs_it_replaces(with_next, pdl_mode, monkeypatch):
    import llmpress.kernels.pdl as pdl
    from llmpress.kernels.triton_int4_chain import frag_chain
    from llmpress.kernels.triton_int4_frag import frag_gemv
    monkeypatch.setattr(pdl, "mode", pdl_mode)
    torch.manual_seed(11)
    H, inner, width = 1024, 2048, 1536  # q|k|v-like next: 1024 + 2 x 256 rows
    o, gate_up, down, nxt = weight(H, H), weight(H, 2 * inner), weight(inner, H), weight(H, width)
    norm1, norm3 = ((torch.rand(H, device="cuda") + 0.5).to(torch.bfloat16) for _ in range(2))
    a = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)

    h1 = frag_gemv(a, *o, 128, residual=h)
    act = frag_gemv(h1, *gate_up, 128, norm_weight=norm1, eps=1e-5, swiglu=True)
    h2 = frag_gemv(act, *down, 128, residual=h1)
    expected_next = frag_gemv(h2, *nxt, 128, norm_weight=norm3, eps=1e-5)

    products = (ops.ChainProduct(*o), ops.ChainProduct(*gate_up, norm1, 1e-5), ops.ChainProduct(*down),
                ops.ChainProduct(*nxt, norm3, 1e-5) if with_next else None)

    def chain(programs=None, layer=0):
        return frag_chain(a, h, *products, 128, layer=layer, programs=programs)

    runs = {"first": chain(), "again": chain(), "5 programs": chain(programs=5),  # few programs: many tiles each
            "133 programs, flags 3": chain(programs=133, layer=3)}
    chain()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain(layer=1)
    for replay in range(2):  # the flags are back at zero after every launch
        graph.replay()
        torch.cuda.synchronize()
        runs[f"graph replay {replay}"] = tuple(t.clone() if t is not None else None for t in captured)
    wrong = {}
    for label, (got_h2, got_next) in runs.items():
        assert (got_next is None) != with_next
        differ = (got_h2 != h2).sum().item() + (0 if got_next is None else (got_next != expected_next).sum().item())
        if differ:
            wrong[label] = differ
    assert not wrong, f"outputs that differ from the GEMVs' (run: elements): {wrong}"


@cuda_only
@pytest.mark.parametrize("quantize_head", [True, False])
def test_model_decoding_through_the_chain_gives_the_same_logits(quantize_head, monkeypatch):
    """The same bits where the head is not in the chain; with an int4 head the chain also folds the final RMSNorm
    into the head's GEMV (the model as written normalizes first), so there the logits only come close."""
    from tests.test_decode_chain import decode_logits, int4_model
    monkeypatch.setattr(ops, "int4_tensor_core_norm", True)  # the steps the chain folds in (the defaults)
    monkeypatch.setattr(ops, "int4_tensor_core_swiglu", True)
    # head_dim 64: the fused RoPE attention kernel, as both paths take it for a 3B
    model = int4_model(quantize_head, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
    for chained, plain in zip(decode_logits(model, True), decode_logits(model, False)):
        if quantize_head:
            torch.testing.assert_close(chained, plain, rtol=0.02, atol=0.05 * plain.abs().max().item())
        else:
            assert torch.equal(chained, plain)

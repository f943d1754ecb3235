"""kernels/triton_int4_accumulate.py (CUDA): the products that add their split-K sums by atomics agree with the
tensor-core GEMV (triton_int4_frag.py) they stand in for, with bf16 or fp32 x, with the RMSNorm and the SwiGLU
ending, eagerly and from a CUDA graph, and a model decoding through them gives the logits of the model as written."""

import pytest
import torch

from tests.kernels.test_int4_chain import weight
from tests.kernels.test_int4_matmul import cuda_only


def close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-2) -> None:
    rel = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert rel < tol, rel


@cuda_only
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1024, 3072])
@pytest.mark.parametrize("config", [None, (4, 1, 2), (4, 2, 2), (4, 1, 4)])
def test_accumulate_adds_the_product_into_an_fp32_vector(x_dtype, n, config, monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    from llmpress.kernels.triton_int4_accumulate import frag_accumulate
    from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton
    if config is not None:  # the tiles CONFIGS picks for the 3B's shapes, and the wide one, on these shapes
        monkeypatch.setattr(accumulate, "CONFIGS", {(n, 2048 // 128): config})
    torch.manual_seed(5)
    k = 2048
    w = weight(k, n)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(1, n, device="cuda", dtype=torch.float32)
    dense = dequantize_fragments_triton(*w, 128, torch.float32).double()
    expected = h.double() + x.double() @ dense.T  # in float64: the sums stay fp32, not rounded to bf16
    out = h.clone()
    frag_accumulate(x.to(x_dtype), *w, 128, out)
    close(out, expected, 1e-5)


@cuda_only
@pytest.mark.parametrize("swiglu", [False, True])
@pytest.mark.parametrize("loads_first", [False, True])
def test_accumulated_norm_matches_the_gemv_with_its_norm_folded(swiglu, loads_first, monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    from llmpress.kernels.triton_int4_accumulate import frag_accumulated_norm
    monkeypatch.setattr(accumulate, "FINISH_LOADS_FIRST", loads_first)
    from llmpress.kernels.triton_int4_frag import frag_gemv
    torch.manual_seed(6)
    k, n = 1024, 4096
    w = weight(k, n)
    norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    h = torch.randn(1, k, device="cuda", dtype=torch.float32) * 3
    expected = frag_gemv(h.to(torch.bfloat16), *w, 128, norm_weight=norm, eps=1e-5, swiglu=swiglu)
    for _ in range(2):  # the second call proves the workspace was zeroed again by the first
        got = frag_accumulated_norm(h, *w, 128, norm, 1e-5, swiglu=swiglu)
        assert got.shape == expected.shape and got.dtype == torch.bfloat16
        close(got, expected)


@cuda_only
def test_accumulate_replays_from_a_cuda_graph():
    from llmpress.kernels.triton_int4_accumulate import frag_accumulate, frag_accumulated_norm
    torch.manual_seed(7)
    k = 1024
    o, gate_up, down = weight(k, k), weight(k, 4096), weight(2048, k)
    norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    a = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    h0 = torch.randn(1, k, device="cuda", dtype=torch.float32)

    def step(h):
        frag_accumulate(a, *o, 128, h)
        act = frag_accumulated_norm(h, *gate_up, 128, norm, 1e-5, swiglu=True)
        frag_accumulate(act, *down, 128, h)
        return h

    eager = step(h0.clone())
    h = h0.clone()
    step(h.clone())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(h)
    for _ in range(3):
        h.copy_(h0)
        graph.replay()
        torch.cuda.synchronize()
        close(h, eager, 1e-3)


@cuda_only
@pytest.mark.parametrize("shape", [(3072, 8192), (2048, 8192), (1024, 2048)])  # (hidden, intermediate): 3B, 1B
def test_down_product_making_silu_gate_times_up_matches_the_finishing_kernel_then_down(shape):
    """frag_accumulate_swiglu (kernels/frag_swiglu_x.py) on CONFIGS' tiles against frag_accumulated_norm's SwiGLU
    ending then frag_accumulate, from the same gate|up sums, and its zero spans cleared."""
    from llmpress.kernels.triton_int4_accumulate import frag_accumulate, frag_accumulate_swiglu, frag_accumulated_norm
    torch.manual_seed(8)
    hidden, inter = shape
    gate_up, down = weight(hidden, 2 * inter), weight(inter, hidden)
    norm = (torch.rand(hidden, device="cuda") + 0.5).to(torch.bfloat16)
    h = torch.randn(1, hidden, device="cuda", dtype=torch.float32) * 3
    expected = h.clone()
    frag_accumulate(frag_accumulated_norm(h, *gate_up, 128, norm, 1e-5, swiglu=True), *down, 128, expected)
    acc = torch.zeros(1, 2 * inter, device="cuda")
    squares = torch.zeros(hidden // 128, device="cuda")
    split = frag_accumulate(h, *gate_up, 128, acc, norm, squares)
    spans = (torch.randn(2 * inter, device="cuda"), torch.randn(5120, device="cuda"))
    got = h.clone()
    frag_accumulate_swiglu(acc.view(-1), squares, split, hidden, 1e-5, *down, 128, got, spans)
    close(got - h, expected - h, 1e-3)  # the same bf16 input but for sigmoid's last bits, sums in another order
    assert not spans[0].any() and not spans[1].any()


@cuda_only
def test_mlp_with_swiglu_in_down_replays_from_a_cuda_graph_over_several_layers():
    """frag_accumulated_mlp over 3 layers' workspaces (each layer's down zeroing the one before, the last layer's
    zeroed by the next step's first), eagerly and as graph replays, against the finishing-kernel path."""
    from llmpress.kernels.triton_int4_accumulate import (frag_accumulate, frag_accumulated_mlp, frag_accumulated_norm,
                                                         qkv_accumulator)
    torch.manual_seed(9)
    k, inter, layers = 1024, 2048, 3
    weights = [(weight(k, 2 * inter), weight(inter, k), (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16))
               for _ in range(layers)]
    h0 = torch.randn(1, k, device="cuda", dtype=torch.float32)

    def reference(h):
        for gate_up, down, norm in weights:
            frag_accumulate(frag_accumulated_norm(h, *gate_up, 128, norm, 1e-5, swiglu=True), *down, 128, h)
        return h

    qkv = qkv_accumulator(h0.device, 1536)

    def step(h):
        for layer, (gate_up, down, norm) in enumerate(weights):
            frag_accumulated_mlp(h, gate_up, down, 128, norm, 1e-5, layers, layer, qkv)
        return h

    expected = reference(h0.clone())
    for _ in range(2):  # a second eager step: the workspaces were left clean (the last layer's by the first down)
        close(step(h0.clone()), expected, 1e-3)
    h = h0.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(h)
    for _ in range(3):
        qkv.fill_(1.0)  # what attention left: the first down zeroes it
        h.copy_(h0)
        graph.replay()
        torch.cuda.synchronize()
        close(h, expected, 1e-3)
        assert not qkv.any()


@cuda_only
@pytest.mark.parametrize("quantize_head", [True, False])
@pytest.mark.parametrize("slots,combine_in_o,swiglu_in_down", [(16, True, False), (300, True, False),
                                                               (300, False, False), (300, True, True)])
@pytest.mark.parametrize("norm_waits", [False, True])  # with it on, session 12's run failed (not isolated)
def test_model_decoding_through_the_accumulating_path_gives_close_logits(quantize_head, slots, combine_in_o,
                                                                         swiglu_in_down, norm_waits, monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    import llmpress.kernels.triton_int4_frag as frag
    from llmpress.kernels import ops
    from tests.test_decode_chain import decode_logits, int4_model
    monkeypatch.setattr(frag, "norm_waits_for_loads", norm_waits)
    monkeypatch.setattr(ops, "int4_tensor_core_norm", True)
    monkeypatch.setattr(ops, "int4_tensor_core_swiglu", True)
    monkeypatch.setattr(ops, "int4_combine_in_o", combine_in_o)
    monkeypatch.setattr(ops, "int4_swiglu_in_down", swiglu_in_down)
    made = []  # the down products that made their own input
    original_mlp = accumulate.frag_accumulated_mlp

    def counting_mlp(*args, **kwargs):
        made.append(args[7])
        return original_mlp(*args, **kwargs)
    monkeypatch.setattr(accumulate, "frag_accumulated_mlp", counting_mlp)
    combined = []  # the splits each o product combined (head size 64 = the group size: the fold applies)
    original = accumulate.frag_accumulate_splits

    def counting(parts, *args):
        combined.append(parts.shape[2])
        return original(parts, *args)
    monkeypatch.setattr(accumulate, "frag_accumulate_splits", counting)
    model = int4_model(quantize_head, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
    for accumulated, plain in zip(decode_logits(model, accumulating=True, slots=slots),
                                  decode_logits(model, slots=slots)):
        torch.testing.assert_close(accumulated, plain, rtol=0.02, atol=0.05 * plain.abs().max().item())
    # 2 layers, 3 steps; 16 slots take one split, 300 take five (64 keys each)
    assert combined == ([1 if slots == 16 else 5] * 6 if combine_in_o else [])
    assert made == ([0, 1] * 3 if swiglu_in_down else [])  # layers 0 and 1 of 3 steps


@cuda_only
@pytest.mark.parametrize("loads_first", [False, True])
def test_attention_reading_the_accumulator_matches_attention_after_the_projection(loads_first, monkeypatch):
    import llmpress.kernels.triton_attention as attention
    from llmpress.kernels.triton_attention import decode_attention_rope_triton
    monkeypatch.setattr(attention, "loads_first", loads_first)
    from llmpress.kernels.triton_int4_accumulate import (frag_accumulated_attention, frag_accumulated_norm,
                                                         qkv_accumulator)
    from llmpress.kernels.triton_int4_frag import frag_gemv
    torch.manual_seed(8)
    k, heads, kv_heads, d, slots, position = 1024, 8, 2, 128, 96, 40
    w = weight(k, (heads + 2 * kv_heads) * d)
    norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    h = torch.randn(1, k, device="cuda", dtype=torch.float32) * 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    caches = [torch.randn(1, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    positions = torch.tensor([position], device="cuda")
    expected_caches = [c.clone() for c in caches]
    qkv = frag_gemv(h.to(torch.bfloat16), *w, 128, norm_weight=norm, eps=1e-5)
    expected = decode_attention_rope_triton(qkv.view(1, 1, -1), heads, inv_freq, *expected_caches, positions)
    got = frag_accumulated_attention(h, *w, 128, norm, 1e-5, heads, inv_freq, *caches, positions)
    close(got, expected)
    for c, e in zip(caches, expected_caches):
        close(c[:, :, position], e[:, :, position])
        assert torch.equal(c[:, :, :position], e[:, :, :position])
    acc = qkv_accumulator(h.device, w[1].shape[1])
    assert acc.abs().sum() > 0  # left for the gate|up finishing kernel to zero
    gate_up = weight(k, 4096)
    frag_accumulated_norm(h, *gate_up, 128, norm, 1e-5, swiglu=True, zero_after=acc)
    torch.cuda.synchronize()
    assert acc.abs().sum() == 0


@cuda_only
@pytest.mark.parametrize("splits", [1, 3, 5, 8])
@pytest.mark.parametrize("config", [None, (4, 1, 2), (4, 2, 1)])
def test_o_product_combines_the_attention_splits_as_it_loads_them(splits, config, monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton
    torch.manual_seed(9)
    heads, d, n = 8, 128, 1024
    if config is not None:
        monkeypatch.setattr(accumulate, "CONFIGS", {(n, heads): config})
    w = weight(heads * d, n)
    parts = torch.randn(1, heads, splits, d, device="cuda") * 2
    lse = torch.randn(1, heads, splits, device="cuda") * 3
    if splits > 2:  # splits past the position: no keys, as the attention kernel leaves them
        parts[:, :, -1] = 0
        lse[:, :, -1] = float("-inf")
    h = torch.randn(1, n, device="cuda", dtype=torch.float32)
    weights = torch.softmax(lse.double(), dim=-1)
    # the kernel rounds each split's output to bf16 (the mma's operand), then weights the products in fp32
    x = (weights[..., None] * parts.to(torch.bfloat16).double()).sum(2).reshape(1, -1)
    dense = dequantize_fragments_triton(*w, 128, torch.float32).double()
    expected = h.double() + x @ dense.T
    out = h.clone()
    accumulate.frag_accumulate_splits(parts, lse, *w, 128, out)
    close(out, expected, 1e-5)


@cuda_only
@pytest.mark.parametrize("slots,position", [(96, 40), (300, 250), (300, 3)])
def test_attention_and_o_in_three_kernels_match_attention_then_o(slots, position):
    from llmpress.kernels.triton_int4_accumulate import (frag_accumulate, frag_accumulated_attention,
                                                         frag_accumulated_attention_o, frag_accumulated_norm,
                                                         qkv_accumulator, splits_combine_fits)
    torch.manual_seed(10)
    k, heads, kv_heads, d = 1024, 8, 2, 128
    qkv_w, o_w = weight(k, (heads + 2 * kv_heads) * d), weight(heads * d, k)
    norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    h = torch.randn(1, k, device="cuda", dtype=torch.float32) * 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    caches = [torch.randn(1, kv_heads, slots, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    positions = torch.tensor([position], device="cuda")
    assert splits_combine_fits(caches[0], o_w[1], 128)
    expected_caches = [c.clone() for c in caches]
    expected = h.clone()
    out = frag_accumulated_attention(h, *qkv_w, 128, norm, 1e-5, heads, inv_freq, *expected_caches, positions)
    frag_accumulate(out.reshape(1, -1), *o_w, 128, expected)
    acc = qkv_accumulator(h.device, qkv_w[1].shape[1])
    frag_accumulated_norm(h, *weight(k, 4096), 128, norm, 1e-5, swiglu=True, zero_after=acc)  # zeroes q|k|v's
    got = h.clone()
    frag_accumulated_attention_o(got, qkv_w, norm, 1e-5, heads, inv_freq, *caches, positions, o_w, 128)
    close(got - h, expected - h, 1e-2)  # what attention and o added (bf16 rounding of the combined output apart)
    for c, e in zip(caches, expected_caches):
        close(c[:, :, position], e[:, :, position])
        assert torch.equal(c[:, :, :position], e[:, :, :position])
    acc.zero_()  # as the layer's gate|up finishing kernel would: the next test's q|k|v starts from zeros


@cuda_only
@pytest.mark.parametrize("rows", [2, 6, 8])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_accumulate_adds_several_rows(rows, x_dtype):
    from llmpress.kernels.triton_int4_accumulate import frag_accumulate
    from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton
    torch.manual_seed(11)
    k, n = 2048, 3072
    w = weight(k, n)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    h = torch.randn(rows, n, device="cuda", dtype=torch.float32)
    dense = dequantize_fragments_triton(*w, 128, torch.float32).double()
    expected = h.double() + x.double() @ dense.T
    out = h.clone()
    frag_accumulate(x.to(x_dtype), *w, 128, out)
    close(out, expected, 1e-5)
    for m in range(rows):  # each row its own, not a neighbour's
        close(out[m], expected[m], 1e-5)


@cuda_only
@pytest.mark.parametrize("rows", [2, 6])
@pytest.mark.parametrize("swiglu,n", [(False, 3072), (True, 4096), (True, 16384)])
def test_accumulated_norm_of_several_rows_matches_the_gemv(rows, swiglu, n):
    from llmpress.kernels.triton_int4_accumulate import frag_accumulated_norm
    from llmpress.kernels.triton_int4_frag import frag_gemv
    torch.manual_seed(12)
    k = 1024
    w = weight(k, n)
    norm = (torch.rand(k, device="cuda") + 0.5).to(torch.bfloat16)
    h = torch.randn(rows, k, device="cuda", dtype=torch.float32) * torch.arange(1, rows + 1, device="cuda")[:, None]
    expected = frag_gemv(h.to(torch.bfloat16), *w, 128, norm_weight=norm, eps=1e-5, swiglu=swiglu)
    for _ in range(2):  # the second call proves the workspace was zeroed again by the first
        got = frag_accumulated_norm(h, *w, 128, norm, 1e-5, swiglu=swiglu)
        assert got.shape == expected.shape and got.dtype == torch.bfloat16
        for m in range(rows):  # rows of different norms: each row's own rsqrt
            close(got[m], expected[m])


@cuda_only
@pytest.mark.parametrize("quantize_head", [True, False])
@pytest.mark.parametrize("triton_attention", [False, True])
@pytest.mark.parametrize("norm_waits", [False, True])
def test_verify_step_through_the_accumulating_path_gives_close_logits(quantize_head, triton_attention, norm_waits,
                                                                      monkeypatch):
    import llmpress.kernels.triton_int4_frag as frag
    from llmpress.kernels import ops
    monkeypatch.setattr(frag, "norm_waits_for_loads", norm_waits)
    from tests.test_decode_accumulate import verify_step_logits
    from tests.test_decode_chain import int4_model
    monkeypatch.setattr(ops, "triton_verify_attention", triton_attention)
    monkeypatch.setattr(ops, "int4_accumulate_rows_into_attention", triton_attention)
    monkeypatch.setattr(ops, "int4_tensor_core_norm", True)
    monkeypatch.setattr(ops, "int4_tensor_core_swiglu", True)
    model = int4_model(quantize_head, "cuda", torch.bfloat16, hidden_size=256, intermediate_size=512)
    accumulated, plain = (verify_step_logits(model, rows, True, device="cuda", slots=64).float() for rows in (True, False))
    assert accumulated.shape == plain.shape == (1, 6, 256)
    torch.testing.assert_close(accumulated, plain, rtol=0.02, atol=0.05 * plain.abs().max().item())

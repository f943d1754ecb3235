"""The tensor-core GEMV's inline PTX (kernels/triton_int4_frag.frag_gemv_asm), run on the CPU by
tests/kernels/ptx_emulator.py, against float64 products of the exactly dequantized weights: every tile, bf16 and
fp32 x, 1 to 8 rows, the folded RMSNorm and its sum(h^2) shares, the atomic and the split-partials endings, the
attention splits combined inside o; then the whole accumulating decode (one token and a verify step) through its
kernels, the Triton ones under Triton's interpreter. This is what CI checks of the asm; the GPU tests
(test_int4_accumulate.py, test_int4_rows.py) check the hardware runs it as emulated."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from tests.kernels.ptx_emulator import EmulatedTileKernel  # noqa: E402
from tests.kernels.test_int4_rows import random_rows  # noqa: E402

TILES = [(4, 2, 1), (4, 1, 2), (4, 2, 2), (4, 1, 4)]


def fragments(K: int, N: int, group_size: int, dtype: torch.dtype = torch.bfloat16):
    """Weights in the tensor-core fragment layout and their float64 dequantization [K, N]."""
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    (qweight, scales, zeros), _, dense = random_rows(K, N, group_size, "cpu")
    return (rows_to_fragments(qweight, group_size), *fragment_scales_zeros(scales.to(dtype), zeros)), dense


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected).norm() / expected.norm()).item()


def b_operand(x: torch.Tensor, dtype: torch.dtype, norm_weight: torch.Tensor | None) -> torch.Tensor:
    """What the mma multiplies the weights by: x rounded to the weights' dtype (times the norm weight, rounded
    again), as float64."""
    b = x.to(dtype)
    return (b if norm_weight is None else b * norm_weight).double()


@pytest.fixture
def emulated_accumulate(monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    kernel = EmulatedTileKernel("accumulate")
    monkeypatch.setattr(accumulate, "_frag_accumulate", kernel)
    return kernel


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("norm,norm_waits", [(False, False), (True, False), (True, True)])
def test_accumulating_product_adds_w_x_into_fp32(tile, rows, x_dtype, norm, norm_waits, emulated_accumulate,
                                                 monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    import llmpress.kernels.triton_int4_frag as frag
    monkeypatch.setattr(accumulate, "tile_config", lambda N, G, M=1, must_fit=True: tile)
    monkeypatch.setattr(frag, "norm_waits_for_loads", norm_waits)
    torch.manual_seed(rows)
    K, N, group_size = 512, 1024, 128
    weights, dense = fragments(K, N, group_size)
    x = (torch.randn(rows, K) * 2).to(x_dtype)
    norm_weight = (torch.rand(K) + 0.5).to(torch.bfloat16) if norm else None
    start = torch.randn(rows, N)  # the residual stream the product adds into
    out, squares = start.clone(), torch.full((64,), float("nan"))
    split = accumulate.frag_accumulate(x, *weights, group_size, out, norm_weight, squares if norm else None)
    assert emulated_accumulate.launches == 1 and split == K // group_size // tile[1]
    expected = b_operand(x, torch.bfloat16, norm_weight) @ dense
    assert relative(out - start, expected) < 1e-5
    if norm:  # share s of row m at s * rows + m: each row's sum of squares of x as rounded for the mma
        shares = squares[:split * rows].view(split, rows).double().sum(0)
        torch.testing.assert_close(shares, x.to(torch.bfloat16).double().pow(2).sum(1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_default_tiles_of_the_3b_and_1b_shapes(dtype, emulated_accumulate):
    """The tiles the accumulating decode picks (CONFIGS) for the 3B's o and down and the 1B's q|k|v, o and down
    (eight warps of two row tiles, one group a warp, ...), at one row of fp32 x, in both activation dtypes."""
    import llmpress.kernels.triton_int4_accumulate as accumulate
    torch.manual_seed(0)
    for K, N in [(3072, 3072), (8192, 3072), (2048, 3072), (2048, 2048), (8192, 2048)]:
        weights, dense = fragments(K, N, 128, dtype)
        x = torch.randn(1, K)
        norm_weight = (torch.rand(K) + 0.5).to(dtype)
        out, squares = torch.zeros(1, N), torch.zeros(64)
        accumulate.frag_accumulate(x, *weights, 128, out, norm_weight, squares)
        tile = accumulate.tile_config(N, K // 128)
        assert relative(out, b_operand(x, dtype, norm_weight) @ dense) < 1e-5, (K, N, tile)


@pytest.mark.parametrize("splits", [1, 3, 8])
@pytest.mark.parametrize("tile", [(4, 2, 1), (4, 1, 2)])
def test_o_product_combines_attention_splits_as_it_loads_them(splits, tile, emulated_accumulate, monkeypatch):
    import llmpress.kernels.triton_int4_accumulate as accumulate
    monkeypatch.setattr(accumulate, "tile_config", lambda N, G, M=1, must_fit=True: tile)
    torch.manual_seed(splits)
    heads, head_dim, N = 8, 64, 512  # a head per quantization group
    weights, dense = fragments(heads * head_dim, N, head_dim)
    parts = torch.randn(1, heads, splits, head_dim)
    lse = torch.randn(1, heads, splits) * 3
    if splits > 1:  # splits past the position have no keys: no weight (their output is 0, as the kernel stores)
        lse[0, 1, 1:] = float("-inf")
        parts[0, 1, 1:] = 0.0
    out = torch.zeros(1, N)
    accumulate.frag_accumulate_splits(parts, lse, *weights, head_dim, out)
    share = torch.softmax(lse.double(), dim=-1)  # each split's share of its head's softmax mass
    combined = (share[..., None] * parts.to(torch.bfloat16).double()).sum(2)  # [1, heads, head_dim]
    assert relative(out, combined.reshape(1, -1) @ dense) < 1e-5


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_split_gemv_partials_sum_to_w_x(rows, norm, dtype, monkeypatch):
    """frag_gemv's partials (reduction="none": the asm's own ending, without the Triton reduction after it)."""
    import llmpress.kernels.triton_int4_frag as frag
    kernel = EmulatedTileKernel("gemv")
    monkeypatch.setattr(frag, "_frag_gemv", kernel)
    torch.manual_seed(rows)
    K, N, group_size = 512, 768, 64
    weights, dense = fragments(K, N, group_size, dtype)
    x = torch.randn(rows, K).to(dtype)
    norm_weight = (torch.rand(K) + 0.5).to(dtype) if norm else None
    partials = frag.frag_gemv(x, *weights, group_size, norm_weight=norm_weight, eps=1e-5, reduction="none")
    assert kernel.launches == 1 and partials.shape[1:] == (rows, N)
    assert relative(partials.sum(0), b_operand(x, dtype, norm_weight) @ dense) < 1e-5


def emulated_decode(*cases: str) -> list[dict]:
    """tests/kernels/emulated_decode.py's results (a process of its own: the interpreter is picked at import)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "tests.kernels.emulated_decode", *cases], env=env,
                            capture_output=True, text=True, timeout=900,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_accumulating_decode_through_its_kernels_gives_the_logits_of_the_layers_as_written():
    """One-token steps: q|k|v into the accumulator attention reads, the attention's splits combined in o (one split
    over 16 slots, five over 300) or by their own kernel, the int4 head or not; fp16 and bf16; silu(gate) * up made
    by the down product (`:sd`, a workspace per layer). The bound is the activation dtype's rounding over two layers
    (the GPU test allows 5% of the largest logit)."""
    cases = ["decode:1:16:1:bf16", "decode:1:300:1:bf16", "decode:0:300:0:bf16", "decode:1:300:1:fp16",
             "decode:1:300:1:bf16:sd", "decode:0:16:0:bf16:sd"]
    for case, result in zip(cases, emulated_decode(*cases)):
        assert result["case"] == case and len(result["errors"]) == 3
        # 3 steps x (2 layers x 4 products + the int4 head)
        assert result["launches"] == 3 * (8 + (case.split(":")[1] == "1"))
        assert result["triton_attention_calls"] == 3 * 2  # a kernel a layer and step
        assert result["dirty_workspaces"] == []  # every accumulator zeroed again by the kernel that read it
        assert max(result["errors"]) < (0.004 if case.endswith("fp16") else 0.04), result
        swiglu_in_down = case.endswith(":sd")
        assert ({"mlp:2:0", "mlp:2:1"} <= set(result["workspaces"])) == swiglu_in_down, result["workspaces"]


def test_accumulating_verify_step_through_its_kernels_gives_the_logits_of_the_layers_as_written():
    """A 6-token verify step (ops.int4_accumulate_rows): the products over 6 rows, their finishing kernel a row
    per grid column; its attention by the layer's own PyTorch path or (ops.triton_verify_attention) by the Triton
    decode kernel taking all 6 queries, each scaled by its own norm from the q|k|v accumulator, rotated and stored
    by the kernel."""
    cases = ["verify:1:bf16", "verify:0:fp16", "verify:1:bf16:triton", "verify:0:fp16:triton"]
    for case, result in zip(cases, emulated_decode(*cases)):
        assert result["case"] == case and len(result["errors"]) == 6
        assert result["launches"] == 8 + (case.split(":")[1] == "1")
        assert result["triton_attention_calls"] == (2 if case.endswith("triton") else 0)
        assert result["dirty_workspaces"] == []
        assert max(result["errors"]) < (0.004 if "fp16" in case else 0.04), result


def test_rope_attention_of_several_new_tokens_through_the_interpreter_matches_float64():
    """The Triton RoPE decode kernel taking a verify step's T tokens (rows query-major, RoPE's cos and sin once a
    token, broadcast over its heads): the 3B's and 1B's head layouts, multi-head and one KV head, bf16 or the
    accumulator scaled per token. The bound is bf16's rounding of the softmax weights (the same cases give the same
    errors as the kernel did with rows head-major and cos and sin a row)."""
    cases = ["attention:24:8:128:320:60:6", "attention:24:8:128:320:60:6:scaled", "attention:32:8:64:300:250:6:scaled",
             "attention:8:8:128:64:56:2", "attention:4:1:64:256:193:8"]
    for case, result in zip(cases, emulated_decode(*cases)):
        assert result["case"] == case and result["rest_unchanged"], result
        assert result["error"] < 0.03 and result["cache_error"] <= 0.0625, result


def swiglu_reference(gate_up: torch.Tensor, shares: torch.Tensor, norm_k: int, eps: float) -> torch.Tensor:
    """silu(r gate) * (r up) [1, K] with the finishing kernel's bf16 roundings (triton_int4_frag._finish_swiglu),
    as float64."""
    gate, up = gate_up.double().chunk(2)
    r = torch.rsqrt(shares.double().sum() / norm_k + eps)
    gate, up = (gate * r).to(torch.bfloat16).double(), (up * r).to(torch.bfloat16).double()
    silu = (gate * torch.sigmoid(gate)).to(torch.bfloat16).double()
    return (silu * up).to(torch.bfloat16).double()[None]


@pytest.mark.parametrize("tile", TILES)
@pytest.mark.parametrize("group_size", [64, 128])
def test_down_product_makes_silu_gate_times_up_from_the_accumulator(tile, group_size, monkeypatch):
    """frag_gemv_asm(swiglu_x=...): the B operand made in the tile from fp32 gate|up sums and sum(h^2) shares, a
    lane computing an eighth of its j's pairs and shuffling them; then both zero spans cleared, nothing else."""
    import llmpress.kernels.triton_int4_accumulate as accumulate
    kernel = EmulatedTileKernel("swiglu")
    monkeypatch.setattr(accumulate, "_frag_accumulate_swiglu", kernel)
    monkeypatch.setattr(accumulate, "tile_config", lambda N, G, M=1, must_fit=True: tile)
    torch.manual_seed(group_size + tile[1])
    K, N, norm_k, eps, split = 512, 1024, 384, 1e-5, 37  # 37 shares: two per lane at most
    weights, dense = fragments(K, N, group_size)
    gate_up = torch.randn(2 * K) * 40  # sums of W (w h), before the norm's rsqrt
    gate_up[:8] = torch.tensor([200.0, -200.0, 0.0, -0.0, 1e-3, -1e-3, 30.0, -30.0])  # silu's tails and zero
    shares = torch.rand(split) * 1000
    start = torch.randn(1, N)
    out = start.clone()
    zero_a, zero_b = torch.randn(2 * K), torch.randn(40012)  # zero_b: more than one store a thread on every tile
    accumulate.frag_accumulate_swiglu(gate_up, shares, split, norm_k, eps, *weights, group_size, out,
                                      (zero_a, zero_b))
    assert kernel.launches == 1
    expected = swiglu_reference(gate_up, shares, norm_k, eps) @ dense
    assert relative(out - start, expected) < 1e-5
    assert not zero_a.any() and not zero_b.any()

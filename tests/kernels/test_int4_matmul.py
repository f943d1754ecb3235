"""int4 matmul: the op's reference path on CPU, and the Triton W4A16 kernel against exact dequantization on CUDA."""

import pytest
import torch

from llmpress.kernels import ops
from llmpress.quant.format import pack_columns, pack_rows

cuda_only = pytest.mark.skipif(not ops.triton_available(), reason="Triton kernels need a CUDA GPU")


def random_int4(K: int, N: int, group_size: int, act_order: bool, device: str):
    """Runtime-layout 4-bit weights (quant/format.py) and their exact float64 dequantization [K, N]."""
    levels = torch.randint(0, 16, (K, N), device=device)
    zeros = torch.randint(0, 16, (K // group_size, N), device=device)
    scales = (torch.rand(K // group_size, N, device=device) * 0.01 + 0.002).to(torch.bfloat16)
    g_idx = (torch.randperm(K, device=device) // group_size).int() if act_order else None
    g = g_idx.long() if act_order else torch.arange(K, device=device) // group_size
    dense = (levels - zeros[g]).double() * scales.double()[g]
    return (pack_rows(levels, 4), scales, pack_columns(zeros, 4), g_idx), dense


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("act_order", [False, True])
def test_int4_matmul_reference_path_on_cpu(act_order):
    torch.manual_seed(0)
    packed, dense = random_int4(256, 64, 64, act_order, "cpu")
    x = torch.randn(3, 256, dtype=torch.float32)
    out = ops.int4_matmul(x, *packed, group_size=64, bits=4)
    assert rel_error(out, x.double() @ dense) < 1e-5


@cuda_only
@pytest.mark.parametrize("M", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("K,N", [(256, 64), (1024, 3072), (3072, 1024)])
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_int4_matmul_matches_dequantized_weights(M, K, N, act_order):
    torch.manual_seed(M * K + N)
    packed, dense = random_int4(K, N, 128, act_order, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    with ops.use_backend("triton"):
        out = ops.int4_matmul(x, *packed, group_size=128, bits=4)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_error(out, x.double() @ dense) < 1e-2


@cuda_only
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("K,N", [(576, 1536), (3072, 5120), (8192, 3072)])
def test_triton_gemv_matches_linear(M, K, N):
    from llmpress.kernels.triton_gemv import gemv_triton
    torch.manual_seed(K + N + M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    assert rel_error(gemv_triton(x, w), ref) < 1e-2

"""The Triton W4A16 kernel against exact dequantization (GPU only; CPU runs the reference path)."""

import pytest
import torch

from llmpress.kernels import ops

pytestmark = pytest.mark.skipif(not ops.triton_available(), reason="Triton kernels need a CUDA GPU")


@pytest.mark.parametrize("M", [1, 3, 16, 17, 300])
@pytest.mark.parametrize("K,N", [(256, 64), (1024, 3072), (3072, 1024)])
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_matmul_matches_dequantized_weights(M, K, N, act_order):
    import sys
    sys.path.insert(0, "benchmarks")
    from kernels_gpu import GROUP, random_int4, rel_error
    from llmpress.kernels.triton_int4 import int4_matmul_triton
    torch.manual_seed(M * K + N)
    (qw, scales, qz, g_idx), dense = random_int4(K, N, act_order)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = int4_matmul_triton(x, qw, scales, qz, g_idx, GROUP)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_error(out, x.float() @ dense) < 1e-2


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("K,N", [(576, 1536), (3072, 5120), (8192, 3072)])
def test_triton_gemv_matches_linear(M, K, N):
    from llmpress.kernels.triton_gemv import gemv_triton
    torch.manual_seed(K + N + M)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ w.double().T
    out = gemv_triton(x, w)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2

"""The row layout for int4 weights: exact conversion from the GPTQ runtime layout, its reference matmul
(CPU), QuantLinear switching to it unchanged, and the Triton kernels against exact dequantization (CUDA)."""

import pytest
import torch

from llmpress.kernels import ops
from llmpress.kernels.reference import int4_matmul_rows_reference
from llmpress.quant.format import RuntimeQuantWeight, rows_to_runtime, runtime_to_rows
from llmpress.quant.linear import QuantLinear, use_row_layouts
from llmpress.quant.rtn import quantize_rtn
from llmpress.quant.scheme import QuantScheme
from tests.kernels.test_int4_matmul import cuda_only, random_int4, rel_error


def random_rows(K: int, N: int, group_size: int, device: str):
    (qweight, scales, qzeros, _), dense = random_int4(K, N, group_size, False, device)
    rt = RuntimeQuantWeight(qweight, scales, qzeros, None, group_size, 4)
    return runtime_to_rows(rt), rt, dense


@pytest.mark.parametrize("K,N,group_size", [(256, 64, 64), (512, 48, 128), (128, 40, 32)])
def test_row_layout_round_trips_and_its_reference_is_exact(K, N, group_size):
    torch.manual_seed(K + N)
    (qweight, scales, zeros), rt, dense = random_rows(K, N, group_size, "cpu")
    assert qweight.shape == (N, K // 8) and scales.shape == zeros.shape == (N, K // group_size)
    back = rows_to_runtime(qweight, scales, zeros, group_size)
    assert torch.equal(back.qweight, rt.qweight) and torch.equal(back.qzeros, rt.qzeros) and torch.equal(back.scales, rt.scales)
    x = torch.randn(3, K, dtype=torch.float64)
    assert rel_error(int4_matmul_rows_reference(x, qweight, scales, zeros, group_size), x @ dense) < 1e-12
    assert rel_error(ops.int4_matmul_rows(x.float(), qweight, scales, zeros, group_size), x @ dense) < 1e-5


def test_quant_linear_gives_the_same_outputs_after_switching_layout():
    torch.manual_seed(0)
    weight = torch.randn(96, 256)
    scheme = QuantScheme(bits=4, group_size=64)
    layer = QuantLinear.from_quantized(quantize_rtn(weight, scheme), bias=torch.randn(96), dtype=torch.float32)
    x = torch.randn(2, 5, 256)
    before, dense, unpacked = layer(x), layer.dequantize_weight(), layer.quantized_weight(scheme)
    assert layer.use_row_layout() and layer.row_layout and layer.qweight is None
    assert {"qweight_rows", "scales_rows", "zeros_rows"} <= set(layer.state_dict()) and "qweight" not in layer.state_dict()
    assert torch.allclose(layer(x), before, atol=1e-5)
    assert torch.equal(layer.dequantize_weight(), dense)
    after = layer.quantized_weight(scheme)  # what a checkpoint saves is unchanged
    assert all(torch.equal(getattr(after, f), getattr(unpacked, f)) for f in ("qweight", "scales", "zeros", "g_idx"))
    assert "layout=rows" in repr(layer)


def test_layers_the_row_kernels_cannot_take_keep_their_layout():
    torch.manual_seed(1)
    weight = torch.randn(64, 256)
    act_order = quantize_rtn(weight, QuantScheme(bits=4, group_size=64))
    act_order.g_idx = (torch.randperm(256) // 64).int()  # a GPTQ desc_act permutation
    eight_bit = quantize_rtn(weight, QuantScheme(bits=8, group_size=64))
    model = torch.nn.Sequential(QuantLinear.from_quantized(act_order), QuantLinear.from_quantized(eight_bit),
                                QuantLinear.from_quantized(quantize_rtn(weight, QuantScheme(bits=4, group_size=64))))
    assert use_row_layouts(model) == 1
    assert [m.row_layout for m in model] == [False, False, True]
    assert use_row_layouts(model) == 0  # idempotent


@cuda_only
@pytest.mark.parametrize("M", [1, 2, 4, 5, 16, 300])
@pytest.mark.parametrize("K,N,group_size", [(256, 64, 128), (3072, 1024, 128), (8192, 3072, 128), (3072, 8200, 64),
                                            (1024, 40, 32)])
def test_triton_row_kernels_match_dequantized_weights(M, K, N, group_size):
    torch.manual_seed(M * K + N)
    (qweight, scales, zeros), _, dense = random_rows(K, N, group_size, "cuda")
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    with ops.use_backend("triton"):
        out = ops.int4_matmul_rows(x, qweight, scales, zeros, group_size)
    assert out.shape == (M, N) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert rel_error(out, x.double() @ dense) < 1e-2


@cuda_only
@pytest.mark.parametrize("split_k", [2, 4])
def test_triton_row_gemv_split_k_resets_its_counters(split_k):
    from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
    torch.manual_seed(split_k)
    K, N = 3072, 3072
    (qweight, scales, zeros), _, dense = random_rows(K, N, 128, "cuda")
    config = dict(family="gemv", BLOCK_N=32, BLOCK_K=256, SPLIT_K=split_k, num_warps=4, num_stages=2)
    for M in (1, 3, 4) * 3:  # repeated calls: the arrival counters must be back at zero each time
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        assert rel_error(int4_matmul_rows_triton(x, qweight, scales, zeros, 128, config), x.double() @ dense) < 1e-2


@cuda_only
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_row_mma_split_k_resets_its_counters(groups, dtype):
    from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
    torch.manual_seed(groups)
    K, N = 8192, 3072  # 64 groups: 64 or 16 programs along K per tile of rows
    (qweight, scales, zeros), _, dense = random_rows(K, N, 128, "cuda")
    config = dict(family="mma", BLOCK_N=64, GROUPS=groups, num_warps=4)
    for M in (1, 7, 16) * 3:  # repeated calls: the arrival counters must be back at zero each time
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        out = int4_matmul_rows_triton(x, qweight, scales.to(dtype), zeros, 128, config)
        assert out.dtype == dtype and rel_error(out, x.double() @ dense) < 1e-2


@cuda_only
@pytest.mark.parametrize("K,N", [(3072, 5120), (8192, 3072), (3072, 1000)])
def test_triton_row_half2_gemv_matches_dequantized_weights(K, N):
    """The experimental half2 GEMV (fp16 pair arithmetic in inline PTX), every configuration that fits."""
    from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
    from llmpress.kernels.triton_int4_rows_half2 import HALF2_CONFIGS, half2_fits
    torch.manual_seed(K + N)
    (qweight, scales, zeros), _, dense = random_rows(K, N, 128, "cuda")
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16) * 30  # large activations: the fp16 sums must not overflow
    for block_n, groups, warps in [c for c in HALF2_CONFIGS if half2_fits(N, K // 128, c[0], c[1])]:
        config = dict(family="half2", BLOCK_N=block_n, GROUPS=groups, num_warps=warps)
        for _ in range(2):  # split-K counters back at zero
            assert rel_error(int4_matmul_rows_triton(x, qweight, scales, zeros, 128, config), x.double() @ dense) < 1e-2


@cuda_only
@pytest.mark.parametrize("K,N,group_size", [(3072, 5120, 128), (8192, 3072, 128), (3072, 1000, 128), (1024, 768, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_row_split_gemv_matches_dequantized_weights(K, N, group_size, dtype):
    """The split-tile GEMV, every configuration that fits, with and without inline PTX, both reductions (torch
    sum of its partials, and in the kernel, twice so the arrival counters are back at zero), its tuned
    dispatch and the custom op the model calls."""
    from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
    from llmpress.kernels.triton_int4_rows_split import SPLIT_CONFIGS, split_fits, split_gemv_rows
    torch.manual_seed(K + N)
    (qweight, scales, zeros), _, dense = random_rows(K, N, group_size, "cuda")
    scales = scales.to(dtype)
    x = torch.randn(1, K, device="cuda", dtype=dtype)
    ref = x.double() @ dense
    G = K // group_size
    for block_n, groups, warps in SPLIT_CONFIGS:
        config = dict(BLOCK_N=block_n, GROUPS=groups, num_warps=warps)
        for use_asm in (False, True):  # plain Triton and the inline-PTX word dot
            if split_fits(N, G, block_n, groups, in_kernel=False):
                partials = split_gemv_rows(x, qweight, scales, zeros, group_size, dict(config, USE_ASM=use_asm))
                assert partials.shape == (G // groups, N) and rel_error(partials.sum(0, keepdim=True), ref) < 1e-5
        if split_fits(N, G, block_n, groups, in_kernel=True):
            for _ in range(2):
                y = split_gemv_rows(x, qweight, scales, zeros, group_size, config, reduce="in_kernel")
                assert y.dtype == dtype and rel_error(y, ref) < 1e-2
    for family in ("split", "split_partials"):
        assert rel_error(int4_matmul_rows_triton(x, qweight, scales, zeros, group_size, {"family": family}), ref) < 1e-2
    for reduce in ("in_kernel", "partials"):
        ops.int4_batch1_reduce = reduce
        try:
            y = ops.int4_matmul_rows(x, qweight, scales, zeros, group_size)
        finally:
            ops.int4_batch1_reduce = "in_kernel"
        assert y.shape == (1, N) and y.dtype == dtype and rel_error(y, ref) < 1e-2


@cuda_only
@pytest.mark.parametrize("K,N,group_size,dtype", [(8192, 3072, 128, torch.bfloat16), (3072, 1000, 128, torch.bfloat16),
                                                  (1024, 768, 64, torch.float16)])
def test_triton_split_gemv_fuses_norm_silu_and_residual(K, N, group_size, dtype):
    """The split GEMV with the layer's steps folded in (RMSNorm before, silu * up before, residual add after), on
    tiles of 1, 2 and 4 groups (masked rows at N = 1000) with and without inline PTX, against those steps done in
    float64; then QuantLinear.forward_fused (one kernel) against the same steps run one by one. (The tiles alone
    are covered by the test above; few tiles here keep the GPU compile time of the variants down.)"""
    import torch.nn.functional as F
    from llmpress.kernels.triton_int4_rows_split import split_fits, split_gemv_rows
    from llmpress.model.llama import RMSNorm
    torch.manual_seed(K + N + 1)
    (qweight, scales, zeros), rt, dense = random_rows(K, N, group_size, "cuda")
    scales = scales.to(dtype)
    h = torch.randn(1, K, device="cuda", dtype=dtype) * 3
    gate_up = torch.randn(1, 2 * K, device="cuda", dtype=dtype)
    residual = torch.randn(1, N, device="cuda", dtype=dtype)
    norm = RMSNorm(K, 1e-5).to("cuda", dtype)
    norm.weight.data = (torch.rand(K, device="cuda") + 0.5).to(dtype)
    h64 = h.double()
    normed = h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    silu_up = F.silu(gate_up[:, :K].double()) * gate_up[:, K:].double()
    cases = [(dict(prologue="rmsnorm", norm_weight=norm.weight, eps=1e-5), h, normed @ dense),
             (dict(prologue="silu_mul"), gate_up, silu_up @ dense),
             (dict(residual=residual), h, residual.double() + h64 @ dense),
             (dict(prologue="silu_mul", residual=residual), gate_up, residual.double() + silu_up @ dense)]
    G = K // group_size
    for block_n, groups, warps in [(128, 1, 4), (128, 2, 8), (64, 4, 4)]:
        assert split_fits(N, G, block_n, groups, in_kernel=True)
        for use_asm, spread in [(False, False), (True, False), (True, True)]:  # spread: the prologue on its own tile
            config = dict(BLOCK_N=block_n, GROUPS=groups, num_warps=warps, USE_ASM=use_asm, SPREAD=spread)
            for kwargs, x, ref in cases:
                y = split_gemv_rows(x, qweight, scales, zeros, group_size, config, reduce="in_kernel", **kwargs)
                assert y.dtype == dtype and rel_error(y, ref) < 1e-2, (block_n, groups, use_asm, spread, list(kwargs))
    layer = QuantLinear.from_runtime(RuntimeQuantWeight(rt.qweight, rt.scales.to(dtype), rt.qzeros, None, group_size, 4))
    assert layer.use_row_layout()
    for kwargs, x in [(dict(norm=norm), h), (dict(silu_mul=True), gate_up), (dict(residual=residual), h),
                      (dict(silu_mul=True, residual=residual), gate_up)]:
        default = ops.int4_fused_steps
        try:
            ops.int4_fused_steps = ops.INT4_LAYER_STEPS  # every step folded in, whatever the default
            fused = layer.forward_fused(x[None], **kwargs)  # [1, 1, K]: the model's shape
            ops.int4_fused_steps = frozenset()
            apart = layer.forward_fused(x[None], **kwargs)
        finally:
            ops.int4_fused_steps = default
        assert fused.shape == apart.shape == (1, 1, N) and rel_error(fused, apart) < 1e-2, list(kwargs)


@cuda_only
def test_triton_split_gemv_with_pdl_gives_the_same_bits():
    """Launched with programmatic dependent launch (early or late trigger), the split GEMV reads the weights
    before it waits and everything else after: same tile, same arithmetic, so the same bits as without PDL,
    also back to back in one stream with the workspace they share."""
    import llmpress.kernels.pdl as pdl
    from llmpress.kernels.triton_int4_rows_split import split_gemv_rows
    torch.manual_seed(5)
    (qweight, scales, zeros), _, dense = random_rows(3072, 1024, 128, "cuda")
    h = torch.randn(1, 3072, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, 1024, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.rand(3072, device="cuda", dtype=torch.bfloat16) + 0.5
    config = dict(BLOCK_N=128, GROUPS=2, num_warps=4)
    runs = []
    default = pdl.mode, pdl.split_gemv
    pdl.split_gemv = True  # off by default (measured slower): switched on to test it
    try:
        for mode in ("off", "early", "late"):
            pdl.mode = mode
            runs.append([split_gemv_rows(h, qweight, scales, zeros, 128, config, reduce="in_kernel", prologue="rmsnorm",
                                         norm_weight=norm_weight, eps=1e-5, residual=residual) for _ in range(3)])
    finally:
        pdl.mode, pdl.split_gemv = default
    assert rel_error(runs[0][0], residual.double() + (h.double() * torch.rsqrt(h.double().pow(2).mean() + 1e-5)
                                                      * norm_weight.double()) @ dense) < 1e-2
    assert all(torch.equal(runs[0][0], y) for run in runs for y in run)


@cuda_only
@pytest.mark.parametrize("M", [1, 3, 4])
def test_triton_row_paths_agree(M):
    """The tensor-core GEMV, the CUDA-core GEMV (forced at every M they take) and dequantize + cuBLAS give the
    same products."""
    from llmpress.kernels.triton_int4_rows import int4_matmul_rows_triton
    torch.manual_seed(M)
    (qweight, scales, zeros), _, dense = random_rows(3072, 1024, 128, "cuda")
    x = torch.randn(M, 3072, device="cuda", dtype=torch.bfloat16)
    outs = [int4_matmul_rows_triton(x, qweight, scales, zeros, 128, {"family": f}) for f in ("mma", "gemv", "dequant")]
    assert all(rel_error(out, x.double() @ dense) < 1e-2 for out in outs)


def test_int4_projections_fuse_in_the_row_layout_without_changing_outputs():
    from llmpress.model import LlamaForCausalLM
    from llmpress.model.fusion import fuse_projections, unfuse_projections
    from llmpress.quant.calibration import quantize_model
    from llmpress.quant.linear import replace_linears
    from tests.conftest import tiny_config
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    with torch.no_grad():
        replace_linears(model, quantize_model(model, "rtn", QuantScheme(bits=4, group_size=32), progress=False))
        ids = torch.randint(0, 256, (2, 9))
        before = model(ids)
        assert fuse_projections(model) == 0  # the GPTQ layout does not fuse
        assert use_row_layouts(model) == 7 * 2
        keys = set(model.state_dict())
        assert fuse_projections(model) == 2 * 2  # q|k|v and gate|up in each of the 2 layers
        assert set(model.state_dict()) == keys  # the fused layers are not submodules: names unchanged
        attn = model.model.layers[0].self_attn
        fused = attn.qkv_packed[0]
        assert fused.out_features == attn.q_proj.out_features + 2 * attn.k_proj.out_features
        assert attn.v_proj.qweight_rows.untyped_storage().data_ptr() == fused.qweight_rows.untyped_storage().data_ptr()
        calls, forward = [], fused.forward
        fused.forward = lambda x: calls.append(x.shape) or forward(x)
        assert torch.allclose(model(ids), before, atol=1e-5)
        assert calls  # the fused layer did the work
        unfuse_projections(model)
        assert not attn.qkv_packed and not model.model.layers[1].mlp.gate_up_packed
        assert torch.allclose(model(ids), before, atol=1e-5)


def test_fragments_only_layer_computes_what_its_row_layout_did():
    """A layer that keeps only its tensor-core fragments (the row copy dropped) gives the same products at every
    row count, folded steps included, and the same weights back for saving (on the CPU: the reference path)."""
    from llmpress.model.llama import RMSNorm
    torch.manual_seed(4)
    linear = torch.nn.Linear(256, 128, bias=False)
    layer = QuantLinear.from_quantized(quantize_rtn(linear.weight.detach(), QuantScheme(bits=4, group_size=64)))
    assert layer.use_row_layout()
    xs = [torch.randn(m, 256) for m in (1, 5, 20)]
    norm, residual = RMSNorm(256, 1e-5), torch.randn(1, 128)
    norm.weight.data = torch.rand(256) + 0.5
    before = [layer(x) for x in xs] + [layer.forward_fused(xs[0], norm=norm, residual=residual)]
    saved = layer.quantized_weight(QuantScheme(bits=4, group_size=64))
    assert layer.use_fragment_layout(only=True) and layer.fragments_only
    assert layer.qweight_rows is None and not any(k.endswith("_rows") for k in layer.state_dict())
    after = [layer(x) for x in xs] + [layer.forward_fused(xs[0], norm=norm, residual=residual)]
    assert all(torch.equal(a, b) for a, b in zip(after, before))
    again = layer.quantized_weight(QuantScheme(bits=4, group_size=64))
    assert torch.equal(again.qweight, saved.qweight) and torch.equal(again.zeros, saved.zeros)
    assert torch.equal(again.scales, saved.scales)
    assert "layout=fragments" in repr(layer)


def test_fragments_only_model_gives_the_same_logits_and_frees_the_row_copy():
    """use_fragment_layouts(only=True) on a fused int4 model: every layer that can holds only fragments, the q/k/v
    and gate/up layers as views of their fused layer's, and the model's logits do not change."""
    from llmpress.model import LlamaForCausalLM
    from llmpress.model.fusion import fuse_projections
    from llmpress.quant.calibration import quantize_model
    from llmpress.quant.linear import replace_linears, use_fragment_layouts
    from tests.conftest import tiny_config
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_config(hidden_size=128, intermediate_size=256)).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        replace_linears(model, quantize_model(model, "rtn", QuantScheme(bits=4, group_size=64), progress=False))
        use_row_layouts(model)
        assert fuse_projections(model) == 2 * 2
        ids = torch.randint(0, 256, (1, 7))
        before = model(ids)
        assert use_fragment_layouts(model, only=True) == 2 * (2 + 2)  # o and down, fused q|k|v and gate|up
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.fragments_only for m in layers)
        attn = model.model.layers[0].self_attn
        fused = attn.qkv_packed[0]
        assert fused.fragments_only
        assert attn.v_proj.fragments.untyped_storage().data_ptr() == fused.fragments.untyped_storage().data_ptr()
        assert torch.equal(model(ids), before)


@cuda_only
@pytest.mark.parametrize("K,N,group_size", [(3072, 1024, 128), (8192, 512, 128), (1024, 256, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_fragment_gemv_matches_dequantized_weights(K, N, group_size, dtype):
    """The tensor-core batch-1 GEMV (one inline-PTX block per lane, fragment layout) on every tile it has, with
    and without the residual add, against float64; its x sums and magic offsets come off exactly enough that
    the result is as close as the CUDA-core GEMV's."""
    from llmpress.kernels.triton_int4_frag import FRAG_CONFIGS, frag_fits, frag_gemv
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    torch.manual_seed(K + N)
    (qweight, scales, zeros), _, _ = random_rows(K, N, group_size, "cuda")
    scales = scales.to(dtype)
    G = K // group_size
    fragments = rows_to_fragments(qweight, group_size)
    fscales, fzeros = fragment_scales_zeros(scales, zeros)
    x = torch.randn(1, K, device="cuda", dtype=dtype)
    residual = torch.randn(1, N, device="cuda", dtype=dtype)
    ref = int4_matmul_rows_reference(x.double(), qweight, scales, zeros, group_size)  # with this dtype's scales
    tried = 0
    for config in FRAG_CONFIGS:
        if not frag_fits(N, G, *config):
            continue
        tried += 1
        y = frag_gemv(x, fragments, fscales, fzeros, group_size, config)
        assert y.dtype == dtype and rel_error(y, ref) < 1e-2, config
        y = frag_gemv(x, fragments, fscales, fzeros, group_size, config, residual=residual)
        assert rel_error(y, residual.double() + ref) < 1e-2, config
    assert tried >= 2


def test_fragment_layout_of_a_quant_linear_is_a_copy_of_its_rows():
    from llmpress.quant.format import fragments_to_rows
    torch.manual_seed(3)
    linear = torch.nn.Linear(256, 128, bias=False)
    layer = QuantLinear.from_quantized(quantize_rtn(linear.weight.detach(), QuantScheme(bits=4, group_size=64)))
    assert not layer.use_fragment_layout()  # needs the row layout first
    assert layer.use_row_layout() and layer.use_fragment_layout()
    assert torch.equal(fragments_to_rows(layer.fragments), layer.qweight_rows)
    x = torch.randn(1, 256)
    ops.int4_tensor_core_gemv = True
    try:
        assert torch.equal(layer(x), layer.forward_fused(x))  # on the CPU: the reference path, switch or not
    finally:
        ops.int4_tensor_core_gemv = False


@cuda_only
def test_quant_linear_runs_the_tensor_core_gemv_when_switched_on():
    torch.manual_seed(4)
    linear = torch.nn.Linear(3072, 1024, bias=False).cuda()
    layer = QuantLinear.from_quantized(quantize_rtn(linear.weight.detach(), QuantScheme(bits=4, group_size=128)),
                                       dtype=torch.bfloat16)
    assert layer.use_row_layout() and layer.use_fragment_layout()
    x = torch.randn(1, 1, 3072, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    rows6 = torch.randn(1, 6, 3072, device="cuda", dtype=torch.bfloat16)  # a verify step's k + 1 tokens
    split, split_res, split6 = layer(x), layer.forward_fused(x, residual=residual), layer(rows6)
    saved = ops.int4_tensor_core_gemv, ops.int4_tensor_core_max_rows
    ops.int4_tensor_core_gemv, ops.int4_tensor_core_max_rows = True, ops.FRAG_MAX_M
    try:
        tc, tc_res, tc6 = layer(x), layer.forward_fused(x, residual=residual), layer(rows6)
    finally:
        ops.int4_tensor_core_gemv, ops.int4_tensor_core_max_rows = saved
    assert rel_error(tc, split.double()) < 1e-2 and rel_error(tc_res, split_res.double()) < 1e-2
    assert tc6.shape == (1, 6, 1024) and rel_error(tc6, split6.double()) < 1e-2


@cuda_only
def test_fragments_only_layer_on_the_gpu_matches_its_row_layout():
    """Without the row copy, every row count runs from the fragments: 1..8 rows on the fragment GEMV (and the
    RMSNorm and residual folded in at one row), 12 in two chunks of 8, 40 through the fragment dequantizer and
    cuBLAS; each against what the row layout computed before the copy was dropped."""
    from llmpress.model.llama import RMSNorm
    torch.manual_seed(5)
    linear = torch.nn.Linear(3072, 1024, bias=False).cuda()
    layer = QuantLinear.from_quantized(quantize_rtn(linear.weight.detach(), QuantScheme(bits=4, group_size=128)),
                                       dtype=torch.bfloat16)
    assert layer.use_row_layout()
    xs = [torch.randn(1, m, 3072, device="cuda", dtype=torch.bfloat16) for m in (1, 6, 12, 40)]
    norm = RMSNorm(3072, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data = (torch.rand(3072, device="cuda") + 0.5).to(torch.bfloat16)
    residual = torch.randn(1, 1, 1024, device="cuda", dtype=torch.bfloat16)
    before = [layer(x) for x in xs] + [layer.forward_fused(xs[0], norm=norm, residual=residual)]
    assert layer.use_fragment_layout(only=True) and layer.fragments_only and layer.qweight_rows is None
    after = [layer(x) for x in xs] + [layer.forward_fused(xs[0], norm=norm, residual=residual)]
    for got, want in zip(after, before):
        error = rel_error(got, want.double())
        assert got.shape == want.shape and error < 1e-2, (got.shape, error)


@cuda_only
@pytest.mark.parametrize("M", [2, 5, 8, 9, 12, 16])
def test_triton_fragment_gemv_takes_up_to_sixteen_rows(M):
    """Rows of x as the columns of the mma's B operand (a speculative verify step, a small batch): each row of y
    against float64, with the residual add, and against one row at a time; on the default tile and with 2 and 4
    row tiles per warp (2..8 rows, passed on the H200), or past 8 rows with a second column block of B per
    unpacked A operand (FRAG_KERNEL_MAX_M). Rows past M repeat the last row inside the kernel and must
    not leak into y."""
    from llmpress.kernels.triton_int4_frag import DEFAULT_CONFIG, FRAG_MAX_M, TWO_BLOCK_CONFIG, frag_gemv
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    torch.manual_seed(M)
    (qweight, scales, zeros), _, dense = random_rows(3072, 1024, 128, "cuda")
    fragments = rows_to_fragments(qweight, 128)
    fscales, fzeros = fragment_scales_zeros(scales, zeros)
    x = torch.randn(M, 3072, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    ref = residual.double() + x.double() @ dense
    configs = (DEFAULT_CONFIG, (4, 1, 2), (4, 1, 4)) if M <= FRAG_MAX_M else (TWO_BLOCK_CONFIG, (4, 2, 1), (4, 1, 2))
    for config in configs:
        y = frag_gemv(x, fragments, fscales, fzeros, 128, config, residual=residual)
        assert y.shape == (M, 1024)
        errors = [rel_error(y[m], ref[m]) for m in range(M)]
        assert all(error < 1e-2 for error in errors), (config, errors)
        alone = torch.cat([frag_gemv(x[m:m + 1], fragments, fscales, fzeros, 128, config, residual=residual[m:m + 1])
                           for m in range(M)])
        assert rel_error(y, alone.double()) < 1e-2, config


@cuda_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_fragment_gemv_folds_the_rmsnorm(dtype):
    """The RMSNorm before q|k|v and gate|up in the tensor-core GEMV (B = h * w, sum(h^2) from an mma of h with
    itself, the rsqrt once all programs' shares are in), with and without a residual, on every tile, against
    float64; then QuantLinear.forward_fused with the switches on against the split GEMV."""
    from llmpress.kernels.triton_int4_frag import FRAG_CONFIGS, frag_fits, frag_gemv
    from llmpress.model.llama import RMSNorm
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    torch.manual_seed(6)
    K, N = 3072, 1024
    (qweight, scales, zeros), rt, _ = random_rows(K, N, 128, "cuda")
    scales = scales.to(dtype)
    fragments = rows_to_fragments(qweight, 128)
    fscales, fzeros = fragment_scales_zeros(scales, zeros)
    h = torch.randn(1, K, device="cuda", dtype=dtype) * 3
    weight = (torch.rand(K, device="cuda") + 0.5).to(dtype)
    residual = torch.randn(1, N, device="cuda", dtype=dtype)
    h64 = h.double()
    ref = int4_matmul_rows_reference(h64 * torch.rsqrt(h64.pow(2).mean() + 1e-5) * weight.double(), qweight, scales,
                                     zeros, 128)
    for config in [c for c in FRAG_CONFIGS if frag_fits(N, K // 128, *c)]:
        y = frag_gemv(h, fragments, fscales, fzeros, 128, config, norm_weight=weight, eps=1e-5)
        assert rel_error(y, ref) < 1e-2, config
        y = frag_gemv(h, fragments, fscales, fzeros, 128, config, residual=residual, norm_weight=weight, eps=1e-5)
        assert rel_error(y, residual.double() + ref) < 1e-2, config
    layer = QuantLinear.from_runtime(RuntimeQuantWeight(rt.qweight, rt.scales.to(dtype), rt.qzeros, None, 128, 4))
    assert layer.use_row_layout() and layer.use_fragment_layout()
    norm = RMSNorm(K, 1e-5).to("cuda", dtype)
    norm.weight.data = weight
    split = layer.forward_fused(h[None], norm=norm)
    saved = ops.int4_tensor_core_gemv, ops.int4_tensor_core_norm
    ops.int4_tensor_core_gemv = ops.int4_tensor_core_norm = True
    try:
        tc = layer.forward_fused(h[None], norm=norm)
    finally:
        ops.int4_tensor_core_gemv, ops.int4_tensor_core_norm = saved
    assert tc.shape == split.shape == (1, 1, N) and rel_error(tc, split.double()) < 1e-2


@cuda_only
@pytest.mark.parametrize("M", [2, 6, 8])
def test_triton_fragment_gemv_folds_the_rmsnorm_of_each_row(M):
    """2..8 rows (a verify step) with the RMSNorm folded in (ops.int4_tensor_core_fold_rows): each row's
    sum(h^2) is the diagonal of one mma of x with itself, so each row of y is normalized by its own mean square;
    against float64 on two tiles, then QuantLinear.forward_fused with the fold on against the same steps apart."""
    from llmpress.kernels.triton_int4_frag import frag_gemv
    from llmpress.model.llama import RMSNorm
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    torch.manual_seed(10 + M)
    K, N = 3072, 1024
    (qweight, scales, zeros), rt, _ = random_rows(K, N, 128, "cuda")
    fragments = rows_to_fragments(qweight, 128)
    fscales, fzeros = fragment_scales_zeros(scales, zeros)
    h = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.arange(1, M + 1, device="cuda")[:, None]
    weight = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
    residual = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    h64 = h.double()
    normed = h64 * torch.rsqrt(h64.pow(2).mean(dim=1, keepdim=True) + 1e-5) * weight.double()
    ref = residual.double() + int4_matmul_rows_reference(normed, qweight, scales, zeros, 128)
    for config in ((4, 2, 1), (4, 1, 2)):
        y = frag_gemv(h, fragments, fscales, fzeros, 128, config, residual=residual, norm_weight=weight, eps=1e-5)
        errors = [rel_error(y[m], ref[m]) for m in range(M)]
        assert all(error < 1e-2 for error in errors), (config, errors)
    layer = QuantLinear.from_runtime(RuntimeQuantWeight(rt.qweight, rt.scales, rt.qzeros, None, 128, 4))
    assert layer.use_row_layout() and layer.use_fragment_layout()
    norm = RMSNorm(K, 1e-5).to("cuda", torch.bfloat16)
    norm.weight.data = weight
    saved = ops.int4_tensor_core_gemv, ops.int4_tensor_core_fold_rows
    ops.int4_tensor_core_gemv = True
    try:
        apart = layer.forward_fused(h[None], norm=norm, residual=residual[None])
        ops.int4_tensor_core_fold_rows = True
        folded = layer.forward_fused(h[None], norm=norm, residual=residual[None])
    finally:
        ops.int4_tensor_core_gemv, ops.int4_tensor_core_fold_rows = saved
    assert folded.shape == apart.shape == (1, M, N) and rel_error(folded, apart.double()) < 1e-2


@cuda_only
@pytest.mark.parametrize("M", [1, 6])
def test_triton_fragment_gemv_ends_in_swiglu(M):
    """A fused gate|up weight [2I, K] with silu(gate) * up in the GEMV's last step (the first half of each program's
    warps on gate rows, the second half on the same up rows): on every tile, with and without the folded RMSNorm
    (one row), against float64; then MLP.forward with the switch on against the same steps apart."""
    from llmpress.kernels.triton_int4_frag import FRAG_CONFIGS, frag_fits, frag_gemv
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    torch.manual_seed(20 + M)
    K, inner = 2048, 1024
    (qweight, scales, zeros), rt, _ = random_rows(K, 2 * inner, 128, "cuda")
    fragments = rows_to_fragments(qweight, 128)
    fscales, fzeros = fragment_scales_zeros(scales, zeros)
    h = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    weight = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)
    h64 = h.double()

    def swiglu64(x64):
        gate_up = int4_matmul_rows_reference(x64, qweight, scales, zeros, 128)
        return torch.nn.functional.silu(gate_up[:, :inner]) * gate_up[:, inner:]

    plain = swiglu64(h64)
    normed = swiglu64(h64 * torch.rsqrt(h64.pow(2).mean(dim=1, keepdim=True) + 1e-5) * weight.double())
    configs = [c for c in FRAG_CONFIGS if frag_fits(2 * inner, K // 128, *c, M=M)]
    assert len(configs) >= 4
    for config in configs:
        y = frag_gemv(h, fragments, fscales, fzeros, 128, config, swiglu=True)
        assert y.shape == (M, inner) and rel_error(y, plain) < 1e-2, config
        if M == 1:
            y = frag_gemv(h, fragments, fscales, fzeros, 128, config, norm_weight=weight, eps=1e-5, swiglu=True)
            assert rel_error(y, normed) < 1e-2, config
    from llmpress.model import LlamaForCausalLM
    from llmpress.model.fusion import fuse_projections
    from llmpress.quant.calibration import quantize_model
    from llmpress.quant.linear import replace_linears, use_fragment_layouts
    from tests.conftest import tiny_config
    model = LlamaForCausalLM(tiny_config(hidden_size=256, intermediate_size=512)).eval()
    with torch.no_grad():
        replace_linears(model, quantize_model(model, "rtn", QuantScheme(bits=4, group_size=128), progress=False))
        model.to("cuda", torch.bfloat16)
        use_row_layouts(model)
        fuse_projections(model)
        use_fragment_layouts(model, only=True)
        mlp, norm = model.model.layers[0].mlp, model.model.layers[0].post_attention_layernorm
        x = torch.randn(1, M, 256, device="cuda", dtype=torch.bfloat16)
        apart = mlp(x, norm=norm, residual=x)
        saved = ops.int4_tensor_core_swiglu
        ops.int4_tensor_core_swiglu = True
        try:
            fused = mlp(x, norm=norm, residual=x)
        finally:
            ops.int4_tensor_core_swiglu = saved
    assert fused.shape == apart.shape == (1, M, 256) and rel_error(fused, apart.double()) < 1e-2


@cuda_only
@pytest.mark.parametrize("M", [1, 6])
def test_triton_fragment_gemv_with_pdl_gives_the_same_bits(M, monkeypatch):
    """Launched with programmatic dependent launch (early or late trigger), the fragment GEMV requests its weights
    before it waits and x after: a chain of dependent products (q|k|v-like with the RMSNorm, a square one with the
    residual, gate|up with the SwiGLU ending, then down), each reading the one before's output and sharing one
    workspace, gives the same bits as without PDL, eagerly and replayed from a CUDA graph."""
    import llmpress.kernels.pdl as pdl
    import llmpress.kernels.triton_int4_frag as frag
    from llmpress.kernels.triton_int4_frag import frag_gemv
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    monkeypatch.setattr(frag, "PDL_MAX_ROWS", 8)  # 2..8 rows under PDL: prepared, off by default
    torch.manual_seed(8)
    K, inner = 1024, 2048

    def weight(k, n):
        (qweight, scales, zeros), _, _ = random_rows(k, n, 128, "cuda")
        return (rows_to_fragments(qweight, 128), *fragment_scales_zeros(scales, zeros))

    first, square, gate_up, down = weight(K, K), weight(K, K), weight(K, 2 * inner), weight(inner, K)
    h = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    norm_weight = (torch.rand(K, device="cuda") + 0.5).to(torch.bfloat16)

    def chain():
        a = frag_gemv(h, *first, 128, norm_weight=norm_weight, eps=1e-5)
        b = frag_gemv(a, *square, 128, residual=h)
        c = frag_gemv(b, *gate_up, 128, norm_weight=norm_weight, eps=1e-5, swiglu=True)
        return frag_gemv(c, *down, 128, (4, 2, 1), residual=b)

    runs = []
    default = pdl.mode
    try:
        for mode in ("off", "early", "late"):
            pdl.mode = mode
            runs.append([chain() for _ in range(3)])
            chain()  # compile outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = chain()
            graph.replay()
            torch.cuda.synchronize()
            runs[-1].append(out.clone())
    finally:
        pdl.mode = default
    assert all(torch.equal(runs[0][0], y) for run in runs for y in run)


@cuda_only
@pytest.mark.parametrize("K,N,group_size", [(3072, 1024, 128), (1024, 256, 64)])
def test_triton_fragment_dequantizer_is_exact(K, N, group_size):
    """The dense weight rebuilt from the fragment layout equals the row layout's dequantization, bit for bit
    (what layers holding only fragments multiply by above 16 rows; also checked in the Triton interpreter on CPU)."""
    from llmpress.kernels.triton_int4_frag import dequantize_fragments_triton
    from llmpress.kernels.triton_int4_rows import dequantize_rows_triton
    from llmpress.quant.format import fragment_scales_zeros, rows_to_fragments
    torch.manual_seed(K)
    (qweight, scales, zeros), _, _ = random_rows(K, N, group_size, "cuda")
    dense = dequantize_fragments_triton(rows_to_fragments(qweight, group_size), *fragment_scales_zeros(scales, zeros),
                                        group_size, torch.bfloat16)
    assert torch.equal(dense, dequantize_rows_triton(qweight, scales, zeros, group_size, torch.bfloat16))

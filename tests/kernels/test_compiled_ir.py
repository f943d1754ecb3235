"""What the compiler makes of kernels whose correctness depends on it, checked on the CPU machine: sm_90 compiled
by the Triton wheel's own toolchain (no GPU needed). The accumulating decode's finishing kernel reads its
accumulator and then zeroes it, in other layouts than it loaded it (another thread owns each element); without a
barrier between them some loads read zeros, as the H200 showed (benchmarks/results/verify_probe_h200_before_fix.log)."""

import pytest

triton = pytest.importorskip("triton")


def compiled_ttgir(fn, signature: dict, constants: dict, aligned: list[str], num_warps: int = 4) -> str:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    index = {name: i for i, name in enumerate(fn.arg_names)}
    source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs={(index[k],): v for k, v in constants.items()},
                       attrs={(index[k],): [["tt.divisibility", 16]] for k in aligned})
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    except Exception as error:  # a wheel without the NVIDIA backend's tools
        pytest.skip(f"cannot compile for sm_90 here: {error}")
    return kernel.asm["ttgir"]


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("swiglu", [True, False])
def test_finishing_kernel_zeroes_its_accumulator_only_after_every_load_of_it(rows, swiglu):
    from llmpress.kernels.triton_int4_accumulate import _finish_accumulated
    signature = {"acc_ptr": "*fp32", "squares_ptr": "*fp32", "y_ptr": "*bf16", "N": "i32", "K": "i32", "eps": "fp32",
                 "SPLIT": "i32", "other_ptr": "*fp32", "other_n": "i32"}
    constants = dict(SPLIT_P2=16, BLOCK=1024, SWIGLU=swiglu, PDL=0, ROWS=rows, LOADS_FIRST=False)
    ir = compiled_ttgir(_finish_accumulated, signature, constants, ["acc_ptr", "squares_ptr", "y_ptr", "other_ptr"])
    lines = [line for line in ir.splitlines() if "tt.load" in line or "tt.store" in line or "gpu.barrier" in line]
    acc_loads = [i for i, line in enumerate(lines) if "tt.load" in line and "1024x!tt.ptr<f32>" in line]
    zero_stores = [i for i, line in enumerate(lines) if "tt.store" in line and "1024x!tt.ptr<f32>" in line]
    barriers = [i for i, line in enumerate(lines) if "gpu.barrier" in line]
    assert acc_loads and zero_stores, lines
    assert any(max(acc_loads) < b < min(zero_stores) for b in barriers), lines

"""SASS instruction counts of the int4 row-layout kernels for sm_90, compiled on a machine without a GPU.

triton.compile with an explicit target needs no driver: ptxas and cuobjdump ship inside the triton wheel.
Pointers and the row strides are declared 16-byte aligned, as the JIT specializes them on the GPU.
Per configuration: total SASS instructions of the kernel (it has no loop), weights each thread handles,
their ratio, and the most frequent opcodes. Needs triton (CPU-only torch is fine):

    pip install --no-deps triton==3.6.0
    PYTHONPATH=src python benchmarks/sass_counts.py --out benchmarks/results/sass_counts_sm90.json
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from llmpress.atomic_write import write_json_atomic
from llmpress.kernels.triton_int4_rows_half2 import X_SCALE, _half2_gemv
from llmpress.kernels.triton_int4_rows_mma import _mma_rows
from llmpress.kernels.triton_int4_rows_split import PROLOGUES, SPLIT_CONFIGS, _split_gemv

GROUP = 128
POINTERS = {"x_ptr": "*bf16", "s_ptr": "*bf16", "z_ptr": "*u8", "y_ptr": "*bf16", "partial_ptr": "*fp32",
            "counter_ptr": "*i32"}


def compile_sass(fn, signature: dict, constants: dict, aligned: list[str], num_warps: int,
                 maxnreg: int | None = None) -> str:
    index = {name: i for i, name in enumerate(fn.arg_names)}
    source = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}},
                       constexprs={(index[k],): v for k, v in constants.items()},
                       attrs={(index[k],): [["tt.divisibility", 16]] for k in aligned})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, **({"maxnreg": maxnreg} if maxnreg else {})})
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        return subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True, text=True, check=True).stdout


def opcodes(sass: str) -> collections.Counter:
    counts = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if match:
            counts[match.group(2).split(".")[0]] += 1
    return counts


def mma_row(block_n: int, groups: int, warps: int, use_asm: bool) -> dict:
    signature = {**POINTERS, "xs_ptr": "*fp32", "qb_ptr": "*u8", "M": "i32", "N": "i32", "G": "i32",
                 "row_bytes": "i32", "stride_xm": "i32", "stride_ym": "i32", "SPLIT_K": "i32"}
    constants = {"BLOCK_M": 16, "BLOCK_N": block_n, "GROUP_SIZE": GROUP, "GROUPS": groups, "MAGIC": 0x4300,
                 "MAGIC_VALUE": 128.0, "USE_ASM": use_asm}
    aligned = [*POINTERS, "xs_ptr", "qb_ptr", "N", "row_bytes", "stride_xm", "stride_ym"]
    counts = opcodes(compile_sass(_mma_rows, signature, constants, aligned, warps))
    return dict(kernel="mma" + ("" if use_asm else " (plain unpack)"), BLOCK_N=block_n, GROUPS=groups,
                num_warps=warps, counts=counts, weights_per_thread=block_n * groups * GROUP / (32 * warps))


def half2_row(block_n: int, groups: int, warps: int) -> dict:
    signature = {**POINTERS, "qw_ptr": "*i32", "N": "i32", "G": "i32", "words_per_row": "i32", "stride_ym": "i32",
                 "SPLIT_K": "i32"}
    constants = {"BLOCK_N": block_n, "GROUPS": groups, "GROUP_SIZE": GROUP, "X_SCALE": X_SCALE}
    aligned = [*POINTERS, "qw_ptr", "N", "words_per_row", "stride_ym"]
    counts = opcodes(compile_sass(_half2_gemv, signature, constants, aligned, warps))
    return dict(kernel="half2", BLOCK_N=block_n, GROUPS=groups, num_warps=warps, counts=counts,
                weights_per_thread=block_n * groups * GROUP / (32 * warps))


def split_row(block_n: int, groups: int, warps: int, in_kernel: bool = False, use_asm: bool = False,
              prologue: str | None = None, residual: bool = False, spread: bool = False) -> dict:
    signature = {**POINTERS, "qw_ptr": "*i32", "N": "i32", "G": "i32", "words_per_row": "i32", "SPLIT": "i32",
                 "nw_ptr": "*bf16", "res_ptr": "*bf16", "eps": "fp32"}
    constants = {"BLOCK_N": block_n, "GROUPS": groups, "GROUP_SIZE": GROUP, "IN_KERNEL": in_kernel, "EVEN_N": True,
                 "USE_ASM": use_asm, "SPLIT_P2": 32 if in_kernel else 1, "PROLOGUE": PROLOGUES[prologue],
                 "RESIDUAL": residual, "SPREAD_PROLOGUE": spread}
    aligned = [*POINTERS, "qw_ptr", "N", "words_per_row", "nw_ptr", "res_ptr"]
    counts = opcodes(compile_sass(_split_gemv, signature, constants, aligned, warps))
    name = ("split" + (" asm" if use_asm else "") + (" in-kernel reduce" if in_kernel else "")
            + (f" +{prologue}" if prologue else "") + (" spread" if spread else "") + (" +residual" if residual else ""))
    return dict(kernel=name, BLOCK_N=block_n, GROUPS=groups,
                num_warps=warps, counts=counts, weights_per_thread=block_n * groups * GROUP / (32 * warps))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [mma_row(128, 2, 4, use_asm=False), mma_row(128, 2, 4, use_asm=True), mma_row(128, 4, 8, use_asm=True),
            mma_row(64, 4, 4, use_asm=True)]
    rows += [half2_row(*c) for c in [(256, 1, 4), (128, 1, 4), (256, 1, 8), (128, 2, 8), (64, 2, 4), (32, 4, 4)]]
    rows += [split_row(*c) for c in SPLIT_CONFIGS] + [split_row(256, 1, 4, in_kernel=True), split_row(256, 2, 8, in_kernel=True, use_asm=True)]
    rows += [split_row(*c, use_asm=True) for c in SPLIT_CONFIGS]
    # the decoder-layer steps folded in (in-kernel reduction, as the model runs them)
    rows += [split_row(*c, in_kernel=True, use_asm=True, prologue=prologue, residual=residual)
             for c in [(128, 1, 4), (256, 1, 8), (128, 2, 8)]
             for prologue, residual in [(None, False), (None, True), ("rmsnorm", False), ("silu_mul", False)]]
    rows += [split_row(*c, in_kernel=True, use_asm=True, prologue=prologue, spread=True)
             for c in [(128, 1, 4), (256, 1, 8), (128, 2, 8)] for prologue in ("rmsnorm", "silu_mul")]
    print(f"{'kernel':22s} {'BLOCK_N':>7s} {'GROUPS':>6s} {'warps':>5s} {'SASS':>6s} {'w/thread':>8s} {'per w':>6s}  top opcodes")
    for row in rows:
        total = sum(row["counts"].values())
        row["sass_instructions"] = total
        row["per_weight"] = total / row["weights_per_thread"]
        top = ", ".join(f"{k} {v}" for k, v in row["counts"].most_common(6))
        print(f"{row['kernel']:22s} {row['BLOCK_N']:7d} {row['GROUPS']:6d} {row['num_warps']:5d} {total:6d} "
              f"{row['weights_per_thread']:8.0f} {row['per_weight']:6.2f}  {top}")
        row["counts"] = dict(row["counts"])
    if args.out:
        write_json_atomic(Path(args.out), {"script": "benchmarks/sass_counts.py", "target": "sm_90",
                                           "triton": triton.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())

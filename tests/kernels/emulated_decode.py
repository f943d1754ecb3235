"""The accumulating batch-1 decode (model/decode_accumulate.py) run on the CPU through its GPU kernels: the inline
PTX on tests/kernels/ptx_emulator.py, the Triton kernels (attention, the finishing kernel) under Triton's
interpreter. Run as a script, since the interpreter is chosen when triton is first imported:

    TRITON_INTERPRET=1 python -m tests.kernels.emulated_decode CASE...

CASE: `decode:<quantize_head>:<slots>:<combine_in_o>:<dtype>[:sd]` (three one-token steps; `sd`: silu(gate) * up
made by the down product, ops.int4_swiglu_in_down),
`verify:<quantize_head>:<dtype>[:triton]` (one 6-token verify step, ops.int4_accumulate_rows; `triton`: its
attention through the Triton decode kernel, ops.triton_verify_attention), or `attention:...` (the Triton RoPE
decode kernel alone, `attention` below). Prints one JSON line per
case: the largest |logit difference| of each step against the layers as written (PyTorch on the CPU), relative
to the largest |logit|, and how many emulated products ran."""

from __future__ import annotations

import json
import os
import sys
import types

import numpy as np
import torch


def _patch_interpreter() -> None:
    """Two fixes to Triton's interpreter (3.6): it keeps bf16 as uint16 and multiplied those bits in tl.dot (widened
    to fp32 first here), and a loop bound from a one-element load (a position) could not be an index."""
    import triton.language as tl
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, *args):
        if tl.bfloat16 not in (a.dtype, b.dtype):
            return original(self, a, b, d, *args)
        def widen(handle):
            return (handle.data.astype(np.uint32) << 16).view(np.float32) if handle.dtype == tl.bfloat16 else handle.data
        return interpreter.TensorHandle(np.matmul(widen(a), widen(b), dtype=d.data.dtype) + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


def _emulate_gpu_paths():
    """The switches and device checks that send the decode to its kernels, pointed at the CPU."""
    import llmpress.kernels.triton_int4_accumulate as accumulate
    from llmpress.kernels import ops
    from tests.kernels.ptx_emulator import EmulatedTileKernel
    torch.cuda.get_device_properties = lambda device: types.SimpleNamespace(multi_processor_count=132)  # an H200
    kernel = EmulatedTileKernel("accumulate")
    accumulate._frag_accumulate = kernel
    accumulate._frag_accumulate_swiglu = EmulatedTileKernel("swiglu", counts_with=kernel)
    ops.int4_accumulate_applies = lambda h: (ops.int4_accumulate_decode and 1 <= h.shape[0] <= 8
                                             and h.dtype == torch.float32)
    ops.int4_tensor_core_norm = ops.int4_tensor_core_swiglu = True

    def rope_attention_applies(qkv, cos, head_dim):  # ops.rope_attention_applies without its CUDA check, and only
        # for the accumulating verify step (the rows switch is on only there): the reference stays PyTorch
        return (ops.int4_accumulate_rows and ops.triton_verify_attention and qkv.shape[0] == 1
                and 2 <= qkv.shape[1] <= 8 and cos.dim() == 2 and head_dim in (64, 128))
    ops.rope_attention_applies = rope_attention_applies
    return kernel


_attention_calls = [0]


def _count_attention_calls() -> None:
    import llmpress.kernels.triton_attention as attention
    original = attention._decode_attention

    def counted(*args, **kwargs):
        _attention_calls[0] += 1
        return original(*args, **kwargs)
    attention._decode_attention = counted


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def attention(case: str) -> dict:
    """`attention:<heads>:<kv_heads>:<head_dim>:<cache_len>:<first>:<T>[:scaled]`: T new tokens straight from a
    fused projection through the Triton RoPE decode kernel (rotated by their own positions, stored at them, each
    attending over slots up to its own), against rotate, store and attend in float64; `scaled`: the projection as
    an fp32 accumulator before its norm's rsqrt, which the kernel applies per token from sum(h^2) shares."""
    from llmpress.kernels.triton_attention import decode_attention_rope_triton
    from llmpress.model.rope import RotaryEmbedding
    from tests.kernels.test_attention import rotate_store_attend
    _, *fields = case.split(":")
    scaled = fields[-1] == "scaled"
    heads, kv_heads, head_dim, cache_len, first, T = (int(f) for f in fields[:6])
    torch.manual_seed(T + cache_len)
    rotary = RotaryEmbedding(head_dim, 500000.0, None)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(1, T, width)
    norm = None
    if scaled:  # 3 shares of sum(h^2) per token, share s of token t at s * T + t, over K = 64
        shares = torch.rand(3, T) * 40 + 1
        rsqrt = torch.rsqrt(shares.sum(0) / 64 + 1e-5)
        norm = (shares.flatten().contiguous(), 3, 64, 1e-5)
        projected = (qkv * rsqrt[None, :, None]).to(torch.bfloat16)
    else:
        qkv = qkv.to(torch.bfloat16)
        projected = qkv
    caches = [torch.randn(1, kv_heads, cache_len, head_dim).to(torch.bfloat16) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    positions = torch.arange(first, first + T)
    out = decode_attention_rope_triton(qkv, heads, rotary.inv_freq, *caches, positions, norm)
    expected = rotate_store_attend(projected, heads, rotary, expected_caches, positions)
    new = slice(first, first + T)
    return {"case": case, "error": ((out.double() - expected).norm() / expected.norm()).item(),
            "cache_error": max((got[:, :, new].float() - want[:, :, new].float()).abs().max().item()
                               for got, want in zip(caches, expected_caches)),
            "rest_unchanged": all(torch.equal(got[:, :, :first], want[:, :, :first]) and
                                  torch.equal(got[:, :, first + T:], want[:, :, first + T:])
                                  for got, want in zip(caches, expected_caches))}


def run(case: str, kernel) -> dict:
    if case.startswith("attention:"):
        return attention(case)
    from llmpress.kernels import ops
    from tests.test_decode_accumulate import verify_step_logits
    from tests.test_decode_chain import decode_logits, int4_model
    kind, *fields = case.split(":")
    ops.int4_swiglu_in_down = fields[-1] == "sd"
    if ops.int4_swiglu_in_down:
        fields = fields[:-1]
    ops.triton_verify_attention = ops.int4_accumulate_rows_into_attention = fields[-1] == "triton"
    if ops.triton_verify_attention:
        fields = fields[:-1]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[fields[-1]]
    model = int4_model(fields[0] == "1", "cpu", dtype, hidden_size=256, intermediate_size=512)
    launches, attention_calls = kernel.launches, _attention_calls[0]
    if kind == "decode":
        slots, ops.int4_combine_in_o = int(fields[1]), fields[2] == "1"
        errors = [_relative(a, p) for a, p in zip(decode_logits(model, accumulating=True, slots=slots),
                                                  decode_logits(model, slots=slots))]
    else:
        accumulated = verify_step_logits(model, True, True, slots=64)
        launches_step = kernel.launches
        plain = verify_step_logits(model, False, False, slots=64)
        assert kernel.launches == launches_step  # the reference ran no kernel
        errors = [_relative(accumulated[0, t], plain[0, t]) for t in range(plain.shape[1])]
    from llmpress.kernels.triton_int4_accumulate import _zeroed
    # each kernel that reads an accumulator zeroes it again for the next step (the "qkv" one: gate|up's finishing,
    # or down's with swiglu in down), except the last layer's MLP workspace, zeroed by the next step's first down
    last_mlp = f"mlp:{len(model.model.layers)}:{len(model.model.layers) - 1}"
    dirty = sorted(name for (_, name), (acc, _) in _zeroed._buffers.items() if acc.abs().sum() > 0
                   and name != last_mlp)
    return {"case": case, "errors": errors, "launches": kernel.launches - launches,
            "triton_attention_calls": _attention_calls[0] - attention_calls, "dirty_workspaces": dirty,
            "workspaces": sorted(name for _, name in _zeroed._buffers)}


def main(cases: list[str]) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _patch_interpreter()
    kernel = _emulate_gpu_paths()
    _count_attention_calls()
    for case in cases:
        print(json.dumps(run(case, kernel)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

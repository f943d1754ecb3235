"""QuantLinear: a drop-in nn.Linear whose weight is packed integers, and the swap that installs it.

The model never asks whether a layer is quantized (gpt-fast's pattern): `replace_linears` swaps modules,
and forward(x) keeps nn.Linear's contract, x [..., in] -> [..., out].
"""

from __future__ import annotations

import torch
from torch import nn

from llmpress.kernels import ops
from llmpress.model.fusion import FUSED_PROJECTIONS, fuse_projections, unfuse_projections
from llmpress.model.llama import swiglu
from llmpress.quant.format import (RuntimeQuantWeight, dequantize_runtime, fragment_scales_zeros, fragments_to_rows,
                                   from_runtime, rows_to_fragments, rows_to_runtime, runtime_to_rows, to_runtime)
from llmpress.quant.scheme import QuantizedWeight, QuantScheme


class QuantLinear(nn.Module):
    """y = x Wᵀ + b with W held in the runtime packed layout (quant/format.py).

    Buffers (runtime layout, not a checkpoint layout: save with `quant.checkpoint.save_quantized`):
    qweight int32 [in*bits/32, out], scales [groups, out] (model dtype), qzeros int32 [groups, out*bits/32]
    (real zero points), g_idx int32 [in] or None, bias [out] or None.
    On the GPU, `use_row_layout` re-lays 4-bit grouped weights for the decode kernels: qweight_rows int32
    [out, in/8], scales_rows [out, groups], zeros_rows uint8 [out, groups] replace the three (no extra memory).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False,
                 act_order: bool = False, dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        group_size = in_features if group_size == -1 else group_size
        assert (in_features * bits) % 32 == 0 and (out_features * bits) % 32 == 0, (in_features, out_features, bits)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = -(-in_features // group_size)  # the last group is partial when group_size does not divide in_features
        int32 = dict(dtype=torch.int32, device=device)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, **int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, **int32))
        self.register_buffer("g_idx", torch.zeros(in_features, **int32) if act_order else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.row_layout = False
        self.fragments = None  # the row-layout weight again as tensor-core fragments (`use_fragment_layout`)
        self.fragment_scales = self.fragment_zeros = None  # and its scales and zeros [G, N], as that GEMV reads them

    @classmethod
    def from_runtime(cls, rt: RuntimeQuantWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """Wrap already-packed runtime tensors (no copy)."""
        module = cls(rt.in_features, rt.out_features, rt.bits, rt.group_size, bias=bias is not None,
                     act_order=rt.g_idx is not None, dtype=rt.scales.dtype, device="meta")
        module.qweight, module.scales, module.qzeros, module.g_idx = rt.qweight, rt.scales, rt.qzeros, rt.g_idx
        if bias is not None:
            module.bias = bias.detach().to(device=rt.qweight.device, dtype=rt.scales.dtype)
        return module

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None,
                       dtype: torch.dtype | None = None) -> "QuantLinear":
        """Pack `qw` (on its device) into a QuantLinear whose scales and bias are in `dtype` (default: qw's scales)."""
        return cls.from_runtime(to_runtime(qw, dtype), bias)

    @property
    def device(self) -> torch.device:
        if self.fragments_only:
            return self.fragments.device
        return (self.qweight_rows if self.row_layout else self.qweight).device

    @property
    def fragments_only(self) -> bool:
        """Whether the tensor-core fragments are the layer's only weight (`use_fragment_layout(only=True)`)."""
        return self.fragments is not None and self.row_layout and self.qweight_rows is None

    def runtime_weight(self) -> RuntimeQuantWeight:
        if self.fragments_only:
            return rows_to_runtime(fragments_to_rows(self.fragments), self.fragment_scales.T.contiguous(),
                                   self.fragment_zeros.T.contiguous(), self.group_size)
        if self.row_layout:
            return rows_to_runtime(self.qweight_rows, self.scales_rows, self.zeros_rows, self.group_size)
        return RuntimeQuantWeight(self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.bits)

    def use_row_layout(self) -> bool:
        """Re-lay the weight for `kernels/triton_int4_rows.py` (each output row's packed words contiguous), in
        place of the GPTQ-style buffers. 4-bit weights whose groups tile the input only (no act-order); the
        others keep their layout and kernels. Returns whether the layer now uses the row layout."""
        if self.row_layout or self.bits != 4 or self.g_idx is not None or self.in_features % self.group_size:
            return self.row_layout
        self._set_row_buffers(*runtime_to_rows(self.runtime_weight()))
        return True

    def _set_row_buffers(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        self.qweight = self.scales = self.qzeros = None  # registered buffers set to None leave the state dict
        self.register_buffer("qweight_rows", qweight)
        self.register_buffer("scales_rows", scales)
        self.register_buffer("zeros_rows", zeros)
        self.row_layout = True

    def use_fragment_layout(self, only: bool = False) -> bool:
        """Also hold the row-layout weight as tensor-core fragments (quant/format.py `rows_to_fragments`, a
        second copy) for the 1..8-row GEMV of kernels/triton_int4_frag.py, used while `ops.int4_tensor_core_gemv`
        is on; with `only`, in place of the row layout (every product then runs from the fragments,
        `ops.int4_matmul_fragments`). Needs out_features % 64 == 0 and groups of a multiple of 64."""
        if self.fragments is None and self.row_layout and self.bias is None and self.out_features % 64 == 0 \
                and self.group_size % 64 == 0:
            self.fragments = rows_to_fragments(self.qweight_rows, self.group_size)
            self.fragment_scales, self.fragment_zeros = fragment_scales_zeros(self.scales_rows, self.zeros_rows)
        if only and self.fragments is not None:
            self.qweight_rows = self.scales_rows = self.zeros_rows = None  # None buffers leave the state dict
        return self.fragments is not None

    def share_fragments(self, fused: "QuantLinear", first_row: int) -> None:
        """Make this layer's weight rows first_row.. of `fused`'s fragments (a view: fragments are stored by
        tiles of 16 rows) and drop its row layout, which `fuse_rows` made a view of the fused layer's: so that
        once the fused layer holds only fragments, the row copy's memory is freed."""
        assert fused.fragments is not None and first_row % 16 == 0 and self.out_features % 16 == 0, first_row
        rows = slice(first_row, first_row + self.out_features)
        self.fragments = fused.fragments[first_row // 16:(first_row + self.out_features) // 16]
        self.fragment_scales = fused.fragment_scales[:, rows].contiguous()  # [G, N]: small, copied to be contiguous
        self.fragment_zeros = fused.fragment_zeros[:, rows].contiguous()
        self.qweight_rows = self.scales_rows = self.zeros_rows = None

    def quantized_weight(self, scheme: QuantScheme) -> QuantizedWeight:
        """The unpacked levels, scales and zeros (for saving a model that already holds QuantLinear layers)."""
        return from_runtime(self.runtime_weight(), scheme)

    @classmethod
    def fuse_rows(cls, layers: list["QuantLinear"]) -> "QuantLinear | None":
        """One layer computing all of `layers`' outputs, concatenated, for layers that read the same input
        (model.fusion's q|k|v and gate|up): their row-layout buffers concatenated, and each layer's buffers
        turned into views of the fused ones (no extra memory). None where they cannot fuse: another layout,
        group size or input size, or a bias."""
        first = layers[0]
        if not all(type(m) is cls and m.row_layout and m.bias is None and m.in_features == first.in_features
                   and m.group_size == first.group_size for m in layers):
            return None
        fused = cls(first.in_features, sum(m.out_features for m in layers), 4, first.group_size,
                    dtype=first.scales_rows.dtype, device="meta")
        names = ("qweight_rows", "scales_rows", "zeros_rows")
        fused._set_row_buffers(*(torch.cat([getattr(m, name) for m in layers]) for name in names))
        offset = 0
        for m in layers:
            rows = slice(offset, offset + m.out_features)
            for name in names:
                setattr(m, name, getattr(fused, name)[rows])  # contiguous row slices: views, same storage
            offset += m.out_features
        return fused

    def dequantize_weight(self) -> torch.Tensor:
        """W [out, in] in the scales' dtype, the weight an nn.Linear would hold."""
        rt = self.runtime_weight()
        return dequantize_runtime(rt.qweight, rt.scales, rt.qzeros, rt.g_idx, self.group_size, self.bits,
                                  rt.scales.dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.fragments is not None and ops.int4_fragment_gemv_applies(x2d, self.fragments_only):
            y = ops.int4_gemv_fragments(x2d, self.fragments, self.fragment_scales, self.fragment_zeros, self.group_size)
            return y.reshape(*x.shape[:-1], self.out_features)
        if self.fragments_only:
            y = ops.int4_matmul_fragments(x2d, self.fragments, self.fragment_scales, self.fragment_zeros,
                                          self.group_size)
        elif self.row_layout:
            y = ops.int4_matmul_rows(x2d, self.qweight_rows, self.scales_rows, self.zeros_rows, self.group_size)
        else:
            y = ops.int4_matmul(x2d, self.qweight, self.scales, self.qzeros, self.g_idx, self.group_size, self.bits)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def forward_fused(self, x: torch.Tensor, norm: nn.Module | None = None, silu_mul: bool = False,
                      residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) self(prologue(x)), prologue: `norm` (an RMSNorm) or silu(gate) * up over x = gate|up.
        A decoder layer's steps between its GEMVs: at batch 1 on the GPU one kernel does all of them
        (ops.int4_gemv_rows_fused, or ops.int4_gemv_fragments for the steps it takes, on a layer holding
        fragments); elsewhere they run one after another, exactly as the layer wrote them."""
        x2d = x.reshape(-1, x.shape[-1])
        fusable = self.row_layout and self.bias is None and ops.int4_fused_gemv_applies(x2d)
        steps = ops.int4_fused_steps if fusable else frozenset()
        foldable = frozenset({"residual"} | ({"norm"} if ops.int4_tensor_core_norm else set()))
        on_fragment_gemv = self.fragments is not None and ops.int4_fragment_gemv_applies(x2d, self.fragments_only)
        if on_fragment_gemv and x2d.shape[0] > 1:  # 2..8 rows: only the fragment GEMV folds steps in
            steps = ops.int4_fused_steps & foldable if ops.int4_tensor_core_fold_rows else frozenset()
        elif self.fragments_only:  # only what the fragment GEMV folds in: the residual add, the RMSNorm if switched on
            steps = steps & foldable if on_fragment_gemv else frozenset()
        if norm is not None and ("norm" not in steps or not hasattr(norm, "eps")):
            x, norm = norm(x), None
        if silu_mul and "silu" not in steps:
            x, silu_mul = swiglu(x), False
        add_after = residual if "residual" not in steps else None
        residual = None if add_after is not None else residual
        on_fragments = on_fragment_gemv and not silu_mul and (norm is None or ops.int4_tensor_core_norm)
        if on_fragments and (norm is not None or residual is not None):
            y = ops.int4_gemv_fragments(x.reshape(-1, self.in_features), self.fragments, self.fragment_scales,
                                        self.fragment_zeros, self.group_size,
                                        None if residual is None else residual.reshape(-1, self.out_features),
                                        None if norm is None else norm.weight, 0.0 if norm is None else norm.eps)
            y = y.reshape(*x.shape[:-1], self.out_features)
        elif norm is not None or silu_mul or residual is not None:
            y = ops.int4_gemv_rows_fused(x.reshape(1, -1), self.qweight_rows, self.scales_rows, self.zeros_rows,
                                         self.group_size, None if norm is None else norm.weight,
                                         0.0 if norm is None else norm.eps, silu_mul,
                                         None if residual is None else residual.reshape(1, -1))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = self(x)
        return y if add_after is None else add_after + y

    def forward_swiglu(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor | None:
        """silu(gate) * up [..., I] of this fused gate|up layer (out_features 2I) over prologue(x) in one kernel,
        where the fragment GEMV takes it (ops.int4_tensor_core_swiglu); None elsewhere (the caller then runs
        the product and the SwiGLU apart)."""
        x2d = x.reshape(-1, x.shape[-1])
        if not (ops.int4_tensor_core_swiglu and self.fragments is not None and self.bias is None
                and ops.int4_fragment_gemv_applies(x2d, self.fragments_only)):
            return None
        fold_norm = (norm is not None and hasattr(norm, "eps") and ops.int4_tensor_core_norm
                     and (x2d.shape[0] == 1 or ops.int4_tensor_core_fold_rows))
        if norm is not None and not fold_norm:
            x, norm = norm(x), None
        y = ops.int4_gemv_fragments(x.reshape(-1, self.in_features), self.fragments, self.fragment_scales,
                                    self.fragment_zeros, self.group_size, None, None if norm is None else norm.weight,
                                    0.0 if norm is None else norm.eps, swiglu=True)
        return y.reshape(*x.shape[:-1], self.out_features // 2)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, act_order={self.g_idx is not None}, bias={self.bias is not None}, "
                f"layout={'fragments' if self.fragments_only else 'rows' if self.row_layout else 'gptq'}")


def replace_linears(model: nn.Module, quantized: dict[str, QuantizedWeight], dtype: torch.dtype | None = None) -> None:
    """Swap each named nn.Linear (e.g. "model.layers.0.self_attn.q_proj") for a QuantLinear built from `quantized`.

    Fused q|k|v and gate|up buffers are dropped first so they never shadow the quantized layers.
    `dtype` defaults to each replaced layer's weight dtype.
    """
    unfuse_projections(model)
    for name, qw in quantized.items():
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name} is a {type(linear).__name__}, not an nn.Linear")
        if tuple(qw.qweight.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}: quantized weight {tuple(qw.qweight.shape)} does not match the layer's "
                             f"{(linear.out_features, linear.in_features)}")
        target_dtype = dtype or linear.weight.dtype
        device = linear.weight.device
        qw = QuantizedWeight(qw.qweight.to(device), qw.scales.to(device), qw.zeros.to(device), qw.g_idx.to(device),
                             qw.scheme)
        bias = None if linear.bias is None else linear.bias.detach().to(target_dtype)
        model.set_submodule(name, QuantLinear.from_quantized(qw, bias=bias, dtype=target_dtype))


def use_row_layouts(model: nn.Module) -> int:
    """`QuantLinear.use_row_layout` for every quantized layer of `model` (the GPU decode path calls this once
    the model is on its device). Returns how many layers changed layout."""
    return sum(not m.row_layout and m.use_row_layout() for m in model.modules() if isinstance(m, QuantLinear))


def use_fragment_layouts(model: nn.Module, names: tuple[str, ...] = ("o_proj", "down_proj", "lm_head"),
                         packed: bool | None = None, only: bool | None = None) -> int:
    """`QuantLinear.use_fragment_layout` for the quantized layers of `model` whose name ends in one of `names`,
    and with `packed` the fused q|k|v and gate|up layers of model.fusion too; by default only where they would run
    on it (`ops.int4_tensor_core_norm` at batch 1, or more than one row allowed: a speculative verify step).
    With `only` (default `ops.int4_fragments_only`) the fragments replace the row layout in every quantized layer
    that can hold them (the members of a fused group become views of its fragments), so they cost no memory.
    Returns how many layers hold fragments."""
    only = ops.int4_fragments_only if only is None else only
    if packed is None:
        packed = only or ops.int4_tensor_core_norm or ops.int4_tensor_core_max_rows > 1
    groups = [(getattr(m, f"{prefix}_packed")[0], [getattr(m, name) for name in members])
              for m in model.modules() for _, prefix, members in FUSED_PROJECTIONS
              if getattr(m, f"{prefix}_packed", ()) and isinstance(getattr(m, f"{prefix}_packed")[0], QuantLinear)]
    in_groups = {id(member) for _, members in groups for member in members}
    layers = [m for name, m in model.named_modules() if isinstance(m, QuantLinear) and id(m) not in in_groups
              and (only or name.rsplit(".", 1)[-1] in names)]
    count = sum(m.use_fragment_layout(only) for m in layers)
    for fused, members in groups if packed else []:
        count += fused.use_fragment_layout(only)
        if fused.fragments_only:
            first_row = 0
            for member in members:
                member.share_fragments(fused, first_row)
                first_row += member.out_features
    return count


def use_decode_layouts(model: nn.Module, on_cuda: bool, fuse: bool) -> None:
    """The weight layouts a decoding model runs on (the generator, the engine and the speculative steps each call
    this once, with the model on its device): on CUDA int4 layers in the row layout the GPU kernels stream fastest;
    with `fuse`, q|k|v and gate|up as one product each; on CUDA with `ops.int4_tensor_core_gemv`, int4 layers as
    tensor-core fragments (`use_fragment_layouts`)."""
    if on_cuda:
        use_row_layouts(model)
    if fuse:
        fuse_projections(model)
    if on_cuda and ops.int4_tensor_core_gemv:
        use_fragment_layouts(model)

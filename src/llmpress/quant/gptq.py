"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize one column at a time and spread its rounding error over the columns not yet
quantized, weighted by the inverse Hessian of the layer's output error.

For a linear layer with inputs X, the error ||X W^T - X W_hat^T||^2 has Hessian H = 2 X^T X (per output
row, the same for all rows). After quantizing column j, the optimal update of the remaining columns is
delta = -(w_j - q_j) / [H^-1]_jj * [H^-1]_j,: (OBS, eq. 2 of the paper); GPTQ takes the columns in a
fixed order, which lets the whole row block share one Cholesky factor of H^-1 (Alg. 1).
Rows never interact, so stacking linears that read the same input (q|k|v) and quantizing once is exact.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llmpress.quant.rtn import find_scale_zero, group_bounds, group_index, quantize_levels
from llmpress.quant.scheme import QuantizedWeight, QuantScheme

log = logging.getLogger(__name__)


@dataclass
class GptqConfig:
    damp_percent: float = 0.01  # lambda = damp_percent * mean(diag H), added to the diagonal (Sec. 4, "Cholesky")
    block_size: int = 128  # columns per lazy batch update (Alg. 1, "lazy batch-updates")


class HessianAccumulator:
    """Running H = 2/n sum_t x_t x_t^T over the n calibration tokens seen so far (x: a linear's input rows).

    The running mean (rescale, then add) keeps entries O(|x|^2) however many tokens arrive, as the
    GPTQ reference's `add_batch` does; the 2/n factor does not change GPTQ's result (dampening is relative).
    """

    def __init__(self, in_features: int, device: torch.device | str, dtype: torch.dtype = torch.float32):
        self.hessian = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.num_tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        """x: [..., in_features], any leading shape; every row is one token."""
        x = x.reshape(-1, x.shape[-1]).to(self.hessian.dtype)
        n = x.shape[0]
        self.hessian *= self.num_tokens / (self.num_tokens + n)
        self.num_tokens += n
        x = x * (2.0 / self.num_tokens) ** 0.5
        self.hessian.addmm_(x.T, x)


def gptq_quantize_layer(weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
                        damp_percent: float = 0.01, block_size: int = 128) -> QuantizedWeight:
    """GPTQ Alg. 1 on weight [out, in] with hessian [in, in] (2/n X^T X of the layer's inputs)."""
    out_features, in_features = weight.shape
    assert hessian.shape == (in_features, in_features), f"hessian {tuple(hessian.shape)} for weight {tuple(weight.shape)}"
    maxq = scheme.max_level
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()

    # A channel that was always 0 in the calibration data carries no information about its weights:
    # give H a unit diagonal there (so it stays invertible) and quantize those weights to exactly 0.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    bounds = group_bounds(in_features, scheme)
    group_of = group_index(in_features, scheme).long()
    scales = torch.zeros(out_features, len(bounds), dtype=torch.float32, device=W.device)
    zeros = torch.zeros_like(scales)
    # Group parameters fixed up front: per channel (one group), or with act-order "static groups"
    # (GPTQModel): each group's scale/zero from its original, unpermuted columns, so g_idx stays
    # i // group_size and the checkpoint needs no reordering at inference.
    static = scheme.group_size == -1 or scheme.act_order
    if static:
        for g, (begin, end) in enumerate(bounds):
            scales[:, g], zeros[:, g] = find_scale_zero(W[:, begin:end], scheme)

    # act-order (desc_act): columns with the largest Hessian diagonal (largest inputs) first, while
    # many unquantized columns remain to absorb their error (the paper's Sec. 5 / reference `--act-order`).
    perm = torch.argsort(torch.diag(H), descending=True) if scheme.act_order else None
    if perm is not None:
        W, H, group_of = W[:, perm], H[perm][:, perm], group_of[perm.cpu()]

    Hinv = _upper_cholesky_of_inverse(H, damp_percent)
    group_of = group_of.tolist()  # read once per column: a Python list costs no device sync
    levels = torch.zeros_like(W)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not static and col == bounds[g][0]:
                # Dynamic groups: the group's range is taken from its columns as they are now, after the
                # error updates of every earlier column (reference: find_params when (i1 + i) % groupsize == 0).
                # Columns past this block have not received this block's lazy update yet, as in the reference.
                end = bounds[g][1]
                cols = W1[:, i:i + end - col] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                scales[:, g], zeros[:, g] = find_scale_zero(cols, scheme)
            w = W1[:, i]
            q = quantize_levels(w, scales[:, g], zeros[:, g], maxq)
            levels[:, col] = q
            err = (w - scales[:, g] * (q - zeros[:, g])) / Hinv1[i, i]
            # OBS update of the rest of this block (Alg. 1, inner loop).
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        # Lazy batch update: the columns after this block receive all of its errors in one matmul.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    if perm is not None:
        levels = levels[:, torch.argsort(perm)]
    return QuantizedWeight(qweight=levels.to(torch.uint8), scales=scales, zeros=zeros.to(torch.uint8),
                           g_idx=group_index(in_features, scheme).to(W.device), scheme=scheme)


def _upper_cholesky_of_inverse(H: torch.Tensor, damp_percent: float, max_tries: int = 4) -> torch.Tensor:
    """U with H^-1 = U^T U (upper Cholesky factor), after dampening H's diagonal by damp_percent * mean(diag H).

    Row j of U, divided by U_jj, is the OBS update direction for column j given that columns < j are
    already fixed (Sec. 4, "Cholesky reformulation"): Alg. 1 only ever reads these rows.
    """
    diag = torch.arange(H.shape[0], device=H.device)
    mean_diag = torch.mean(torch.diag(H))
    for _ in range(max_tries):
        damped = H.clone()
        damped[diag, diag] += damp_percent * mean_diag
        L, info = torch.linalg.cholesky_ex(damped)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        # Too few tokens for the layer's width leave H (nearly) singular; more dampening is the reference
        # remedy (GPTQModel retries the same way). Said out loud, since it changes the result.
        log.warning("GPTQ: Hessian not positive definite with damp_percent=%g; retrying with %g "
                    "(more calibration tokens avoid this).", damp_percent, damp_percent * 10)
        damp_percent *= 10
    raise RuntimeError(f"GPTQ: the Hessian stayed singular up to damp_percent={damp_percent / 10:g}; "
                       "calibrate with more tokens.")

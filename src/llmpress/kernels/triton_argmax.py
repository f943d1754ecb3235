"""Greedy next tokens: the argmax of each row of logits [R, V], in two small Triton kernels.

At batch 1 torch.argmax over a 128k vocabulary is one reduction of a single output, which PyTorch runs on a few
threads: 26.3 us on the H200, about 3% of the int4 3B's decode step; these kernels take 2.75 us
(benchmarks/argmax_gpu.py, results/argmax_h200.*). The row is split over many programs: each finds the max of its
BLOCK values and where it is, then one program a row picks the best of those. Ties go to the lowest index, as in
torch.argmax, and a NaN counts as +inf (torch.argmax returns the first NaN: the two differ only for a row holding
+inf before its first NaN). Reference: `reference.greedy_tokens_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # values a program reads: 63 programs a row at V = 128256


@triton.jit
def _block_argmax(logits_ptr, row_stride, vocab, block_max_ptr, block_index_ptr, blocks, BLOCK: tl.constexpr):
    row = tl.program_id(1)
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    values = tl.load(logits_ptr + row * row_stride + offsets, mask=offsets < vocab, other=float("-inf"))
    values = values.to(tl.float32)
    values = tl.where(values != values, float("inf"), values)  # NaN wins, as in torch.argmax
    best, at = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(block_max_ptr + row * blocks + block, best)
    tl.store(block_index_ptr + row * blocks + block, block * BLOCK + at)


@triton.jit
def _row_argmax(block_max_ptr, block_index_ptr, tokens_ptr, blocks, BLOCKS: tl.constexpr):
    row = tl.program_id(0)
    b = tl.arange(0, BLOCKS)
    values = tl.load(block_max_ptr + row * blocks + b, mask=b < blocks, other=float("-inf"))
    # Blocks are in index order, so the leftmost best block holds the row's first maximum.
    _, at = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(tokens_ptr + row, tl.load(block_index_ptr + row * blocks + at).to(tl.int64))


@triton.jit
def _rows_argmax_advance(block_max_ptr, block_index_ptr, blocks, token_ptr, token_stride, produced_ptr,
                         produced_stride, position_ptr, ROWS: tl.constexpr, BLOCKS: tl.constexpr):
    """A greedy step's ending in one program: each row's token into token[row] (the next step's input) and
    produced[row, position], then position + 1 (generation/greedy_step.py)."""
    b = tl.arange(0, BLOCKS)
    position = tl.load(position_ptr)
    for row in tl.static_range(ROWS):
        values = tl.load(block_max_ptr + row * blocks + b, mask=b < blocks, other=float("-inf"))
        _, at = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
        token = tl.load(block_index_ptr + row * blocks + at).to(tl.int64)
        tl.store(token_ptr + row * token_stride, token)
        tl.store(produced_ptr + row * produced_stride + position, token)
    tl.debug_barrier()  # every thread has read the position before one of them moves it on
    tl.store(position_ptr, position + 1)


def _block_maxima(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Stage one over rows [R, V] (last dim contiguous): each block's max and where it is, [R, blocks] each."""
    num_rows, vocab = rows.shape
    blocks = triton.cdiv(vocab, BLOCK)
    block_max = torch.empty(num_rows, blocks, dtype=torch.float32, device=rows.device)
    block_index = torch.empty(num_rows, blocks, dtype=torch.int32, device=rows.device)
    _block_argmax[(blocks, num_rows)](rows, rows.stride(0), vocab, block_max, block_index, blocks, BLOCK=BLOCK,
                                      num_warps=8)
    return block_max, block_index, blocks


def greedy_advance_triton(logits: torch.Tensor, token: torch.Tensor, produced: torch.Tensor,
                          position: torch.Tensor) -> None:
    """logits [B, V]; token [B, 1], produced [B, S] int64; position [1] int64: token[:, 0] = produced[:, position] =
    argmax of each row, then position += 1, in place (the reference: ops.greedy_advance)."""
    assert logits.dim() == 2 and logits.stride(-1) == 1 and logits.shape[0] == token.shape[0] == produced.shape[0]
    assert token.dtype == produced.dtype == position.dtype == torch.int64 and produced.stride(1) == 1
    block_max, block_index, blocks = _block_maxima(logits)
    _rows_argmax_advance[(1,)](block_max, block_index, blocks, token, token.stride(0), produced, produced.stride(0),
                               position, ROWS=logits.shape[0], BLOCKS=triton.next_power_of_2(blocks), num_warps=1)


def greedy_tokens_triton(logits: torch.Tensor) -> torch.Tensor:
    """logits: [..., V] (fp32/bf16/fp16, last dim contiguous) -> int64 [...], the index of each row's maximum."""
    assert logits.stride(-1) == 1, "greedy_tokens_triton takes logits whose last dim is contiguous"
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    if rows.stride(0) < vocab:  # a reshape that could not be a view gives contiguous rows; broadcast rows do not
        rows = rows.contiguous()
    num_rows = rows.shape[0]
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    if num_rows:
        block_max, block_index, blocks = _block_maxima(rows)
        _row_argmax[(num_rows,)](block_max, block_index, tokens, blocks, BLOCKS=triton.next_power_of_2(blocks),
                                 num_warps=1)
    return tokens.reshape(logits.shape[:-1])

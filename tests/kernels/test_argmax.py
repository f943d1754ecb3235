"""Greedy tokens (kernels/triton_argmax.py) against torch.argmax: ties, NaN, -inf rows, odd vocabularies, dtypes.

On the CPU the Triton kernels run under Triton's interpreter, in a process of their own (the interpreter is picked
when triton is first imported); on CUDA they run for real."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from llmpress.kernels import ops
from llmpress.kernels.reference import greedy_tokens_reference

BLOCK = 2048  # triton_argmax.BLOCK, spelled out so that this module imports without triton


def argmax_cases(device: str) -> list[tuple[str, torch.Tensor]]:
    """(name, logits) pairs whose answers torch.argmax defines; the same tensors on every device."""
    torch.manual_seed(0)
    cases = [("fp32 3 rows, vocab not a multiple of the block", torch.randn(3, 2 * BLOCK + 77)),
             ("one row of the 128k vocabulary", torch.randn(1, 128256)),
             ("a vocabulary smaller than a block", torch.randn(2, 100)),
             ("1-d logits", torch.randn(5000)),
             ("3-d logits", torch.randn(2, 3, 3000))]
    ties = torch.randn(4, 3 * BLOCK)
    ties[0, [5, 9]] = 10.0  # two maxima in one block
    ties[1, [BLOCK + 3, 2 * BLOCK + 1]] = 10.0  # in two blocks: the first one's
    ties[2, [2 * BLOCK + 1, BLOCK + 3]] = 10.0
    ties[3] = 1.5  # every value the same: index 0
    cases.append(("ties go to the first maximum", ties))
    special = torch.randn(3, 2 * BLOCK)
    special[0, BLOCK + 7] = float("nan")  # NaN wins, as in torch.argmax
    special[1] = float("-inf")  # nothing finite: index 0
    special[2, [11, BLOCK + 11]] = float("inf")
    cases.append(("NaN, -inf rows, +inf", special))
    rounded = torch.randn(2, 3 * BLOCK)
    rounded[:, 4000] = rounded.max() + 1e-3  # ties only after rounding to 16 bits
    for dtype in (torch.bfloat16, torch.float16):
        cases.append((f"{dtype} logits", rounded.to(dtype)))
    strided = torch.randn(3, 2 * BLOCK + 64)[:, :2 * BLOCK + 1]  # rows further apart than their length
    cases.append(("rows of a wider buffer", strided))
    return [(name, logits.to(device)) for name, logits in cases]


def expected_tokens() -> list[list[int]]:
    return [torch.atleast_1d(greedy_tokens_reference(logits)).tolist() for _, logits in argmax_cases("cpu")]


def test_reference_is_torch_argmax_and_cpu_ops_use_it():
    for name, logits in argmax_cases("cpu"):
        assert torch.equal(ops.greedy_tokens(logits), logits.argmax(dim=-1)), name
    nan_row = argmax_cases("cpu")[6][1][0]
    assert greedy_tokens_reference(nan_row).item() == BLOCK + 7  # torch.argmax's NaN rule, which the kernel keeps


def advance_cases(device: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(logits, token, produced, position) for greedy_advance: 1 and 3 rows, positions 0 and the last slot."""
    torch.manual_seed(1)
    cases = []
    for rows, position, dtype in ((1, 0, torch.bfloat16), (3, 6, torch.float32), (3, 3, torch.float16)):
        logits = torch.randn(rows, 2 * BLOCK + 5).to(dtype)
        logits[-1, BLOCK + 1] = logits[-1, 3] = 50.0  # a tie across blocks: the first
        cases.append((logits, torch.full((rows, 1), -1), torch.full((rows, 7), -1), torch.tensor([position])))
    return [tuple(t.to(device) for t in case) for case in cases]


def advanced(advance, device: str) -> list[list[list[int]]]:
    """The buffers after advance(*case) for each case: token, produced, position."""
    out = []
    for logits, token, produced, position in advance_cases(device):
        advance(logits, token, produced, position)
        out.append([token.tolist(), produced.tolist(), position.tolist()])
    return out


def expected_advance() -> list[list[list[int]]]:
    def reference(logits, token, produced, position):
        tokens = logits.float().argmax(dim=-1)
        produced[:, position.item()] = tokens
        token[:, 0] = tokens
        position += 1
    return advanced(reference, "cpu")


def test_greedy_advance_on_the_cpu_writes_the_token_twice_and_moves_the_position():
    assert advanced(ops.greedy_advance, "cpu") == expected_advance()
    token, produced, position = expected_advance()[2]  # position 3 -> 4, both copies of the token agree
    assert position == [4] and token == [[row[3]] for row in produced] and all(row.count(-1) == 6 for row in produced)


INTERPRETED = """
import json
from tests.kernels.test_argmax import advance_cases, advanced, argmax_cases
from llmpress.kernels.triton_argmax import BLOCK, greedy_advance_triton, greedy_tokens_triton
import torch
assert BLOCK == 2048
print(json.dumps([torch.atleast_1d(greedy_tokens_triton(logits)).tolist() for _, logits in argmax_cases("cpu")]))
print(json.dumps(advanced(greedy_advance_triton, "cpu")))
"""


@pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton (its interpreter runs the kernels on the CPU)")
def test_triton_kernels_under_the_interpreter_match_torch_argmax():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, "-c", INTERPRETED], env={**os.environ, "TRITON_INTERPRET": "1"},
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.splitlines()[-2])
    for (name, _), tokens, expected in zip(argmax_cases("cpu"), got, expected_tokens()):
        assert tokens == expected, name
    assert json.loads(result.stdout.splitlines()[-1]) == expected_advance()


@pytest.mark.skipif(not ops.triton_available(), reason="needs a CUDA GPU")
def test_triton_kernels_on_cuda_match_torch_argmax_and_capture_in_a_graph():
    for (name, logits), expected in zip(argmax_cases("cuda"), expected_tokens()):
        tokens = ops.greedy_tokens(logits)
        assert tokens.dtype == torch.int64 and tokens.shape == logits.shape[:-1], name
        assert torch.atleast_1d(tokens).tolist() == expected, name
    logits = torch.randn(1, 128256, device="cuda", dtype=torch.bfloat16)
    ops.greedy_tokens(logits)  # compile before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = ops.greedy_tokens(logits)
    for _ in range(3):
        logits.copy_(torch.randn_like(logits))
        graph.replay()
        assert tokens.tolist() == logits.float().argmax(dim=-1).tolist()
    assert advanced(ops.greedy_advance, "cuda") == expected_advance()

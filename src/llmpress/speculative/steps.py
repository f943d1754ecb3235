"""A model bound to its own static KV cache, with forward steps of a fixed token count.

Speculative decoding runs two such steps per round: the draft's one-token step and the target's
(k+1)-token verify step. Both have static shapes, so on CUDA each is captured once as a CUDA graph
(optionally after torch.compile), exactly as plain decoding does in generation/generator.py.
Rolling back after a rejection needs no copy: positions past the accepted ones hold stale k/v
that the causal mask hides until later tokens overwrite them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.generation import cuda_graph
from llmpress.generation.cuda_graph import GraphedStep
from llmpress.generation.generator import DECODE_MODES
from llmpress.model import StaticKVCache
from llmpress.quant.linear import use_decode_layouts


def ids_on(ids: list[int], device: torch.device) -> torch.Tensor:
    """Token ids [len(ids)] on `device` without a stream sync: a blocking host-to-GPU copy makes the host wait for
    every kernel queued before it, so it could not queue a round's verify step while the drafts still run. (From
    pageable memory the driver stages the ids before the call returns, so the list may go.)"""
    return torch.tensor(ids, dtype=torch.long).to(device, non_blocking=True)


# Each step length is its own compiled graph of one function (and each model's steps share it), more than dynamo's
# default of 8 recompilations allows with adaptive draft lengths or several generators in one process.
RECOMPILE_LIMIT = 64


def allow_recompiles(limit: int = RECOMPILE_LIMIT) -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    setattr(config, name, max(getattr(config, name), limit))


def resolve_mode(mode: str, device: torch.device) -> str:
    """`auto` -> compile on CUDA, eager elsewhere; graph modes refused off CUDA (as Generator does)."""
    if mode not in DECODE_MODES:
        raise LlmpressError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}.")
    if mode == "auto":
        return "compile" if device.type == "cuda" else "eager"
    if mode in ("graph", "compile") and device.type != "cuda":
        raise LlmpressError(f"decode mode {mode!r} needs a CUDA device; use --decode-mode eager on CPU.")
    return mode


class CachedModel:
    """`model` (LlamaForCausalLM-like: forward(ids, positions, cache), .config, .device, .dtype) with a
    batch-1 static cache of `max_seq_len` usable positions plus `scratch` slots at the end.

    Graph capture runs the step a few times on junk input; it writes at the scratch slots, which no
    real position reaches, so steps can be captured lazily in the middle of a generation.
    """

    def __init__(self, model: nn.Module, max_seq_len: int, mode: str = "eager", scratch: int = 16):
        self.model, self.mode, self.max_seq_len = model, resolve_mode(mode, model.device), max_seq_len
        limit = model.config.max_position_embeddings
        if max_seq_len + scratch > limit:
            raise LlmpressError(f"{max_seq_len} positions (+{scratch} for speculation) requested but the model's "
                                f"context is {limit}; shorten the prompt or lower --max-new-tokens.")
        use_decode_layouts(model, model.device.type == "cuda", fuse=self.mode != "eager")  # as in Generator
        self.scratch = scratch
        self.cache = StaticKVCache(model.config, 1, max_seq_len + scratch, model.dtype, model.device)
        self._steps: dict[int, Callable] = {}
        self._compiled = None

    def _forward_all(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions, self.cache)

    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids: [1, T] at positions 0..T-1 (eager: prompt lengths vary). Returns the last logits [1, V]."""
        positions = torch.arange(input_ids.shape[1], device=self.model.device)
        return self.model(input_ids, positions, self.cache, last_only=True)[:, -1]

    def step(self, input_ids: torch.Tensor, start: int) -> torch.Tensor:
        """input_ids: [1, m] at positions start..start+m-1. Returns logits [1, m, V]; in the graph modes a
        static buffer that the next call of the same length overwrites."""
        m = input_ids.shape[1]
        assert start + m <= self.max_seq_len, (start, m, self.max_seq_len)
        positions = torch.arange(start, start + m, device=self.model.device)
        return self.step_fn(m)(input_ids, positions)

    def forward_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """forward(ids [1, m], positions [m]) -> logits [1, m, V], uncaptured: what a caller that captures a larger
        graph of its own calls (device_rounds.py). Compiled in `compile` mode: one compiled callable, each length
        its own static-shape graph."""
        if self.mode != "compile":
            return self._forward_all
        if self._compiled is None:
            allow_recompiles()
            self._compiled = torch.compile(self._forward_all, fullgraph=True, dynamic=False,
                                           options=dict(cuda_graph.STEP_COMPILE_OPTIONS))
        return self._compiled

    def step_fn(self, m: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The m-token step for this mode, built (compiled, captured) on first use."""
        if m in self._steps:
            return self._steps[m]
        if self.mode == "eager":
            self._steps[m] = self._forward_all
            return self._forward_all
        if m > self.scratch:
            raise LlmpressError(f"a {m}-token step needs {m} scratch slots but the cache has {self.scratch}; "
                                "lower --num-speculative-tokens.")
        fn = self.forward_fn()
        total = self.max_seq_len + self.scratch
        positions = torch.arange(total - m, total, device=self.model.device)
        tokens = torch.zeros(1, m, dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            self._steps[m] = GraphedStep(fn, (tokens, positions))
        return self._steps[m]

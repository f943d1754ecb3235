"""Prefill + decode loop over a static KV cache (gpt-fast style).

On CUDA the one-token decode step is compiled with torch.compile (which fuses the norm, rope and
activation arithmetic into a few Triton kernels) and captured as a CUDA graph (one launch per token
instead of hundreds): at batch 1 the step is then bound by reading the weights, not by the CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from llmpress.errors import LlmpressError
from llmpress.generation import cuda_graph
from llmpress.generation.cuda_graph import GraphedStep
from llmpress.generation.greedy_step import GreedyStep
from llmpress.generation.sampling import SamplingParams, sample_next_token
from llmpress.model import LlamaForCausalLM, StaticKVCache
from llmpress.quant.linear import use_decode_layouts

DECODE_MODES = ("auto", "eager", "graph", "compile")
# Greedy decoding without a repetition penalty runs GreedyStep (the argmax and the next inputs inside the step, no
# host work between steps); False keeps the logits step for it too, for benchmarks/int4_gpu.py's comparison.
greedy_steps_on_device = True
# Greedy steps captured together as one CUDA graph, replayed while at least that many tokens are still wanted.
# 1: four a graph ran the 3B's int4 decode on the H200 at 1083.7 / 1081.4 tok/s against 1085.3 / 1080.0
# (results/int4_h200_s17b.*) and 1092.0 / 1090.6 against 1089.4 / 1091.4 (int4_h200_s17e.*); bf16 not timed yet.
greedy_steps_per_graph = 1


@dataclass
class GenerationOutput:
    token_ids: torch.Tensor  # [B, N] generated ids, on CPU; rows that stopped early are padded with their stop id
    num_generated: list[int]  # per row, tokens generated up to and including a stop token
    prompt_len: int
    prefill_s: float  # time to first token (prefill + first sample)
    decode_s: float  # time for the remaining tokens
    finish_reasons: list[str] = field(default_factory=list)  # "stop" or "length"

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second per sequence after the first token."""
        steps = self.token_ids.shape[1] - 1
        return steps / self.decode_s if self.decode_s > 0 and steps > 0 else float("nan")


class Generator:
    """Generates from one model with a cache of `max_seq_len` positions for `batch_size` sequences.

    mode: `eager` (plain PyTorch, every device), `graph` (CUDA graph of the eager step),
    `compile` (torch.compile + CUDA graph), `auto` (compile on CUDA, eager elsewhere).
    fuse: concatenate q|k|v and gate|up weights (default: in the graph modes; see model.fusion).
    """

    def __init__(self, model: LlamaForCausalLM, max_seq_len: int, batch_size: int = 1, mode: str = "auto",
                 fuse: bool | None = None):
        if mode not in DECODE_MODES:
            raise LlmpressError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}.")
        on_cuda = model.device.type == "cuda"
        if mode == "auto":
            mode = "compile" if on_cuda else "eager"
        if mode in ("graph", "compile") and not on_cuda:
            raise LlmpressError(f"decode mode {mode!r} needs a CUDA device; use --decode-mode eager on CPU.")
        limit = model.config.max_position_embeddings
        if max_seq_len > limit:
            raise LlmpressError(f"{max_seq_len} positions requested but the model's context is {limit}; "
                                "shorten the prompt or lower --max-new-tokens.")
        self.model, self.mode, self.batch_size, self.max_seq_len = model, mode, batch_size, max_seq_len
        # eager stays the plain reference path: unfused
        use_decode_layouts(model, on_cuda, fuse=fuse if fuse is not None else mode != "eager")
        self.cache = StaticKVCache(model.config, batch_size, max_seq_len, model.dtype, model.device)
        self._decode: Callable | None = None
        self._greedy: GreedyStep | None = None

    # -- steps -------------------------------------------------------------------------------
    def _forward_last(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions, self.cache, last_only=True)[:, -1]

    def _decode_step_fn(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The one-token step for this mode, built (compiled, captured) on first use."""
        if self._decode is not None:
            return self._decode
        if self.mode == "eager":
            self._decode = self._forward_last
            return self._decode
        step = self._forward_last
        if self.mode == "compile":
            # Inductor's own CUDA graphs stay off: we capture the whole step ourselves below.
            step = torch.compile(self._forward_last, fullgraph=True, dynamic=False,
                                 options=dict(cuda_graph.STEP_COMPILE_OPTIONS))
        # Capture before any prefill: warm-up writes junk k/v at the last slot, which the causal mask
        # hides until a real token overwrites it.
        last = torch.full((1,), self.max_seq_len - 1, dtype=torch.long, device=self.model.device)
        token = torch.zeros(self.batch_size, 1, dtype=torch.long, device=self.model.device)
        with torch.inference_mode():
            self._decode = GraphedStep(step, (token, last))
        return self._decode

    def _greedy_step(self) -> GreedyStep:
        """The greedy step for this mode, built (compiled, captured) on first use, before any prefill (see above)."""
        if self._greedy is None:
            self._greedy = GreedyStep(self._forward_last, self.batch_size, self.max_seq_len, self.model.device,
                                      self.mode, greedy_steps_per_graph)
        return self._greedy

    @staticmethod
    def _greedy_on_device(params: SamplingParams) -> bool:
        return greedy_steps_on_device and params.greedy and params.repetition_penalty == 1

    def warmup(self, params: SamplingParams | None = None) -> None:
        """Compile and capture the decode step that `params` (default: greedy) will use now, so that timings
        exclude it."""
        if self._greedy_on_device(params or SamplingParams()):
            self._greedy_step()
        else:
            self._decode_step_fn()

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def stream(self, prompt_ids: torch.Tensor, params: SamplingParams,
               stop_token_ids: list[int] = ()) -> Iterator[torch.Tensor]:
        """prompt_ids: [B, T] (same length for every row). Yields the next token ids [B] per step, on device
        (greedy steps yield views into the step's buffer, valid until this generator's next generation)."""
        device = self.model.device
        prompt_ids = prompt_ids.to(device)
        B, T = prompt_ids.shape
        if B != self.batch_size:
            raise LlmpressError(f"this generator was built for batch {self.batch_size}, got {B} prompts.")
        if T + params.max_new_tokens > self.max_seq_len:
            raise LlmpressError(f"prompt of {T} tokens + {params.max_new_tokens} new tokens exceeds the "
                                f"{self.max_seq_len}-token cache; shorten the prompt or lower --max-new-tokens.")
        on_device = self._greedy_on_device(params)
        greedy = self._greedy_step() if on_device else None
        decode = None if on_device else self._decode_step_fn()
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(params.seed)
        stops = torch.tensor(sorted(set(stop_token_ids)) or [-1], device=device)
        seen = prompt_ids
        logits = self._forward_last(prompt_ids, torch.arange(T, device=device))
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        queued = 0  # greedy steps run: tokens 1..queued are in greedy.produced
        for step in range(params.max_new_tokens):
            if step > 0 and greedy is not None:
                token = greedy.produced_after(T + step - 1)
            else:
                token = sample_next_token(logits, params, generator, seen if params.repetition_penalty != 1 else None)
            yield token
            if not params.ignore_eos:
                finished |= torch.isin(token, stops)
                if bool(finished.all()):  # one host sync per step; benchmarks set ignore_eos to skip it
                    return
            if step + 1 == params.max_new_tokens:
                return
            if greedy is not None:  # a step consumes the token at T + step and picks the next one itself
                if step == 0:
                    greedy.start(token, T)
                if queued == step:
                    queued += greedy.steps(params.max_new_tokens - 1 - queued)
                continue
            if params.repetition_penalty != 1:
                seen = torch.cat([seen, token[:, None]], dim=1)
            position = torch.full((1,), T + step, dtype=torch.long, device=device)
            logits = decode(token[:, None], position)

    def generate(self, prompt_ids: torch.Tensor, params: SamplingParams,
                 stop_token_ids: list[int] = (), on_token: Callable[[torch.Tensor], None] | None = None) -> GenerationOutput:
        """Run to completion; `on_token` (if given) sees each step's tokens [B] on CPU, for streaming."""
        device = self.model.device
        self.warmup(params)  # compile/capture is not part of any timing
        stop_set = set(stop_token_ids) if not params.ignore_eos else set()
        synchronize(device)
        start = time.perf_counter()
        first_token_at = None
        tokens = []
        for token in self.stream(prompt_ids, params, stop_token_ids):
            if first_token_at is None:
                synchronize(device)
                first_token_at = time.perf_counter()
            tokens.append(token)
            if on_token is not None:
                on_token(token.cpu())
        synchronize(device)
        end = time.perf_counter()
        ids = torch.stack(tokens, dim=1).cpu()
        num_generated, reasons = [], []
        for row in ids.tolist():
            stop_at = next((i for i, t in enumerate(row) if t in stop_set), None)
            num_generated.append(len(row) if stop_at is None else stop_at + 1)
            reasons.append("length" if stop_at is None else "stop")
            if stop_at is not None:
                row[stop_at + 1:] = [row[stop_at]] * (len(row) - stop_at - 1)
        return GenerationOutput(torch.tensor(ids.tolist()), num_generated, prompt_ids.shape[1],
                                prefill_s=first_token_at - start, decode_s=end - first_token_at, finish_reasons=reasons)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

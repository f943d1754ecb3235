"""Perplexity over one long token stream, the protocol of the GPTQ and AWQ papers.

The joined text is tokenized once; the stream is cut into windows of `seq_len` tokens, each run
through the model on its own (no state carried between windows). Non-overlapping (default): window k
is tokens [k*L, (k+1)*L), its L-1 predicted tokens are scored, the final partial window is dropped
(GPTQ: `nsamples = numel // seqlen`). With `stride` S < L, Hugging Face's sliding-window protocol:
windows of L tokens start every S tokens and each scores only the tokens no earlier window scored, so
every token after the first window is predicted from at least L-S tokens of context.
PPL = exp(total NLL / total scored tokens).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from llmpress.errors import LlmpressError
from llmpress.eval.data import load_eval_text

# Rows of logits converted to float32 at a time for the loss: 2**25 elements is 128 MiB, so a
# [2048, 128256] window is never copied to float32 whole (the model already holds it in its own dtype).
LOSS_CHUNK_ELEMENTS = 2**25


@dataclass
class PerplexityConfig:
    seq_len: int = 2048
    stride: int | None = None  # None: non-overlapping windows (stride = seq_len)
    max_windows: int | None = None  # None: every full window of the text
    batch_size: int = 1

    def __post_init__(self):
        if self.seq_len < 2:
            raise LlmpressError(f"--seq-len {self.seq_len} is too small; a window needs at least 2 tokens.")
        if self.stride is not None and not 1 <= self.stride <= self.seq_len:
            raise LlmpressError(f"--stride {self.stride} must be between 1 and --seq-len ({self.seq_len}).")
        if self.max_windows is not None and self.max_windows < 1:
            raise LlmpressError(f"--max-windows {self.max_windows} must be at least 1 (or left out for all windows).")
        if self.batch_size < 1:
            raise LlmpressError(f"--batch-size {self.batch_size} must be at least 1.")


@dataclass
class PerplexityResult:
    ppl: float
    nll_mean: float  # nats per scored token
    num_tokens_scored: int
    num_windows: int
    seq_len: int
    stride: int  # seq_len when the windows do not overlap
    seconds: float
    tokens_per_s: float  # tokens run through the model (num_windows * seq_len) per second


@dataclass
class Window:
    begin: int  # index of the window's first token in the stream
    first_scored: int  # index within the window of the first token whose prediction counts (>= 1)


def tokenize_for_ppl(tokenizer, text: str) -> torch.Tensor:
    """Token ids [N] int64 of the whole text, tokenized once (special tokens as the tokenizer adds them)."""
    if tokenizer is None:  # random-weight architectures load without one
        raise LlmpressError("this model has no tokenizer, which perplexity on text needs; "
                            "pass a model directory or .gguf file that includes one.")
    # verbose=False: the stream is far longer than model_max_length on purpose; windows cut it later.
    return tokenizer(text, return_tensors="pt", verbose=False).input_ids[0].to(torch.int64)


def plan_windows(num_tokens: int, seq_len: int, stride: int, max_windows: int | None = None) -> list[Window]:
    """Full windows of `seq_len` starting every `stride` tokens, each scoring what no earlier window scored."""
    windows, scored_until = [], 0
    for begin in range(0, num_tokens - seq_len + 1, stride):
        # Position 0 of a window has no context inside it, so it is never scored (the first window
        # scores seq_len-1 tokens, as GPTQ does).
        windows.append(Window(begin, max(1, scored_until - begin)))
        scored_until = begin + seq_len
        if max_windows is not None and len(windows) == max_windows:
            break
    return windows


def evaluate_perplexity(model, token_ids: torch.Tensor, config: PerplexityConfig | None = None,
                        progress: bool = True) -> PerplexityResult:
    """Perplexity of `model` (input_ids [B, T] -> logits [B, T, vocab]) on token_ids [N] int64."""
    config = config or PerplexityConfig()
    assert token_ids.dim() == 1, f"token_ids must be one stream [N], got shape {tuple(token_ids.shape)}"
    seq_len, stride = config.seq_len, config.stride or config.seq_len
    max_positions = model.config.max_position_embeddings
    if seq_len > max_positions:
        raise LlmpressError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_positions}); "
                            f"use --seq-len {max_positions} or less.")
    num_tokens = token_ids.numel()
    if num_tokens < seq_len:
        raise LlmpressError(f"the evaluation text has only {num_tokens} tokens, fewer than one window of "
                            f"--seq-len {seq_len}; lower --seq-len to {num_tokens} or less, or use a longer text.")
    windows = plan_windows(num_tokens, seq_len, stride, config.max_windows)
    device = next(model.parameters()).device
    token_ids = token_ids.to(device)
    total_nll = torch.zeros((), dtype=torch.float64, device=device)
    num_scored = sum(seq_len - w.first_scored for w in windows)

    start = time.perf_counter()
    scored_so_far = 0
    with torch.inference_mode(), tqdm(total=len(windows), desc="ppl", unit="window", disable=not progress) as bar:
        for i in range(0, len(windows), config.batch_size):
            batch = windows[i:i + config.batch_size]
            input_ids = torch.stack([token_ids[w.begin:w.begin + seq_len] for w in batch])
            logits = model(input_ids)
            assert logits.shape[:2] == input_ids.shape, f"logits {tuple(logits.shape)} for input {tuple(input_ids.shape)}"
            for row, w in enumerate(batch):
                # Logits at position t predict token t+1.
                total_nll += summed_nll(logits[row, w.first_scored - 1:-1], input_ids[row, w.first_scored:])
                scored_so_far += seq_len - w.first_scored
            del logits  # free [B, T, vocab] before the next forward allocates its own
            if progress:
                bar.set_postfix(ppl=f"{math.exp(total_nll.item() / scored_so_far):.3f}", refresh=False)
            bar.update(len(batch))
    nll_mean = total_nll.item() / num_scored  # .item() also waits for the GPU before the clock stops
    seconds = time.perf_counter() - start
    return PerplexityResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, num_tokens_scored=num_scored,
                            num_windows=len(windows), seq_len=seq_len, stride=stride, seconds=seconds,
                            tokens_per_s=len(windows) * seq_len / seconds)


def summed_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log softmax(logits)[target] in float32, a float64 scalar. logits: [T, vocab]; targets: [T]."""
    rows = max(1, LOSS_CHUNK_ELEMENTS // logits.shape[-1])
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for s in range(0, targets.numel(), rows):
        # Float32: in bf16 each token's loss would keep 8 significant bits and the sum would drift.
        total += F.cross_entropy(logits[s:s + rows].float(), targets[s:s + rows], reduction="sum").double()
    return total


def run_perplexity(loaded_model, data: str = "default", config: PerplexityConfig | None = None,
                   progress: bool = True) -> PerplexityResult:
    """Perplexity of a `LoadedModel` on `data` (wikitext2 | default | PATH); the pipeline's entry point."""
    text, _ = load_eval_text(data)
    return evaluate_perplexity(loaded_model.model, tokenize_for_ppl(loaded_model.tokenizer, text), config, progress)

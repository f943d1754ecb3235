"""Fine-tuning text: a training token stream, a validation tail for early stopping, and shuffled chunks.

`--data default` trains on the calibration quarter of the packaged WikiText-2 *test* articles
(`default:calib`): offline we only have WikiText-2's test split (the seeds train on its train split,
`--data wikitext2`, which needs `datasets` and a network). Perplexity is then reported on
`default:heldout`, the other three quarters, which training, validation and early stopping never read.
Validation is the last `val_fraction` of the training stream (its last articles), kept out of training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from llmpress.errors import LlmpressError
from llmpress.eval.data import DEFAULT_NAME, HUB_NAME, load_eval_text
from llmpress.eval.perplexity import tokenize_for_ppl

log = logging.getLogger(__name__)


@dataclass
class TrainingTokens:
    train: torch.Tensor  # [N_train] int64
    validation: torch.Tensor  # [N_val] int64, the tail of the stream, never trained on
    description: str


def training_text(data: str) -> tuple[str, str]:
    """(text, description) for `--data` default | wikitext2 | default:calib | PATH."""
    if data in (DEFAULT_NAME, f"{DEFAULT_NAME}:calib"):
        text, description = load_eval_text(f"{DEFAULT_NAME}:calib")
        return text, description + "; perplexity is reported on default:heldout, which training never reads"
    if data == HUB_NAME:
        from llmpress.quant.calibration import _load_hub_dataset
        rows = _load_hub_dataset("wikitext", "wikitext-2-raw-v1", split="train")["text"]
        return "\n\n".join(rows), "WikiText-2 train split (wikitext-2-raw-v1, Hugging Face datasets)"
    if data == f"{DEFAULT_NAME}:heldout":
        raise LlmpressError(f"--data {data} is the text perplexity is reported on; train on --data {DEFAULT_NAME} "
                            "(its calibration articles) or a file of your own.")
    return load_eval_text(data)


def load_training_tokens(tokenizer, data: str, seq_len: int, val_fraction: float = 0.1) -> TrainingTokens:
    """Tokenize `data` once and split off its last `val_fraction` as validation."""
    if tokenizer is None:
        raise LlmpressError("this model has no tokenizer, which fine-tuning on text needs; "
                            "pass a model directory or .gguf file that includes one.")
    text, description = training_text(data)
    ids = tokenize_for_ppl(tokenizer, text)
    num_val = int(ids.numel() * val_fraction)
    train, validation = ids[:ids.numel() - num_val], ids[ids.numel() - num_val:]
    if train.numel() < seq_len + 1 or validation.numel() < seq_len:
        raise LlmpressError(f"--data {data} has {ids.numel()} tokens, too few for --seq-len {seq_len} windows in both "
                            f"training and validation ({val_fraction:.0%}); lower --seq-len or use a longer text.")
    return TrainingTokens(train, validation, f"{description}; {train.numel()} training tokens, "
                                             f"{validation.numel()} validation tokens (the last {val_fraction:.0%})")


def chunk_tokens(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows [num_chunks, seq_len] (the partial last one dropped)."""
    num_chunks = ids.numel() // seq_len
    return ids[:num_chunks * seq_len].view(num_chunks, seq_len)


def epoch_order(num_chunks: int, epoch: int, seed: int) -> torch.Tensor:
    """The chunk order of one epoch: a permutation fixed by (seed, epoch), so a resumed run replays it."""
    return torch.randperm(num_chunks, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))

"""Next tokens for a batch of sequences that may each sample differently.

Greedy rows are one argmax over the batch. Sampled rows that share their settings (and have no seed or
repetition penalty of their own) are drawn together from the engine's generator; a row with a seed
draws from its own generator, so its output does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from llmpress.engine.sequence import Sequence
from llmpress.engine.transfer import to_device
from llmpress.generation.sampling import sample_next_token
from llmpress.kernels import ops


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def _own_generator(self, seq: Sequence) -> torch.Generator:
        if seq.sampler_state is None:
            seq.sampler_state = torch.Generator(device=self.device).manual_seed(seq.params.seed)
        return seq.sampler_state

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        """logits: [len(seqs), V]. Returns one token id per sequence."""
        return self.sample_on_device(logits, seqs).tolist() if seqs else []

    def sample_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Like `sample`, but the tokens stay on the device (int64 [len(seqs)]) and nothing waits for the GPU,
        except for rows with a repetition penalty, which read their tokens so far from the host."""
        greedy = [i for i, s in enumerate(seqs) if s.params.greedy and s.params.repetition_penalty == 1.0]
        if len(greedy) == len(seqs):
            return ops.greedy_tokens(logits)
        tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)
        if greedy:
            index = to_device(greedy, torch.long, self.device)
            tokens[index] = ops.greedy_tokens(logits[index])
        shared = defaultdict(list)  # rows sampled together from the engine generator, by their settings
        chosen = set(greedy)
        for i, seq in enumerate(seqs):
            if i in chosen:
                continue
            p = seq.params
            if p.seed is None and p.repetition_penalty == 1.0:
                shared[(p.temperature, p.top_k, p.top_p)].append(i)
                continue
            seen = None
            if p.repetition_penalty != 1.0:
                seen = torch.tensor([seq.all_token_ids], device=logits.device)
            generator = self._own_generator(seq) if p.seed is not None else self.generator
            tokens[i:i + 1] = sample_next_token(logits[i:i + 1], p, generator, seen)
        for rows in shared.values():
            index = to_device(rows, torch.long, self.device)
            tokens[index] = sample_next_token(logits[index], seqs[rows[0]].params, self.generator)
        return tokens

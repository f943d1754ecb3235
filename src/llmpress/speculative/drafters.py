"""Drafters: cheap guesses of the next k tokens that the target then verifies in one forward pass.

Every drafter answers `propose(context, k)` with up to k tokens (and, when it sampled them, the
distribution q it sampled from) and hears back `accept(n)`: how many of them the target kept.
Model drafters keep their own KV cache and roll it back by rewinding a position counter.

- ModelDrafter: any causal LM sharing the target's tokenizer (a smaller model, the target's own int4 copy).
- SelfSpeculativeDrafter: the target's first N layers, its final norm and lm_head (no extra weights;
  Draft & Verify, Zhang et al. 2023, without their layer skipping search).
- NGramDrafter: prompt lookup (Saxena 2023): find the last n tokens earlier in the context, propose what followed.
- OracleDrafter: for benchmarks, a known continuation with each token corrupted at rate 1 - alpha,
  optionally running a draft model so that its cost is paid.
"""

from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.generation.sampling import SamplingParams, probabilities
from llmpress.kernels import ops
from llmpress.model import LlamaForCausalLM
from llmpress.speculative.steps import CachedModel, ids_on


@dataclass
class Draft:
    tokens: torch.Tensor  # [n] int64 on the target's device, n <= k
    probs: torch.Tensor | None = None  # [n, V] float32: the q each token was drawn from; None = chosen deterministically


class Drafter(ABC):
    """Proposes tokens for the target to verify. Lifecycle: bind (once), start (per prompt), propose/accept."""

    name: str = "drafter"
    vocab_size: int | None = None  # checked against the target's; None: any
    fills_k: bool = False  # always proposes exactly k tokens (so only the k+1 verify shape is needed)
    on_device: bool = False  # has propose_on_device: greedy rounds can run without the host (device_rounds.py)

    def bind(self, device: torch.device, max_seq_len: int, mode: str, max_k: int) -> None:
        """Allocate what the drafter needs for sequences of up to `max_seq_len` positions."""
        self.device = device

    def start(self, prompt_ids: list[int]) -> None:
        """A new sequence begins with `prompt_ids`."""

    @abstractmethod
    def propose(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None) -> Draft:
        """context: every token so far (prompt + generated). Returns up to k proposed next tokens."""

    def accept(self, num_accepted: int) -> None:
        """The target kept the first `num_accepted` tokens of the last proposal."""

    def propose_on_device(self, seq: torch.Tensor, length: torch.Tensor, k: int) -> torch.Tensor:
        """Greedy drafts [k] from device state alone (capturable: no host value may depend on the tensors).
        seq: token ids by position; length [1]: the context length L (x_L is the newest token)."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Compile/capture whatever the drafter runs, so that timings exclude it."""


class ModelDrafter(Drafter):
    """Autoregressive drafting with a small causal LM over its own static KV cache."""

    fills_k = True
    on_device = True

    def __init__(self, model: nn.Module, name: str = "model"):
        self.model, self.name = model, name
        self.vocab_size = model.config.vocab_size
        self.runner: CachedModel | None = None

    def bind(self, device, max_seq_len, mode, max_k):
        super().bind(device, max_seq_len, mode, max_k)
        if self.runner is None or self.runner.max_seq_len < max_seq_len or self.runner.mode != mode:
            self.runner = CachedModel(self.model, max_seq_len, mode)
        self._pair_offsets = torch.arange(-2, 0, device=device)

    def warmup(self):
        self.runner.step_fn(1)
        self.runner.step_fn(2)  # the catch-up step after a round whose drafts were all accepted

    def start(self, prompt_ids):
        # The whole prompt goes in now; the first generated token is fed at the first proposal.
        self.runner.prefill(torch.tensor([prompt_ids], device=self.device))
        self.cached_len = len(prompt_ids)  # context positions whose k/v in the draft cache are valid

    def propose(self, context, k, params, generator):
        return self.run(context, k, params, generator)

    def run(self, context: list[int], k: int, params: SamplingParams, generator: torch.Generator | None,
            forced: torch.Tensor | None = None) -> Draft:
        """Draft k tokens; with `forced` ([k] ids) feed those instead of the draft's own choices, at the same
        cost (OracleDrafter: the draft model's cache then follows the tokens actually proposed)."""
        pending = context[self.cached_len:]  # 1 token, or 2 after a round where every draft was accepted
        assert pending, "propose called without a new token"
        # Both pending tokens in one step, not two: batch-1 decode is bound by reading the weights, and a 2-token
        # step reads them once, as a 1-token step does.
        logits = self.runner.step(ids_on(pending, self.device)[None], self.cached_len)[:, -1]
        tokens, probs = [], []
        for i in range(k):
            if params.greedy:
                token = ops.greedy_tokens(logits)
            else:  # the draft samples with the target's temperature/top-k/top-p (no repetition penalty)
                q = probabilities(logits, params)
                token = torch.multinomial(q, 1, generator=generator).squeeze(-1)
                probs.append(q[0])
            if forced is not None:
                token = forced[i:i + 1]
            tokens.append(token)
            if i + 1 < k:  # the last draft is never fed: the target's verify pass covers it
                logits = self.runner.step(token[:, None], len(context) + i)[:, -1]
        self._context_len, self._fed_drafts = len(context), k - 1
        return Draft(torch.cat(tokens), torch.stack(probs) if probs else None)

    def accept(self, num_accepted):
        # Rewind: stale k/v beyond this point are hidden by the causal mask and overwritten later.
        self.cached_len = self._context_len + min(num_accepted, self._fed_drafts)

    def propose_on_device(self, seq, length, k, forced: torch.Tensor | None = None):
        """As run() for greedy drafts, but from device state: the first step always feeds x_{L-1}, x_L (one of them
        is already cached unless the last round kept every draft; rewriting it is free in a weight-bound step), so
        nothing depends on the last round's count. `forced` [k]: feed those tokens instead (OracleDrafter)."""
        forward = self.runner.forward_fn()
        positions = length + self._pair_offsets
        logits = forward(seq[positions][None], positions)[:, -1]
        tokens = []
        for i in range(k):
            token = ops.greedy_tokens(logits) if forced is None else forced[i:i + 1]
            tokens.append(token)
            if i + 1 < k:  # d_{i+1} goes in at position L + i; the last draft is the verify step's
                logits = forward(token[None], length + i)[:, -1]
        return torch.cat(tokens)


class EarlyExitModel(nn.Module):
    """The target's first `num_layers` decoder layers, then its final norm and lm_head (shared weights)."""

    def __init__(self, target: LlamaForCausalLM, num_layers: int):
        super().__init__()
        self.target, self.num_layers = target, num_layers
        self.config = dataclasses.replace(target.config, num_hidden_layers=num_layers)

    def forward(self, input_ids, positions=None, kv_cache=None, last_only: bool = False):
        t = self.target.model
        if positions is None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = t.embed_tokens(input_ids)
        cos, sin = t.rotary_emb(positions, x.dtype)
        for layer in t.layers[:self.num_layers]:  # layer i writes cache layer i: the cache has num_layers
            x = layer(x, cos, sin, positions, kv_cache)
        if last_only:
            x = x[:, -1:]
        return self.target.lm_head(t.norm(x))

    @property
    def device(self):
        return self.target.device

    @property
    def dtype(self):
        return self.target.dtype


class SelfSpeculativeDrafter(ModelDrafter):
    """Self-speculative drafting: the target's own first N layers + head; only a small KV cache is extra."""

    def __init__(self, target: LlamaForCausalLM, num_layers: int):
        total = target.config.num_hidden_layers
        if not 1 <= num_layers < total:
            raise LlmpressError(f"self-speculative drafting needs 1 <= N < {total} (the target's layer count), "
                                f"got self:{num_layers}; pick e.g. self:{max(1, total // 4)}.")
        super().__init__(EarlyExitModel(target, num_layers), name=f"self:{num_layers}")


class NGramDrafter(Drafter):
    """Prompt lookup: the latest earlier occurrence of the context's last n tokens (n = max_ngram down to
    min_ngram) predicts the tokens that followed it. Deterministic, so q is a point mass."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise LlmpressError(f"n-gram sizes must satisfy 1 <= min <= max, got min {min_ngram}, max {max_ngram}.")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def lookup(self, context: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier match of the context's suffix."""
        L = len(context)
        for n in range(min(self.max_ngram, L - 1), self.min_ngram - 1, -1):
            suffix = context[L - n:]
            for start in range(L - n - 1, -1, -1):  # an occurrence ending before the suffix itself
                if context[start:start + n] == suffix:
                    return context[start + n:start + n + k]
        return []

    def propose(self, context, k, params, generator):
        return Draft(ids_on(self.lookup(context, k), self.device))


class OracleDrafter(Drafter):
    """Benchmark drafter: proposes `reference` (the target's own continuation of the prompt) with each token
    independently replaced by a different random token with probability 1 - alpha (seeded), so acceptance
    is controlled. With `draft` (a ModelDrafter), the draft model runs too, fed the oracle's tokens, so
    that its cost (and its cache's rollbacks) are those of real drafting."""

    fills_k = True
    on_device = True

    def __init__(self, reference: list[int], alpha: float, vocab_size: int, seed: int = 0,
                 draft: ModelDrafter | None = None):
        if not 0 <= alpha <= 1:
            raise LlmpressError(f"alpha must be in [0, 1], got {alpha}.")
        self.reference, self.alpha, self.vocab_size, self.draft = list(reference), alpha, vocab_size, draft
        self.seed = seed
        self.name = f"oracle(alpha={alpha:g})" + (f"+{draft.name}" if draft is not None else "")

    def bind(self, device, max_seq_len, mode, max_k):
        super().bind(device, max_seq_len, mode, max_k)
        if self.draft is not None:
            self.draft.bind(device, max_seq_len, mode, max_k)
        # Device rounds read the proposals from a table drawn at start(), one row per round start: static buffers,
        # so that captured rounds see each generation's table.
        self._table = torch.zeros(max_seq_len, max_k, dtype=torch.long, device=device)
        self._truth = torch.zeros(max_seq_len + max_k + 1, dtype=torch.long, device=device)
        self._prompt_len = torch.zeros(1, dtype=torch.long, device=device)

    def warmup(self):
        if self.draft is not None:
            self.draft.warmup()

    def start(self, prompt_ids):
        self.prompt_len, self.rng = len(prompt_ids), random.Random(self.seed)
        if self.draft is not None:
            self.draft.start(prompt_ids)
        self._fill_device_tables()  # bind() came first: the generator binds its drafter when it is built

    def _fill_device_tables(self):
        """Row `done` (tokens generated so far): the k proposals of a round that starts there, each the reference's
        token with probability alpha, else another one uniformly (the host path's rule, drawn in advance)."""
        rows, max_k = self._table.shape
        g = torch.Generator().manual_seed(self.seed)
        truth = torch.zeros(self._truth.shape[0], dtype=torch.long)
        ref = torch.tensor(self.reference[:truth.shape[0]], dtype=torch.long)
        truth[:ref.shape[0]] = ref
        index = torch.arange(rows)[:, None] + torch.arange(max_k)
        true = truth[index]
        known = index < ref.shape[0]
        wrong = torch.randint(self.vocab_size - 1, (rows, max_k), generator=g)
        wrong = torch.where(known & (wrong >= true), wrong + 1, wrong)
        right = known & (torch.rand(rows, max_k, generator=g) < self.alpha)
        self._table.copy_(torch.where(right, true, wrong))
        self._truth.copy_(truth)
        self._prompt_len.fill_(self.prompt_len)

    def propose_on_device(self, seq, length, k):
        done = (length - self._prompt_len).clamp(0, self._table.shape[0] - 1)
        tokens = self._table[done][0, :k]
        if self.draft is not None:
            self.draft.propose_on_device(seq, length, k, forced=tokens)
        return tokens

    def reference_on_device(self, length: torch.Tensor, n: int) -> torch.Tensor:
        """The reference's next n tokens for a round starting at context length `length` (0 past its end)."""
        done = length - self._prompt_len
        index = (done + torch.arange(n, device=length.device)).clamp(0, self._truth.shape[0] - 1)
        return self._truth[index]

    def propose(self, context, k, params, generator):
        done = len(context) - self.prompt_len
        tokens = []
        for i in range(k):
            # Past the end of the reference there is no right answer: propose a random token.
            true = self.reference[done + i] if done + i < len(self.reference) else None
            if true is None or self.rng.random() >= self.alpha:
                wrong = self.rng.randrange(self.vocab_size - 1)
                true = wrong + 1 if true is not None and wrong >= true else wrong  # uniform over the other tokens
            tokens.append(true)
        tokens = ids_on(tokens, self.device)
        if self.draft is not None:
            self.draft.run(context, k, params, generator, forced=tokens)
        return Draft(tokens)

    def accept(self, num_accepted):
        if self.draft is not None:
            self.draft.accept(num_accepted)


def check_same_vocabulary(target, draft, draft_name: str = "the draft model") -> None:
    """Refuse a draft whose vocabulary differs from the target's: its token ids would mean other words.
    target, draft: LoadedModel (tokenizers compared when both have one)."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise LlmpressError(f"{draft_name} has a vocabulary of {dv} tokens but the target has {tv}; speculative "
                            "decoding needs a draft that shares the target's tokenizer (pick one from the same model family).")
    if target.tokenizer is not None and draft.tokenizer is not None and \
            target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
        raise LlmpressError(f"{draft_name}'s tokenizer maps tokens to different ids than the target's; speculative "
                            "decoding needs a draft that shares the target's tokenizer (pick one from the same model family).")

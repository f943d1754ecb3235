"""Speculative decoding: a drafter proposes k tokens, the target verifies them in one forward pass.

One round, for the context x_1..x_L whose last token x_L is not yet in the target's cache:
  1. the drafter proposes d_1..d_n (n <= k);
  2. the target runs [x_L, d_1..d_n] at positions L-1..L-1+n in ONE forward over its static cache,
     giving its distribution after x_L and after each draft;
  3. verify.py keeps a prefix of the drafts and adds one token of the target's own;
  4. both caches roll back by rewinding positions: the target's next input position is simply
     len(context) - 1, the drafter hears `accept(n)`.
A round costs one target forward and yields 1..n+1 tokens; with a cheap, often-right drafter that is
fewer target forwards than tokens. Greedy output equals plain greedy decoding token for token;
sampled output has exactly the target's distribution.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from llmpress.errors import LlmpressError
from llmpress.generation.generator import GenerationOutput, synchronize
from llmpress.generation.sampling import SamplingParams, processed_logits, sample_next_token
from llmpress.kernels import ops
from llmpress.model import LlamaForCausalLM
from llmpress.speculative.device_rounds import DeviceRounds, greedy_keep
from llmpress.speculative.round_clock import RoundClock
from llmpress.speculative.drafters import Drafter
from llmpress.speculative.steps import CachedModel, ids_on
from llmpress.speculative.verify import greedy_accept, speculative_sample


@dataclass
class SpeculativeConfig:
    num_speculative_tokens: int = 5  # k: drafts per round (the starting k when adaptive)
    adaptive: bool = False
    max_speculative_tokens: int | None = None  # adaptive ceiling (default 2k, at least 8)
    # Greedy rounds on the device, queued ahead of the host (device_rounds.py): None = in the CUDA graph modes
    # whenever the drafter can (a model, self:N, the oracle) and k is fixed; True also in eager mode (tests).
    device_rounds: bool | None = None

    def __post_init__(self):
        if self.num_speculative_tokens < 1:
            raise LlmpressError(f"--num-speculative-tokens must be at least 1, got {self.num_speculative_tokens}.")
        if self.max_speculative_tokens is None:
            self.max_speculative_tokens = max(2 * self.num_speculative_tokens, 8) if self.adaptive \
                else self.num_speculative_tokens
        if self.max_speculative_tokens < self.num_speculative_tokens:
            raise LlmpressError("the adaptive ceiling must be at least --num-speculative-tokens.")


def next_k(k: int, proposed: int, accepted: int, max_k: int) -> int:
    """Adaptive draft length: one more after a round whose drafts were all accepted, one fewer after a
    round that kept less than half of them (never below 1 or above max_k). A round with no proposal
    (n-gram miss) leaves k alone. Additive steps keep k from oscillating on one lucky or unlucky round."""
    if proposed == 0:
        return k
    if accepted == proposed:
        return min(k + 1, max_k)
    if 2 * accepted < proposed:
        return max(k - 1, 1)
    return k


@dataclass
class SpeculativeStats:
    rounds: int = 0  # target verify forwards
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the target kept
    emitted: int = 0  # tokens the rounds produced (accepted + the target's own), before truncation
    draft_s: float = 0.0
    verify_s: float = 0.0  # target forward + acceptance
    k_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens per target forward: accepted drafts + 1 (plain decoding: exactly 1)."""
        return self.emitted / self.rounds if self.rounds else float("nan")

    @property
    def accepted_per_round(self) -> float:
        return self.accepted / self.rounds if self.rounds else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("k_per_round")
        k = self.k_per_round
        return dict(d, acceptance_rate=self.acceptance_rate, tokens_per_round=self.tokens_per_round,
                    accepted_per_round=self.accepted_per_round, mean_k=sum(k) / len(k) if k else None,
                    draft_ms_per_round=1e3 * self.draft_s / self.rounds if self.rounds else None,
                    verify_ms_per_round=1e3 * self.verify_s / self.rounds if self.rounds else None)

    def add_round(self, k: int, proposed: int, accepted: int, emitted: int, draft_s: float, verify_s: float) -> None:
        self.rounds += 1
        self.proposed += proposed
        self.accepted += accepted
        self.emitted += emitted
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.k_per_round.append(k)

    def merge(self, other: "SpeculativeStats") -> None:
        for name in ("rounds", "proposed", "accepted", "emitted", "draft_s", "verify_s"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.k_per_round += other.k_per_round


def emit(tokens: list[int], out: list[int], stops: set[int], max_new_tokens: int, on_token=None,
         context: list[int] | None = None) -> bool:
    """Append a round's kept tokens to `out` (and `context`) under plain decoding's stopping rules, token by token;
    True once a stop token or max_new_tokens ends the generation."""
    for token in tokens:
        out.append(token)
        if context is not None:
            context.append(token)
        if on_token is not None:
            on_token(torch.tensor([token]))
        if token in stops or len(out) == max_new_tokens:
            return True
    return False


@dataclass
class SpeculativeOutput(GenerationOutput):
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)


class SpeculativeGenerator:
    """Batch-1 speculative decoding of `target` with `drafter`, over caches of `max_seq_len` positions.

    mode: as Generator's (eager | graph | compile | auto): in the graph modes the target's verify step
    ([1, k+1] tokens) and a model drafter's one-token step are CUDA graphs (compiled first in `compile`).
    """

    def __init__(self, target: LlamaForCausalLM, drafter: Drafter, max_seq_len: int,
                 config: SpeculativeConfig | None = None, mode: str = "auto"):
        self.config = config or SpeculativeConfig()
        if drafter.vocab_size is not None and drafter.vocab_size != target.config.vocab_size:
            raise LlmpressError(f"the {drafter.name} drafter has a vocabulary of {drafter.vocab_size} tokens but the "
                                f"target has {target.config.vocab_size}; speculative decoding needs a draft that shares "
                                "the target's tokenizer (pick one from the same model family).")
        self.target, self.drafter, self.max_seq_len = target, drafter, max_seq_len
        max_k = self.config.max_speculative_tokens
        # Rounds verify up to max_k drafts past the last kept token: room for them beyond max_seq_len.
        self.runner = CachedModel(target, max_seq_len + max_k, mode, scratch=max_k + 1)
        self.mode = self.runner.mode
        drafter.bind(target.device, max_seq_len + max_k, self.mode, max_k)
        wanted = self.config.device_rounds
        if wanted and (self.config.adaptive or not drafter.on_device):
            raise LlmpressError(f"device rounds need a fixed k and a model, self:N or oracle drafter, not "
                                f"{'adaptive k' if self.config.adaptive else drafter.name}; drop the device-rounds option.")
        self.use_device_rounds = (self.mode != "eager" if wanted is None else wanted) and drafter.on_device \
            and not self.config.adaptive
        self.rounds = None  # DeviceRounds, built (captured) at warmup

    def warmup(self) -> None:
        """Compile and capture every step this configuration can run, so that timings exclude it."""
        if self.use_device_rounds:
            # Greedy rounds need nothing else; a sampled generation captures its steps when it first runs them.
            if self.rounds is None:
                self.rounds = DeviceRounds(self.runner, self.drafter, self.config.num_speculative_tokens,
                                           keep=self._keep_on_device)
            return
        if self.mode == "eager":
            return
        cfg = self.config
        lengths = range(1, cfg.max_speculative_tokens + 2)
        if self.drafter.fills_k and not cfg.adaptive:
            lengths = [cfg.num_speculative_tokens + 1]
        for m in lengths:
            self.runner.step_fn(m)
        self.drafter.warmup()

    @torch.inference_mode()
    def generate(self, prompt_ids: torch.Tensor, params: SamplingParams, stop_token_ids: list[int] = (),
                 on_token: Callable[[torch.Tensor], None] | None = None) -> SpeculativeOutput:
        """prompt_ids: [1, T]. Stops as Generator does: after a stop token (unless ignore_eos) or max_new_tokens.
        `on_token` (if given) sees each kept token as a [1] CPU tensor, as Generator.generate's does."""
        if prompt_ids.shape[0] != 1:
            raise LlmpressError(f"speculative decoding runs one sequence at a time, got a batch of {prompt_ids.shape[0]}.")
        T = prompt_ids.shape[1]
        if T + params.max_new_tokens > self.max_seq_len:
            raise LlmpressError(f"prompt of {T} tokens + {params.max_new_tokens} new tokens exceeds the "
                                f"{self.max_seq_len}-token cache; shorten the prompt or lower --max-new-tokens.")
        self.warmup()
        device = self.target.device
        stops = set() if params.ignore_eos else set(stop_token_ids)
        generator = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None
        stats, k, max_k = SpeculativeStats(), self.config.num_speculative_tokens, self.config.max_speculative_tokens
        clock = RoundClock(device)

        synchronize(device)
        start = time.perf_counter()
        prompt = prompt_ids.to(device)
        context = prompt[0].tolist()
        self.drafter.start(context)
        # The first token comes from the target's prefill, exactly as in plain decoding.
        logits = self.runner.prefill(prompt)
        first = sample_next_token(logits, params, generator, prompt if params.repetition_penalty != 1 else None)
        out = [int(first)]
        first_token_at = time.perf_counter()
        if on_token is not None:
            on_token(torch.tensor(out))
        finished = out[0] in stops
        context.append(out[0])
        if self.rounds is not None and params.greedy and params.repetition_penalty == 1:
            self.rounds.start(prompt, first)
            self._device_rounds(out, stops, params.max_new_tokens, on_token, stats, finished)
            finished = True
        while not finished and len(out) < params.max_new_tokens:
            t0 = clock.mark()
            draft = self.drafter.propose(context, k, params, generator)
            n = draft.tokens.shape[0]
            assert n <= k, (n, k)
            t1 = clock.mark()
            verify_ids = torch.cat([ids_on(context[-1:], device), draft.tokens])[None]
            target_logits = self.runner.step(verify_ids, len(context) - 1)[0]  # [n+1, V]
            num_accepted, new_tokens = self._accept(target_logits, context, draft, params, generator)
            self.drafter.accept(num_accepted)
            t2 = clock.mark()  # the acceptance read its result on the host: the GPU is done
            stats.add_round(k, n, num_accepted, len(new_tokens), clock.seconds(t0, t1), clock.seconds(t1, t2))
            finished = emit(new_tokens, out, stops, params.max_new_tokens, on_token, context)
            if self.config.adaptive:
                k = next_k(k, n, num_accepted, max_k)
        synchronize(device)
        end = time.perf_counter()
        stopped = out[-1] in stops
        return SpeculativeOutput(torch.tensor([out]), [len(out)], T, prefill_s=first_token_at - start,
                                 decode_s=end - first_token_at, finish_reasons=["stop" if stopped else "length"],
                                 stats=stats)

    def _device_rounds(self, out: list[int], stops: set[int], max_new_tokens: int, on_token, stats: SpeculativeStats,
                       finished: bool) -> None:
        """Greedy rounds queued on the device (device_rounds.py) until a stop token or max_new_tokens; appends the
        kept tokens to `out`. A round is queued only while the rounds in flight cannot reach max_new_tokens (each
        keeps at most k+1 tokens), so none is wasted but after a stop token; at most two are in flight."""
        k = self.config.num_speculative_tokens
        in_flight = []
        while not finished and len(out) < max_new_tokens:
            while len(in_flight) < 2 and len(out) + (k + 1) * len(in_flight) < max_new_tokens:
                in_flight.append(self.rounds.queue())
            result = in_flight.pop(0).result()
            stats.add_round(k, k, result.num_accepted, len(result.tokens), result.draft_s, result.verify_s)
            finished = emit(result.tokens, out, stops, max_new_tokens, on_token)
        # Rounds still in flight (after a stop token) only wrote past the kept positions, which the next prefill
        # or round overwrites; the caller synchronizes before reading the clock.

    def _keep_on_device(self, drafts: torch.Tensor, target_tokens: torch.Tensor, length: torch.Tensor):
        """What a device round keeps (device_rounds.Keep): greedy acceptance. A benchmark may override it."""
        return greedy_keep(drafts, target_tokens, length)

    def _accept(self, target_logits: torch.Tensor, context: list[int], draft, params: SamplingParams,
                generator) -> tuple[int, list[int]]:
        """target_logits: [n+1, V] after context[-1] and after each draft token."""
        n = draft.tokens.shape[0]
        seen = None
        if params.repetition_penalty != 1:
            # Row i has seen the context and drafts 1..i; pad rows with a token already seen (a no-op).
            device = target_logits.device
            base = torch.tensor(context, device=device)
            rows = [torch.cat([base, draft.tokens[:i], base[-1:].expand(n - i)]) for i in range(n + 1)]
            seen = torch.stack(rows)
        logits = processed_logits(target_logits, params, seen)
        if params.greedy:
            return greedy_accept(ops.greedy_tokens(logits), draft.tokens)
        return speculative_sample(logits.softmax(dim=-1), draft.tokens, draft.probs, generator)

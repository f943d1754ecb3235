"""Who runs this step: continuous batching with chunked prefill and preemption by recomputation.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, in arrival
order: a decoding sequence takes one token, one still in prefill takes the next chunk of its prompt.
Waiting sequences are then admitted, first come first served, while budget, sequence slots and KV
blocks last; a long prompt is split over several steps (chunked prefill) so decodes never stall behind
it. When a running sequence needs a block and none is free, the most recently admitted sequence is
preempted: its blocks are freed and it goes back to the front of the queue with its generated tokens,
to be recomputed later (vLLM's recompute policy). Nothing is lost; greedy outputs stay the same.

Free of torch: it is tested on its own, with block ids standing in for memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from llmpress.engine.block_manager import BlockManager
from llmpress.engine.sequence import PLACEHOLDER_TOKEN, Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # tokens computed this step, starting at seq.num_computed_tokens (draft tokens included)
    num_spec_tokens: int = 0  # of which draft tokens (seq.spec_token_ids), verified by this step's logits

    @property
    def completes_sequence(self) -> bool:
        """True when this chunk reaches the sequence's last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_tokens - self.num_spec_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode_only(self) -> bool:
        """One token per sequence, each its last (the shape CUDA graphs are captured for)."""
        return all(c.num_tokens == 1 and c.completes_sequence for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order; the last one is preempted first
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled: set[int] = set()
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            num_spec = 0
            if seq.spec_token_ids and seq.num_uncomputed_tokens == 1:  # a decode step that also verifies drafts
                num_spec = min(len(seq.spec_token_ids), budget - 1)
                if not self.block_manager.can_grow(seq, seq.num_computed_tokens + 1 + num_spec):
                    num_spec = 0  # drafts are optional: drop them before preempting anyone
                del seq.spec_token_ids[num_spec:]
                num_tokens += num_spec
            target = seq.num_computed_tokens + num_tokens
            while not self.block_manager.can_grow(seq, target):
                victim = self._pick_victim(scheduled)
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue  # seq preempted itself; the list shrank, so `index` now points at the next one
            self.block_manager.grow(seq, target)
            out.chunks.append(ScheduledChunk(seq, num_tokens, num_spec))
            scheduled.add(seq.seq_id)
            budget -= num_tokens
            index += 1
        # Admit new work only when nothing was preempted: otherwise the freed blocks go to the preempted first.
        while self.waiting and not out.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached = self.block_manager.find_cached_prefix(seq)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_tokens = min(seq.num_tokens - num_cached_tokens, budget)
            if not self.block_manager.can_allocate(seq, num_cached_tokens + num_tokens, cached):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_cached_tokens + num_tokens, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, num_tokens))
            scheduled.add(seq.seq_id)
            budget -= num_tokens
        return out

    def _pick_victim(self, scheduled: set[int]) -> Sequence:
        """The most recently admitted running sequence not yet scheduled this step (else the current one)."""
        for seq in reversed(self.running):
            if seq.seq_id not in scheduled:
                return seq
        raise AssertionError("every running sequence is scheduled, yet the current one needs a block")

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.num_computed_tokens = SequenceStatus.WAITING, 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def update(self, out: SchedulerOutput, sampled: dict[int, list[int]]) -> list[Sequence]:
        """After the model ran: advance every chunk, append sampled tokens (seq_id -> new tokens: the accepted
        drafts, then one token of the model's own), retire the done. Returns the sequences that got tokens."""
        updated = []
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.is_finished:
                continue  # aborted, or stopped by the step before, while this one ran
            completes = chunk.completes_sequence
            seq.num_computed_tokens += chunk.num_tokens - chunk.num_spec_tokens
            if completes:
                appended = 0
                for token in sampled[seq.seq_id]:
                    seq.append_token(token)
                    appended += 1
                    if seq.finish_reason is not None:
                        break
                # The k/v of accepted drafts were computed from the right tokens: they stay valid. Rejected
                # drafts' k/v sit past num_computed_tokens, where nothing reads them until overwritten.
                seq.num_computed_tokens += min(appended - 1, chunk.num_spec_tokens)
                seq.spec_token_ids = []
            self.block_manager.register_computed_blocks(seq)
            if completes:
                updated.append(seq)
                if seq.finish_reason is not None:
                    self._finish(seq)
        return updated

    def advance(self, out: SchedulerOutput) -> list[tuple[int, Sequence]]:
        """`update` for a step whose tokens are still on the device (overlapped scheduling): every chunk moves
        on, each completing one gets a placeholder token, and sequences that reach their length limit retire.
        The scheduler can then plan the next step before this one's tokens are read. Returns (row, sequence)
        for each placeholder, row being the chunk's index among the step's completing chunks; `resolve`
        fills them in. Steps with draft tokens cannot go ahead: how many drafts survive is unknown."""
        awaiting, row = [], 0
        for chunk in out.chunks:
            seq = chunk.seq
            completes = chunk.completes_sequence
            if seq.is_finished:
                row += completes
                continue
            assert chunk.num_spec_tokens == 0, "a step with draft tokens must be updated with its tokens"
            seq.num_computed_tokens += chunk.num_tokens
            if completes:
                seq.append_token(PLACEHOLDER_TOKEN)  # never a stop token; the length limit is decided here
            self.block_manager.register_computed_blocks(seq)  # the placeholder is not computed: never hashed
            if completes:
                awaiting.append((row, seq))
                row += 1
                if seq.finish_reason is not None:
                    self._finish(seq)
        return awaiting

    def resolve(self, awaiting: list[tuple[int, Sequence]], tokens: list[int]) -> None:
        """Put the step's sampled tokens (one per completing chunk) in place of `advance`'s placeholders; a
        stop token ends its sequence (even one preempted meanwhile), and wins over the length limit."""
        for row, seq in awaiting:
            token = tokens[row]
            seq.output_token_ids[-1] = token
            if not seq.params.ignore_eos and token in seq.stop_token_ids:
                seq.finish_reason = "stop"
                self._finish(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.is_finished:
            return
        seq.finish_reason = "abort"
        self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        if seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

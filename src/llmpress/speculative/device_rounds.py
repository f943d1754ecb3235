"""Greedy speculative rounds whose state lives on the device, so that the host never waits for one.

The host-driven round (decoder.py) reads the target's verdict back before it can queue the next round's drafts:
one stream sync a round, and the GPU idles while Python decides (about 0.2 ms of a 3.1 ms round at k = 3 on the
H200, results/speculative_h200_s15.*). Here everything a round needs is a tensor on the device:

  seq     token ids by position (prompt, then every kept token),
  length  L, the context length: x_1..x_L are decided, x_L is not yet in the target's cache.

One round, with no host value in it:
  1. draft:  the drafter proposes d_1..d_k from seq and L (a model drafter starts with a 2-token step over
             x_{L-1}, x_L, whatever the last round kept, so that no branch depends on it; rewriting x_{L-1}'s
             k/v costs nothing, as batch-1 steps are bound by reading the weights);
  2. verify: the target runs [x_L, d_1..d_k] at positions L-1..L-1+k, t_i = argmax;
  3. keep:   n = the length of the prefix where d_i == t_i; seq[L..L+n] = t_0..t_n (the accepted drafts equal
             the target's tokens there), L += n + 1.
Both caches roll back for free: stale k/v past the kept positions are hidden by the causal mask and rewritten
later. On CUDA the draft part and the verify part are each one CUDA graph, and the host queues round r+1 before
it reads round r's (n, t) from pinned memory, so the GPU runs round after round without a gap; a round is only
queued while the rounds before it cannot have finished the generation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from llmpress.kernels import ops
from llmpress.speculative.round_clock import RoundClock
from llmpress.speculative.steps import CachedModel

# keep(drafts [k], target_tokens [k+1], length [1]) -> (accepted count [] long, tokens to write at L.. [k+1])
Keep = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def greedy_keep(drafts: torch.Tensor, target_tokens: torch.Tensor, length: torch.Tensor):
    """The longest prefix of the drafts equal to the target's argmax, then the target's own token (verify.py's
    greedy rule, without reading anything back). The accepted drafts equal t there, so t_0..t_n is what to write."""
    num_accepted = (target_tokens[:-1] == drafts).long().cumprod(0).sum()
    return num_accepted, target_tokens


@dataclass
class RoundResult:
    num_accepted: int
    tokens: list[int]  # the round's kept tokens: the accepted drafts, then the target's own
    draft_s: float
    verify_s: float


class QueuedRound:
    """A round queued on the device: its result slot (pinned on CUDA) and the events around its two parts."""

    def __init__(self, slot: torch.Tensor, marks: list, clock: RoundClock):
        self.slot, self.marks, self.clock = slot, marks, clock

    def result(self) -> RoundResult:
        start, between, end = self.marks
        verify_s = self.clock.seconds(between, end)  # first: waits for the round's end, after its copy to the slot
        draft_s = self.clock.seconds(start, between)
        values = self.slot.tolist()
        n = values[0]
        return RoundResult(n, values[1:n + 2], draft_s, verify_s)


class DeviceRounds:
    """Greedy rounds of k drafts for `target` (a CachedModel) with `drafter` (one with `propose_on_device`).

    `keep` decides, on the device, what a round keeps (greedy_keep; a benchmark may impose its own). In the
    eager mode the same functions run op by op, which the CPU tests compare against plain greedy decoding.
    """

    SLOTS = 3  # result slots: rounds in flight (at most 2) + the one the host is reading

    def __init__(self, target: CachedModel, drafter, k: int, keep: Keep = greedy_keep):
        self.target, self.drafter, self.k, self.keep = target, drafter, k, keep
        device = target.model.device
        self.cuda = device.type == "cuda"
        self.clock = RoundClock(device)
        positions = target.max_seq_len + target.scratch
        self.seq = torch.zeros(positions + k + 2, dtype=torch.long, device=device)
        self.length = torch.zeros(1, dtype=torch.long, device=device)
        self.offsets = torch.arange(k + 1, device=device)
        self.result = torch.zeros(k + 2, dtype=torch.long, device=device)
        self.slots = [torch.zeros(k + 2, dtype=torch.long, pin_memory=self.cuda) for _ in range(self.SLOTS)]
        self.queued = 0
        self.graphs = None
        if target.mode != "eager":
            self._capture()

    # -- the two parts of a round, as tensor programs (captured once on CUDA) --------------------------------
    def _draft(self) -> None:
        self.drafts = self.drafter.propose_on_device(self.seq, self.length, self.k)

    def _verify(self) -> None:
        L = self.length
        ids = torch.cat([self.seq[L - 1], self.drafts])[None]
        logits = self.target.forward_fn()(ids, L - 1 + self.offsets)[0]
        num_accepted, kept = self.keep(self.drafts, ops.greedy_tokens(logits), L)
        self.seq.index_copy_(0, L + self.offsets, kept)
        self.result.copy_(torch.cat([num_accepted[None], kept]))
        self.length.add_(num_accepted + 1)

    def _capture(self, warmup_runs: int = 3) -> None:
        # Warm-up (and compilation) at the top of the caches: the target's verify positions land in its scratch
        # slots, the draft's in positions that real steps overwrite before any query reaches them.
        top = self.target.max_seq_len
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup_runs):
                self.length.fill_(top)
                self._draft()
                self._verify()
        torch.cuda.current_stream().wait_stream(stream)
        self.length.fill_(top)
        draft_graph, verify_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.inference_mode():
            with torch.cuda.graph(draft_graph):
                self._draft()
            with torch.cuda.graph(verify_graph):  # reads self.drafts, the draft graph's static output
                self._verify()
        self.graphs = (draft_graph, verify_graph)

    # -- host side ---------------------------------------------------------------------------------------------
    def start(self, prompt_ids: torch.Tensor, first_token: torch.Tensor) -> None:
        """prompt_ids [1, T] and the target's first token [1], both on the device; the drafter has started."""
        T = prompt_ids.shape[1]
        self.seq[:T].copy_(prompt_ids[0])
        self.seq[T:T + 1].copy_(first_token.reshape(1))
        self.length.fill_(T + 1)

    def queue(self) -> QueuedRound:
        """Queue one round; returns at once on CUDA (the host reads its result later)."""
        marks = [self.clock.mark()]
        if self.graphs is None:
            self._draft()
        else:
            self.graphs[0].replay()
        marks.append(self.clock.mark())
        if self.graphs is None:
            self._verify()
        else:
            self.graphs[1].replay()
        slot = self.slots[self.queued % self.SLOTS]
        self.queued += 1
        slot.copy_(self.result, non_blocking=self.cuda)
        marks.append(self.clock.mark())
        return QueuedRound(slot, marks, self.clock)

"""A greedy decode step whose state stays on the device, so that a step is one graph replay and nothing else.

The logits step (generator.py) returns logits, and the host then queues the argmax, the next position and the copies
of both into the graph's inputs: five small kernels between two replays, run while the GPU would otherwise start
the next step. Greedy decoding needs none of them from the host: the step reads its token and position from
buffers, picks the next token itself and leaves it, and the position after, in those buffers for the next replay
(ops.greedy_advance: on CUDA the argmax's two kernels, the second also writing the token and the position). Every
token it picks is kept in `produced`, so the host reads them when it wants to. 3B int4 decode on the H200: 1038.9
tok/s before, 1089.4 / 1091.4 with it (benchmarks/results/int4_h200_s17{,e}.*).
"""

from __future__ import annotations

from typing import Callable

import torch

from llmpress.generation import cuda_graph
from llmpress.generation.cuda_graph import GraphedStep
from llmpress.kernels import ops

# (token ids [B, 1], positions [1]) -> logits [B, V] of the last position
ForwardLast = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class GreedyStep:
    """`step()` consumes the token at `position` and writes the next one to produced[:, position], then moves on.

    mode: `eager` (plain calls), `graph` (a CUDA graph of them), `compile` (torch.compile, then a CUDA graph).
    steps_per_graph: in the graph modes, also capture that many steps as one graph, which `steps(n)` replays
    while at least that many are wanted (one launch, and no boundary between graphs, per that many tokens).
    """

    def __init__(self, forward_last: ForwardLast, batch_size: int, max_seq_len: int, device: torch.device,
                 mode: str, steps_per_graph: int = 1):
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.produced = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=device)
        self._forward_last = forward_last
        if mode == "compile":
            # Inductor's own CUDA graphs stay off: the whole step, its ending included, is captured below.
            self._forward_last = torch.compile(forward_last, fullgraph=True, dynamic=False,
                                               options=dict(cuda_graph.STEP_COMPILE_OPTIONS))
        self._replays: dict[int, Callable[[], object]] = {1: self._advance}
        if mode in ("graph", "compile"):
            # Warm-up and capture at the last slots, as the logits step does: the junk k/v written there stays
            # hidden by the causal mask until a real token overwrites it.
            for n in sorted({1, min(steps_per_graph, max_seq_len)}):
                with torch.inference_mode():
                    self._replays[n] = GraphedStep(lambda n=n: [self._advance() for _ in range(n)][-1], (),
                                                   reset=lambda n=n: self.position.fill_(max_seq_len - n))

    def _advance(self) -> torch.Tensor:
        logits = self._forward_last(self.token, self.position)
        ops.greedy_advance(logits, self.token, self.produced, self.position)  # two kernels on CUDA
        return self.token

    def start(self, token: torch.Tensor, position: int) -> None:
        """The next step consumes `token` [B] at `position`."""
        self.token.copy_(token[:, None])
        self.position.fill_(position)

    def steps(self, wanted: int) -> int:
        """Run the longest captured run of steps that is at most `wanted` (>= 1) steps; returns how many ran."""
        n = max(k for k in self._replays if k <= wanted)
        self._replays[n]()
        return n

    def produced_after(self, position: int) -> torch.Tensor:
        """[B]: the token a step picked after consuming position `position` (a view, until the next generation)."""
        return self.produced[:, position]

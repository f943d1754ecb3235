"""Timing a speculative round's drafting and verifying without making the host wait for the GPU."""

from __future__ import annotations

import time

import torch


class RoundClock:
    """Marks between a round's drafting and verifying. On CUDA they are events on the stream, read once the round
    has ended on the host anyway (the acceptance reads its result), so that timing the two parts does not make the
    host wait for the drafts before it queues the verify step; elsewhere, the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3

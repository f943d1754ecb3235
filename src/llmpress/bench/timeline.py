"""Where a decode step's GPU time goes when its kernels overlap (PDL): busy time, idle gaps, and what they sit between.

Under programmatic dependent launch a kernel starts while the one before it is still running, so per-kernel times
from a profiler no longer add up to the step. What does add up: the time some kernel is running (the union of their
intervals) and the idle gaps between, each gap named by the kernels before and after it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class KernelSpan:
    start_us: float
    end_us: float
    name: str


def step_timelines(kernels: list[KernelSpan], step_end: str, min_gap_us: float = 0.5, skip: int = 1,
                   label: Callable[[str, int], str] | None = None) -> dict:
    """kernels: one profiled run, any order. A step ends with a kernel whose name contains `step_end` (the last
    kernel of every step, and of the prefill); a step runs from the previous one's end to its own, so the gap
    before its first kernel is its own; the first `skip` steps are left out (the one after the prefill waits for the
    host's first-token timing). Summary over the steps: mean step time, busy time and kernels, the
    idle gaps of at least `min_gap_us`, by the pair of kernels around them (mean us a step, how often a step), and
    the busy time by kernel name: each kernel is credited with the time by which it extends the union of the
    kernels before it, so the credits add up to the busy time and a kernel hidden under another's tail gets none.
    `label(name, i)` (i: how many kernels of that name came before it in the step) names what a kernel is credited
    as, so that one kernel serving several products (q|k|v, o, ...) can be told apart by its place in the layer."""
    kernels = sorted(kernels, key=lambda k: k.start_us)
    ends = [i for i, k in enumerate(kernels) if step_end in k.name][skip:]
    if len(ends) < 2:
        return {"steps": 0}
    gaps: dict[tuple[str, str], list[float]] = defaultdict(list)
    credit: dict[str, float] = defaultdict(float)
    launches: dict[str, int] = defaultdict(int)
    busy_total = span_total = 0.0
    for a, b in zip(ends, ends[1:]):
        step, previous = kernels[a + 1:b + 1], kernels[a]
        busy, reach, last_name = 0.0, previous.end_us, previous.name
        seen: dict[str, int] = defaultdict(int)
        for k in step:
            name = label(k.name, seen[k.name]) if label else k.name
            seen[k.name] += 1
            gap = k.start_us - reach
            if gap >= min_gap_us:
                gaps[(last_name, k.name)].append(gap)
            launches[name] += 1
            if k.end_us > reach:
                busy += k.end_us - max(k.start_us, reach)
                credit[name] += k.end_us - max(k.start_us, reach)
                reach, last_name = k.end_us, k.name
        busy_total += busy
        span_total += kernels[b].end_us - previous.end_us
    n = len(ends) - 1
    by_pair = sorted(((sum(g) / n, len(g) / n, before, after) for (before, after), g in gaps.items()), reverse=True)
    return {"steps": n, "step_us": span_total / n, "busy_us": busy_total / n,
            "kernels_per_step": (ends[-1] - ends[0]) / n,
            "gaps": [{"us_per_step": us, "per_step": count, "after": before, "before": after}
                     for us, count, before, after in by_pair],
            "kernels": [{"name": name, "us_per_step": credit[name] / n, "per_step": launches[name] / n}
                        for name in sorted(launches, key=lambda name: -credit[name])]}


def print_timeline(summary: dict, top: int = 12, top_kernels: int = 16) -> None:
    if not summary.get("steps"):
        print("timeline: no complete step found")
        return
    idle = summary["step_us"] - summary["busy_us"]
    print(f"timeline: {summary['steps']} steps, {summary['step_us']:.1f} us a step, {summary['busy_us']:.1f} us of "
          f"it with a kernel running, {idle:.1f} us idle, {summary['kernels_per_step']:.0f} kernels a step")
    print(f"{'idle us/step':>12s} {'per step':>8s}  after -> before")
    for g in summary["gaps"][:top]:
        print(f"{g['us_per_step']:12.2f} {g['per_step']:8.2f}  {g['after'][:60]} -> {g['before'][:60]}")
    print(f"{'busy us/step':>12s} {'per step':>8s} {'us each':>8s}  "
          "kernel (credited with the time it adds to the union)")
    for k in summary.get("kernels", [])[:top_kernels]:
        each = k["us_per_step"] / k["per_step"]
        print(f"{k['us_per_step']:12.2f} {k['per_step']:8.2f} {each:8.2f}  {k['name'][:90]}")

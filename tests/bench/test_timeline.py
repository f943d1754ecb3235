"""The decode-step timeline summary: busy time as the union of overlapping kernels, idle gaps named by neighbours."""

from llmpress.bench.timeline import KernelSpan, step_timelines


def test_overlapping_kernels_count_once_and_gaps_are_named_by_the_kernels_around_them():
    def step(t0: float) -> list[KernelSpan]:
        # b overlaps a (PDL) and ends inside c's span; a 2 us gap before the end marker; then 1 us to the next step
        return [KernelSpan(t0, t0 + 10, "a"), KernelSpan(t0 + 8, t0 + 12, "b"), KernelSpan(t0 + 11, t0 + 20, "c"),
                KernelSpan(t0 + 22, t0 + 24, "argmax")]
    kernels = [KernelSpan(-50, -40, "prefill"), KernelSpan(-30, -25, "argmax")]
    for i in range(4):
        kernels += step(25.0 * i)
    summary = step_timelines(list(reversed(kernels)), "argmax", min_gap_us=0.5)
    assert summary["steps"] == 3  # the interval after the prefill's argmax is left out
    assert summary["step_us"] == 25.0 and summary["busy_us"] == 22.0 and summary["kernels_per_step"] == 4
    assert [(g["after"], g["before"], g["us_per_step"], g["per_step"]) for g in summary["gaps"]] == [
        ("c", "argmax", 2.0, 1.0), ("argmax", "a", 1.0, 1.0)]
    # busy time by kernel: a 10, b the 2 us past a's end, c the 8 past b's, argmax 2: they add up to the busy time
    credited = {k["name"]: (k["us_per_step"], k["per_step"]) for k in summary["kernels"]}
    assert credited == {"a": (10.0, 1.0), "c": (8.0, 1.0), "b": (2.0, 1.0), "argmax": (2.0, 1.0)}
    assert sum(us for us, _ in credited.values()) == summary["busy_us"]
    assert step_timelines(kernels[:3], "argmax") == {"steps": 0}


def test_a_label_tells_the_calls_of_one_kernel_apart_by_their_place_in_the_step():
    def step(t0: float) -> list[KernelSpan]:
        return [KernelSpan(t0, t0 + 3, "gemv"), KernelSpan(t0 + 3, t0 + 4, "attention"), KernelSpan(t0 + 4, t0 + 9, "gemv"),
                KernelSpan(t0 + 9, t0 + 10, "argmax")]
    kernels = [KernelSpan(-5, -4, "argmax")] + step(0.0) + step(10.0) + step(20.0)
    summary = step_timelines(kernels, "argmax", label=lambda name, i: f"{name} {'qkv' if i == 0 else 'o'}"
                             if name == "gemv" else name)
    credited = {k["name"]: (k["us_per_step"], k["per_step"]) for k in summary["kernels"]}
    assert credited == {"gemv o": (5.0, 1.0), "gemv qkv": (3.0, 1.0), "attention": (1.0, 1.0), "argmax": (1.0, 1.0)}

"""Where a benchmark's JSON goes: `--out`, and on the lent device also $OUT/<name> (the folder that comes back)."""

from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

from llmpress.atomic_write import write_json_atomic


def start_gpu_report(script: str, **fields) -> dict:
    """A GPU benchmark's report header (script, command, date, GPU, torch, the copy bandwidth measured now) with
    `fields` after it; prints the GPU and its copy bandwidth."""
    import torch
    from llmpress.bench.roofline import device_name, measure_copy_bandwidth
    bandwidth = measure_copy_bandwidth("cuda")
    report = {"script": script, "command": " ".join(sys.argv), "date": date.today().isoformat(),
              "gpu": device_name("cuda"), "torch": torch.__version__, "copy_bandwidth_bytes_per_s": bandwidth, **fields}
    print(f"{report['gpu']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    return report


def save_results(report: dict, out: str | None, name: str) -> None:
    """Write results so far (a run cut short still leaves its numbers), atomically, to `out` and $OUT/`name`."""
    for path in ([Path(out)] if out else []) + ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else []):
        write_json_atomic(path, report)

"""Where a benchmark's JSON goes: `--out`, and on the lent device also $OUT/<name> (the folder that comes back)."""

from __future__ import annotations

import os
from pathlib import Path

from llmpress.atomic_write import write_json_atomic


def save_results(report: dict, out: str | None, name: str) -> None:
    """Write results so far (a run cut short still leaves its numbers), atomically, to `out` and $OUT/`name`."""
    for path in ([Path(out)] if out else []) + ([Path(os.environ["OUT"]) / name] if os.environ.get("OUT") else []):
        write_json_atomic(path, report)

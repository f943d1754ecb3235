"""Write files so that a reader (or a crash) never sees half of one: temp file in the same directory, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes | str) -> None:
    """Replace `path` with `data` in one rename (atomic when both names are on one filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a result file is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json_atomic(path: Path, record: dict) -> None:
    write_atomic(path, json.dumps(record, indent=2, default=str) + "\n")


def write_directory(out_dir: Path, fill) -> Path:
    """Create `out_dir` whole or not at all: `fill(tmp)` writes into a temporary sibling that is then renamed.
    Refuses an existing non-empty `out_dir` (nothing a user wrote is overwritten)."""
    import shutil
    from llmpress.errors import LlmpressError
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise LlmpressError(f"{out_dir} already exists and is not empty; choose a new output directory "
                            "(llmpress never overwrites files).")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a model directory is meant to be shared
        fill(tmp)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir

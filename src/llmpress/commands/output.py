"""How subcommands show and save results: aligned text tables and atomically written JSON."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def format_table(header: list[str], row: list) -> str:
    """A header line and one row, columns left-aligned to the wider of the two."""
    return format_rows(header, [row])


def format_rows(header: list[str], rows: list[list]) -> str:
    """A header line and any number of rows, each column left-aligned to its widest cell."""
    lines = [[str(c) for c in line] for line in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_json_atomic(path: Path, record: dict) -> None:
    """Write `record` to `path` through a temporary file in the same directory, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a result file is meant to be shared
        os.replace(tmp, path)  # atomic when both names are on one filesystem, hence the same directory
    except BaseException:
        os.unlink(tmp)
        raise

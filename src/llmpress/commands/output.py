"""How subcommands show and save results: aligned text tables and atomically written JSON."""

from __future__ import annotations

from llmpress.atomic_write import write_json_atomic  # noqa: F401 (re-exported for the commands)


def format_table(header: list[str], row: list) -> str:
    """A header line and one row, columns left-aligned to the wider of the two."""
    return format_rows(header, [row])


def format_rows(header: list[str], rows: list[list]) -> str:
    """A header line and any number of rows, each column left-aligned to its widest cell."""
    lines = [[str(c) for c in line] for line in [header, *rows]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)

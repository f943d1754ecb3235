"""Evaluation text for perplexity: the WikiText-2 test split from the hub, the packaged copy, or a local file.

Every source ends as a list of rows joined with "\\n\\n", the common protocol (GPTQ, AWQ:
`"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])`).

The packaged copy also splits by article into `default:calib` (every 4th article, from the 1st) and
`default:heldout` (the rest), so a quantized model can be calibrated offline on text that its
perplexity is then never measured on.
"""

from __future__ import annotations

import gzip
import os
import re
from importlib import resources
from pathlib import Path

from llmpress.errors import LlmpressError

HUB_NAME = "wikitext2"
DEFAULT_NAME = "default"
PACKAGED_FILE = "wikitext2_test.raw.gz"  # inside llmpress/data/, see its README.md for provenance
RAW_FILE_NAME = "wiki.test.raw"
PARQUET_GLOB = "test-*.parquet"  # the Hugging Face hub's parquet layout: test-00000-of-00001.parquet

FALLBACK_HINT = f"pass --data PATH (a local {RAW_FILE_NAME}) or use --data {DEFAULT_NAME}"

# An article starts at a top-level title row " = Title = "; section rows (" = = Career = = ") have two or
# more "=" on each side and stay inside their article.
ARTICLE_TITLE = re.compile(r" = [^=](.*[^=])? = ")
CALIB_EVERY = 4  # articles 0, 4, 8, ... calibrate; the other three quarters measure
ARTICLE_PARTS = ("calib", "heldout")


def load_eval_text(data: str) -> tuple[str, str]:
    """The evaluation text for `data` (wikitext2 | default | default:calib | default:heldout | PATH),
    and a one-line description of it."""
    if data == HUB_NAME:
        return _join(_hub_rows()), "WikiText-2 test split (wikitext-2-raw-v1, Hugging Face datasets)"
    if data == DEFAULT_NAME:
        rows = rows_from_text(_packaged_text())
        return _join(rows), (f"WikiText-2 test split packaged with llmpress ({len(rows)} non-empty rows only, "
                             "so perplexity is close to, not identical with, published WikiText-2 numbers)")
    if data.startswith(DEFAULT_NAME + ":"):
        part = data.split(":", 1)[1]
        if part not in ARTICLE_PARTS:
            raise LlmpressError(f"--data {data}: the packaged text splits into "
                                f"{' or '.join(DEFAULT_NAME + ':' + p for p in ARTICLE_PARTS)} only.")
        articles = split_articles(rows_from_text(_packaged_text()))
        chosen = article_part(articles, part)
        rows = [row for article in chosen for row in article]
        which = f"every {CALIB_EVERY}th from the 1st" if part == "calib" else f"all but every {CALIB_EVERY}th"
        return _join(rows), (f"{part} articles of the packaged WikiText-2 test split ({len(chosen)} of "
                             f"{len(articles)} articles, {which}; {len(rows)} rows)")
    return _load_path(data)


def split_articles(rows: list[str]) -> list[list[str]]:
    """Rows grouped by article: each group starts at a top-level title row (rows before the first title,
    if any, form a group of their own)."""
    articles: list[list[str]] = []
    for row in rows:
        if ARTICLE_TITLE.fullmatch(row.rstrip("\n")) or not articles:
            articles.append([])
        articles[-1].append(row)
    return articles


def article_part(articles: list[list[str]], part: str) -> list[list[str]]:
    """`calib`: every CALIB_EVERY-th article starting with the first; `heldout`: all the others."""
    assert part in ARTICLE_PARTS, part
    return [a for i, a in enumerate(articles) if (i % CALIB_EVERY == 0) == (part == "calib")]


def rows_from_text(text: str) -> list[str]:
    """Rows as Hugging Face's wikitext loader makes them from a file's lines.

    That loader yields each line with its "\\n" kept and whitespace-only lines as "", so joining these
    rows reproduces `--data wikitext2` exactly when given the original wiki.test.raw.
    """
    # Python's text-mode line iteration (what the loader uses) reads \r\n and \r as \n.
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    rows = [line + "\n" for line in lines[:-1]]
    if lines[-1]:  # a last line without a final newline
        rows.append(lines[-1])
    return [row if row.strip() else "" for row in rows]


def _join(rows: list[str]) -> str:
    return "\n\n".join(rows)


def _hub_rows() -> list[str]:
    try:
        import datasets
    except ImportError:
        raise LlmpressError(f"--data {HUB_NAME} needs the `datasets` package (pip install datasets); "
                            f"without it, {FALLBACK_HINT}.") from None
    try:
        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])
    except Exception as error:  # offline, hub errors and cache errors all surface as different types
        raise LlmpressError(f"WikiText-2 could not be loaded from the Hugging Face hub ({type(error).__name__}); "
                            f"{FALLBACK_HINT}.") from None


def _packaged_text() -> str:
    resource = resources.files("llmpress") / "data" / PACKAGED_FILE
    if not resource.is_file():
        raise LlmpressError(f"the packaged WikiText-2 copy (llmpress/data/{PACKAGED_FILE}) is missing from this "
                            f"install; reinstall llmpress or pass --data PATH (a local {RAW_FILE_NAME}).")
    return gzip.decompress(resource.read_bytes()).decode("utf-8")


def _load_path(data: str) -> tuple[str, str]:
    path = Path(os.path.expanduser(data))
    if not path.exists():
        raise LlmpressError(f"--data {data}: no such file or directory; pass a text file such as {RAW_FILE_NAME}, "
                            f"a .parquet file with a 'text' column, a directory holding one, "
                            f"or use --data {DEFAULT_NAME} or --data {HUB_NAME}.")
    if path.is_dir():
        if (path / RAW_FILE_NAME).is_file():
            path = path / RAW_FILE_NAME
        else:
            shards = sorted(path.glob(PARQUET_GLOB))
            if not shards:
                raise LlmpressError(f"--data {data}: the directory holds neither {RAW_FILE_NAME} nor {PARQUET_GLOB}; "
                                    f"pass one of those files, or use --data {DEFAULT_NAME}.")
            rows = [row for shard in shards for row in _parquet_rows(shard)]
            return _join(rows), f"{path}: {len(rows)} rows from {len(shards)} parquet file(s)"
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
        return _join(rows), f"{path}: {len(rows)} rows of its 'text' column"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise LlmpressError(f"--data {data} is not UTF-8 text; pass a plain-text file such as {RAW_FILE_NAME} "
                            "or a .parquet file with a 'text' column.") from None
    rows = rows_from_text(text)
    return _join(rows), f"{path}: {len(rows)} lines as rows ({sum(1 for r in rows if not r)} blank)"


def _parquet_rows(path: Path) -> list[str]:
    """The `text` column of a parquet file: the Hugging Face rows themselves, empty rows included."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LlmpressError(f"--data {path} is a parquet file, which needs pyarrow (pip install pyarrow); "
                            f"or {FALLBACK_HINT}.") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise LlmpressError(f"--data {path} has no 'text' column (columns: {', '.join(table.column_names)}); "
                            "pass a parquet file with the rows in a 'text' column.")
    return [row or "" for row in table.column("text").to_pylist()]

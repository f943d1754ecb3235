"""The pipeline's report: results.md (the seeds' table), results.json and results.png."""

from __future__ import annotations

import json
from pathlib import Path

from llmpress.atomic_write import write_atomic

from llmpress.pipeline.stages import PipelineContext


def results_table(ctx: PipelineContext) -> list[dict]:
    """One row per variant: Method, Framework, Throughput tok/s (batch 1 decode), PPL."""
    return [{"method": v.method, "framework": v.metrics.get("framework") or ctx.framework or "llmpress",
             "throughput_tokens_per_s": v.metrics.get("throughput_tokens_per_s"),
             "ppl": v.metrics.get("ppl")} for v in ctx.variants]


def write_report(ctx: PipelineContext, settings: dict) -> list[Path]:
    """Write the three files into ctx.out_dir, each atomically; returns their paths."""
    rows = results_table(ctx)
    record = {"settings": settings, "results": rows, "analysis": ctx.analysis,
              "variants": {v.method: v.metrics for v in ctx.variants}}
    paths = [ctx.out_dir / "results.json", ctx.out_dir / "results.md", ctx.out_dir / "results.png"]
    write_atomic(paths[0], json.dumps(record, indent=2, default=str))
    write_atomic(paths[1], render_markdown(rows, settings, ctx.analysis))
    write_atomic(paths[2], render_plot(rows, ctx.analysis))
    return paths


def render_markdown(rows: list[dict], settings: dict, analysis: dict | None) -> str:
    lines = [f"# llmpress pipeline: {settings['model']}", "",
             f"Device: {settings['device']}; dtype {settings['dtype']}; {settings['date']}; "
             f"command: `{settings['command']}`", "",
             "| Method | Framework | Throughput (tok/s) | PPL |", "|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['framework']} | {_fmt(r['throughput_tokens_per_s'], '.1f')} | "
                     f"{_fmt(r['ppl'], '.3f')} |")
    lines += ["", f"Throughput: batch-1 decode tokens/s, {settings['new_tokens']} new tokens, warm-up excluded "
              "(engine rows: output tokens/s of all requests served at once, prefill included). "
              f"PPL: {settings['data_description']}, windows of {settings['ppl_seq_len']} tokens"
              + (f", first {settings['ppl_max_windows']} windows." if settings["ppl_max_windows"] else ".")]
    if analysis is not None:
        roof = analysis["roofline"]["rows"][0]
        if roof.get("tokens_per_s"):
            lines += ["", f"Bandwidth roofline for batch-1 decode on this device (weights only): {roof['tokens_per_s']:.1f} tok/s "
                      f"({roof['bytes_per_token'] / 1e6:.1f} MB per token at "
                      f"{analysis['roofline']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s measured copy bandwidth)."]
    return "\n".join(lines) + "\n"


def render_plot(rows: list[dict], analysis: dict | None) -> bytes:
    """Two bar charts side by side: throughput (with the roofline) and perplexity. PNG bytes."""
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    fig = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(fig)
    names = [r["method"] for r in rows]
    for ax, key, title in ((fig.add_subplot(1, 2, 1), "throughput_tokens_per_s", "Throughput (tok/s): batch-1 decode; engine rows: all requests"),
                           (fig.add_subplot(1, 2, 2), "ppl", "WikiText-2 perplexity (lower is better)")):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(names, values, color="#4C72B0")
        ax.bar_label(bars, fmt="%.1f" if key != "ppl" else "%.2f")
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", labelrotation=15, labelsize=8)
        if key == "throughput_tokens_per_s" and analysis is not None:
            roof = analysis["roofline"]["rows"][0].get("tokens_per_s")
            if roof:
                ax.axhline(roof, color="#C44E52", linestyle="--", label=f"bandwidth roofline {roof:.1f}")
                ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)

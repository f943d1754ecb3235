"""What a fine-tuning run leaves besides weights: train_log.json and training_curve.png."""

from __future__ import annotations

import io
import math
from pathlib import Path

from llmpress.atomic_write import write_atomic, write_json_atomic
from llmpress.finetune.trainer import TrainResult

LOG_FILE = "train_log.json"
CURVE_FILE = "training_curve.png"


def training_record(result: TrainResult, settings: dict) -> dict:
    state = result.state
    return {"settings": settings, "total_steps": result.total_steps, "steps_per_epoch": result.steps_per_epoch,
            "steps_done": state.step, "stopped_early": state.stopped_early, "best_step": state.best_step,
            "best_val_ppl": state.best_val_ppl, "final_train_loss": result.final_loss,
            "seconds": round(result.seconds, 1), "history": state.history, "evals": state.evals}


def plot_training_curve(ax_loss, history: list[dict], evals: list[dict]) -> None:
    """Training loss per step (left axis) and validation perplexity per evaluation (right axis)."""
    ax_loss.plot([h["step"] for h in history], [h["loss"] for h in history], color="#4C72B0", lw=1,
                 label="training loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("training loss (nats/token)", color="#4C72B0")
    ax_ppl = ax_loss.twinx()
    ax_ppl.plot([e["step"] for e in evals], [e["val_ppl"] for e in evals], "o-", color="#C44E52",
                label="validation perplexity")
    ax_ppl.set_ylabel("validation perplexity", color="#C44E52")
    finite = [e for e in evals if math.isfinite(e["val_ppl"])]
    if finite:
        best = min(finite, key=lambda e: e["val_ppl"])
        ax_ppl.annotate(f"best {best['val_ppl']:.2f}", (best["step"], best["val_ppl"]), textcoords="offset points",
                        xytext=(0, 8), ha="center", fontsize=8, color="#C44E52")


def curve_png(history: list[dict], evals: list[dict], title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    fig = Figure(figsize=(6.5, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plot_training_curve(ax, history, evals)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_training_report(out_dir: Path, result: TrainResult, settings: dict) -> list[Path]:
    paths = [Path(out_dir) / LOG_FILE, Path(out_dir) / CURVE_FILE]
    write_json_atomic(paths[0], training_record(result, settings))
    write_atomic(paths[1], curve_png(result.state.history, result.state.evals,
                                     f"LoRA fine-tuning: {settings.get('model', '')}"))
    return paths

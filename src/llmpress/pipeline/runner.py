"""Run the pipeline's stages in order and write the report."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from llmpress.errors import LlmpressError
from llmpress.loading.resolve import DEFAULT_MODEL
from llmpress.pipeline.report import write_report
from llmpress.pipeline.stages import DEFAULT_STAGES, STAGES, PipelineContext, Variant


@dataclass
class PipelineConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    stages: tuple[str, ...] = DEFAULT_STAGES
    # Perplexity text. The held-out three quarters of the packaged WikiText-2 test articles: the other
    # quarter (default:calib) calibrates GPTQ and AWQ, and no model may be scored on its calibration text.
    data: str = "default:heldout"
    ppl_seq_len: int = 2048
    ppl_max_windows: int | None = 4  # minutes on 2 CPU cores; None for the whole text
    quant_methods: tuple[str, ...] = ("rtn", "gptq", "awq")
    quant_bits: int = 4
    quant_group_size: int = 128
    calib: str = "default"  # the calibration quarter of the packaged articles (quant.calibration)
    calib_nsamples: int = 16  # small for CPU; the papers' 128 x 2048 fits a GPU
    calib_seqlen: int = 512
    # finetune stage (opt-in): LoRA on the calibration articles, a few steps that fit 2 CPU cores
    finetune_data: str = "default"  # finetune/data.py: `default` trains on default:calib, never on default:heldout
    finetune_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    finetune_r: int = 8
    finetune_alpha: float = 32.0
    finetune_lr: float = 1e-3
    finetune_steps: int = 20
    finetune_batch_size: int = 2
    finetune_seq_len: int = 512
    finetune_quant_method: str = "gptq"  # the quantize stage's "LoRA + GPTQ" row
    new_tokens: int | None = None  # None: 256 on CUDA, 32 on CPU (int4 on CPU runs the slow reference path)
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    decode_mode: str = "auto"
    repeats: int = 2
    out_dir: str | None = None  # default: reports/<timestamp>-<model>
    speculative_draft: str = "ngram"  # the speculative stage's --draft
    num_speculative_tokens: int = 5
    engine_num_prompts: int | None = None  # engine stage: requests at once (None: 256 on CUDA, 8 on CPU)

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise LlmpressError(f"unknown pipeline stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}.")


def run_pipeline(config: PipelineConfig, command: str = "") -> Path:
    """Run every stage on the configured model; returns the report directory."""
    from llmpress.eval.data import load_eval_text
    from llmpress.loading import load_model

    out_dir = _prepare_out_dir(config)
    _, data_description = load_eval_text(config.data)  # fail on a bad --data before minutes of work
    started = time.perf_counter()
    loaded = load_model(config.model, dtype=config.dtype, device=config.device)
    dtype = str(loaded.model.dtype).removeprefix("torch.")
    ctx = PipelineContext(config=config, out_dir=out_dir, variants=[Variant(f"Baseline ({dtype})", loaded)])
    for name in config.stages:
        print(f"\n== stage {name}", flush=True)
        stage_start = time.perf_counter()
        STAGES[name](ctx)
        print(f"== stage {name} done in {time.perf_counter() - stage_start:.0f} s", flush=True)
    settings = dict(asdict(config), device=str(loaded.model.device), dtype=dtype, command=command or "llmpress pipeline",
                    new_tokens=config.new_tokens or (256 if loaded.model.device.type == "cuda" else 32),
                    date=datetime.now().isoformat(timespec="seconds"), data_description=data_description,
                    seconds=round(time.perf_counter() - started, 1))
    paths = write_report(ctx, settings)
    print("\n" + paths[1].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))
    return out_dir


def _prepare_out_dir(config: PipelineConfig) -> Path:
    if config.out_dir is None:
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(config.model).name or config.model).strip("-")
        out_dir = Path("reports") / f"{datetime.now():%Y%m%d-%H%M%S}-{slug}"
    else:
        out_dir = Path(config.out_dir)
    if (out_dir / "results.json").exists():
        raise LlmpressError(f"{out_dir} already holds a pipeline report; pass a new --out directory "
                            "(llmpress never overwrites results).")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def command_line() -> str:
    return "llmpress " + " ".join(sys.argv[1:])

"""The LoRA training loop: AdamW, warm-up + cosine/linear schedule, gradient accumulation and clipping,
optional gradient checkpointing, bf16 autocast on GPU, periodic validation perplexity with early stopping
on its best value, and resumable checkpoints.

One optimizer step consumes batch_size x grad_accum chunks of seq_len tokens. Which chunks is a pure
function of (seed, step) (data.epoch_order), and dropout draws from torch's global RNG, whose state is
checkpointed: a run interrupted and resumed from its last checkpoint takes exactly the steps of one that
never stopped.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from llmpress.atomic_write import write_directory
from llmpress.errors import LlmpressError
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity
from llmpress.finetune.checkpointing import gradient_checkpointing
from llmpress.finetune.data import TrainingTokens, chunk_tokens, epoch_order
from llmpress.finetune.lora import LoRAConfig, LoRALinear
from llmpress.finetune.peft_format import adapter_state_dict, load_adapter_state, write_adapter_files

SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw", "adamw8bit")
CHECKPOINTS_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
# Settings a resumed run must share with the run that wrote the checkpoint (they decide which batch is which).
RESUME_MUST_MATCH = ("seq_len", "batch_size", "grad_accum", "seed", "epochs", "max_steps")


@dataclass
class TrainConfig:
    lr: float = 2e-4
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 512
    warmup_ratio: float = 0.05  # fraction of the steps spent ramping the learning rate up from ~0
    schedule: str = "cosine"  # cosine | linear | constant, after warm-up, decaying to 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw (fused on CUDA) | adamw8bit (needs bitsandbytes)
    gradient_checkpointing: bool = False
    eval_every: int = 50  # steps between validation perplexity evaluations; 0: only before and after
    eval_windows: int = 4  # validation windows of seq_len tokens
    patience: int | None = 3  # evaluations without a new best before stopping; None: never stop early
    checkpoint_every: int | None = None  # steps; default eval_every; 0: no checkpoints
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) < 1 or (name == "seq_len" and self.seq_len < 2):
                raise LlmpressError(f"--{name.replace('_', '-')} {getattr(self, name)} is too small.")
        if self.lr <= 0:
            raise LlmpressError(f"--lr {self.lr} must be positive.")
        if self.max_steps is not None and self.max_steps < 1:
            raise LlmpressError(f"--max-steps {self.max_steps} must be at least 1.")
        if self.max_steps is None and self.epochs <= 0:
            raise LlmpressError(f"--epochs {self.epochs} must be positive (or pass --max-steps).")
        if self.schedule not in SCHEDULES:
            raise LlmpressError(f"unknown --schedule {self.schedule}; choose {', '.join(SCHEDULES)}.")
        if self.optimizer not in OPTIMIZERS:
            raise LlmpressError(f"unknown --optimizer {self.optimizer}; choose {', '.join(OPTIMIZERS)}.")
        if self.checkpoint_every is None:
            self.checkpoint_every = self.eval_every


@dataclass
class TrainState:
    """Everything besides weights, optimizer and RNG that a resumed run needs."""
    step: int = 0
    best_val_ppl: float = math.inf
    best_step: int | None = None
    evals_since_best: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)  # per step: loss, ppl, lr, grad_norm
    evals: list[dict] = field(default_factory=list)  # per evaluation: step, val_ppl


@dataclass
class TrainResult:
    state: TrainState
    total_steps: int
    steps_per_epoch: int
    seconds: float

    @property
    def final_loss(self) -> float:
        return self.state.history[-1]["loss"] if self.state.history else math.nan


def make_optimizer(params: list[nn.Parameter], config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    if config.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise LlmpressError("--optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                                "use --optimizer adamw.") from None
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    # fused: one kernel for all parameters instead of a few per tensor (CUDA only)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=device.type == "cuda")


def lr_factor(step: int, total_steps: int, config: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then decay to 0."""
    warmup = max(1, round(config.warmup_ratio * total_steps)) if config.warmup_ratio > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress if config.schedule == "linear" else 1.0


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy (float32) of input_ids [B, T]."""
    logits = model(input_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def train(model: nn.Module, adapters: dict[str, LoRALinear], lora_config: LoRAConfig, tokens: TrainingTokens,
          config: TrainConfig, out_dir: Path | None = None, resume: bool = False, progress: bool = True,
          on_step_end: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the adapters in place; on return they hold the weights of the best validation perplexity.
    Checkpoints go to out_dir/checkpoints/step-N (each written whole, then renamed)."""
    device = next(iter(adapters.values())).lora_A.weight.device
    chunks = chunk_tokens(tokens.train, config.seq_len)
    seqs_per_step = config.batch_size * config.grad_accum
    steps_per_epoch = len(chunks) // seqs_per_step
    if steps_per_epoch == 0:
        raise LlmpressError(f"the training text has {len(chunks)} chunks of {config.seq_len} tokens, fewer than one "
                            f"step's {seqs_per_step} (batch size x grad accum); lower them or --seq-len.")
    total_steps = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    val_ids = tokens.validation[:config.eval_windows * config.seq_len]
    val_config = PerplexityConfig(seq_len=config.seq_len, max_windows=config.eval_windows)

    params = [p for m in adapters.values() for p in (m.lora_A.weight, m.lora_B.weight)]
    optimizer = make_optimizer(params, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, config))
    state, best_adapter = TrainState(), None
    if resume:
        state, best_adapter = _load_checkpoint(out_dir, adapters, optimizer, scheduler, config)
    else:
        torch.manual_seed(config.seed)  # dropout masks

    def evaluate() -> None:
        nonlocal best_adapter
        model.eval()
        val_ppl = evaluate_perplexity(model, val_ids, val_config, progress=False).ppl
        model.train()
        state.evals.append({"step": state.step, "val_ppl": val_ppl})
        if val_ppl < state.best_val_ppl:
            state.best_val_ppl, state.best_step, state.evals_since_best = val_ppl, state.step, 0
            best_adapter = adapter_state_dict(adapters)  # early stopping keeps these weights
        else:
            state.evals_since_best += 1
        bar.write(f"step {state.step}: validation perplexity {val_ppl:.3f} (best {state.best_val_ppl:.3f} "
                  f"at step {state.best_step})")

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    started = time.perf_counter()
    model.train()
    with gradient_checkpointing(model, config.gradient_checkpointing), \
            tqdm(total=total_steps, initial=state.step, desc="finetune", unit="step", disable=not progress) as bar:
        if state.step == 0 and not state.evals:
            evaluate()  # the base model's validation perplexity: the first value to beat
        while state.step < total_steps and not state.stopped_early:
            loss_sum = 0.0
            for micro in range(config.grad_accum):
                input_ids = _batch(chunks, state.step, micro, config, steps_per_epoch).to(device)
                with autocast:
                    loss = causal_lm_loss(model, input_ids)
                (loss / config.grad_accum).backward()
                loss_sum += loss.item()
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm).item()
                         if config.max_grad_norm > 0 else math.nan)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            loss = loss_sum / config.grad_accum
            state.history.append({"step": state.step, "loss": loss, "ppl": math.exp(min(loss, 50.0)), "lr": lr,
                                  "grad_norm": grad_norm})
            bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50.0)):.2f}", refresh=False)
            bar.update(1)
            last = state.step == total_steps
            if not math.isfinite(loss):  # diverged (lr too high): keep the best weights so far
                bar.write(f"step {state.step}: the loss is {loss}; stopping and keeping the best adapter.")
                state.stopped_early = True
            elif (config.eval_every and state.step % config.eval_every == 0) or last:
                evaluate()
                if config.patience is not None and state.evals_since_best >= config.patience:
                    bar.write(f"early stopping: no better validation perplexity in {config.patience} evaluations.")
                    state.stopped_early = True
            if out_dir is not None and config.checkpoint_every and state.step % config.checkpoint_every == 0 \
                    and not last and not state.stopped_early:
                _save_checkpoint(out_dir, adapters, lora_config, optimizer, scheduler, state, best_adapter, config)
            if on_step_end is not None:
                on_step_end(state.step, loss)
    model.eval()
    if best_adapter is not None:
        load_adapter_state(adapters, best_adapter)
    return TrainResult(state, total_steps, steps_per_epoch, time.perf_counter() - started)


def _batch(chunks: torch.Tensor, step: int, micro: int, config: TrainConfig, steps_per_epoch: int) -> torch.Tensor:
    """The [batch_size, seq_len] chunks of micro-batch `micro` of optimizer step `step`."""
    seqs_per_step = config.batch_size * config.grad_accum
    epoch, step_in_epoch = divmod(step, steps_per_epoch)
    begin = step_in_epoch * seqs_per_step + micro * config.batch_size
    return chunks[epoch_order(len(chunks), epoch, config.seed)[begin:begin + config.batch_size]]


def _save_checkpoint(out_dir: Path, adapters, lora_config, optimizer, scheduler, state: TrainState,
                     best_adapter: dict | None, config: TrainConfig) -> None:
    """out_dir/checkpoints/step-N: the adapter (PEFT format) and trainer_state.pt; older ones are removed."""
    rng = {"cpu": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    trainer_state = {"state": asdict(state), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": rng, "best_adapter": best_adapter, "config": asdict(config)}

    def fill(tmp: Path) -> None:
        write_adapter_files(tmp, adapters, lora_config)
        torch.save(trainer_state, tmp / TRAINER_STATE)

    root = Path(out_dir) / CHECKPOINTS_DIR
    written = write_directory(root / f"step-{state.step:06d}", fill)
    for old in root.glob("step-*"):
        if old != written and old.is_dir():
            shutil.rmtree(old)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint directory (they are renamed into place only when whole)."""
    found = sorted((Path(out_dir) / CHECKPOINTS_DIR).glob("step-*"))
    return found[-1] if found else None


def _load_checkpoint(out_dir: Path | None, adapters, optimizer, scheduler, config: TrainConfig):
    import safetensors.torch
    from llmpress.finetune.peft_format import ADAPTER_WEIGHTS
    checkpoint = latest_checkpoint(out_dir) if out_dir is not None else None
    if checkpoint is None:
        raise LlmpressError(f"--resume: {out_dir} holds no checkpoint ({CHECKPOINTS_DIR}/step-N); "
                            "start a new run without --resume.")
    saved = torch.load(checkpoint / TRAINER_STATE, map_location="cpu", weights_only=True)
    changed = [k for k in RESUME_MUST_MATCH if saved["config"].get(k) != getattr(config, k)]
    if changed:
        raise LlmpressError(f"--resume: {', '.join(changed)} differ from the run that wrote {checkpoint}; "
                            "resume with the same settings.")
    load_adapter_state(adapters, safetensors.torch.load_file(str(checkpoint / ADAPTER_WEIGHTS)), str(checkpoint))
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["cpu"])
    if saved["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return TrainState(**saved["state"]), saved["best_adapter"]

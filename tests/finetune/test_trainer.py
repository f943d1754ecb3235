"""The training loop: resume gives the uninterrupted run's loss, early stopping keeps the best adapter,
gradient accumulation equals a bigger batch, the schedule's shape, and its configuration errors."""

import math

import pytest
import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.eval.perplexity import PerplexityConfig, evaluate_perplexity
from llmpress.finetune.data import TrainingTokens
from llmpress.finetune.lora import LoRAConfig, apply_lora
from llmpress.finetune.trainer import TrainConfig, latest_checkpoint, lr_factor, make_optimizer, train
from llmpress.model import LlamaForCausalLM
from tests.conftest import tiny_config

LORA = LoRAConfig(r=4, alpha=8, dropout=0.2, targets=("q_proj", "v_proj", "up_proj"))


def text_tokens() -> TrainingTokens:
    # A learnable stream: a short repeating pattern with noise, so the loss moves in a few steps.
    generator = torch.Generator().manual_seed(0)
    ids = (torch.arange(4096) * 7 % 61 + torch.randint(0, 3, (4096,), generator=generator)) % 256
    return TrainingTokens(train=ids[:3584], validation=ids[3584:], description="synthetic")


def fresh_model() -> tuple[LlamaForCausalLM, dict]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()
    torch.manual_seed(1)
    return model, apply_lora(model, LORA)


def adapter_tensors(adapters) -> list[torch.Tensor]:
    return [p.detach().clone() for m in adapters.values() for p in (m.lora_A.weight, m.lora_B.weight)]


class Interrupted(Exception):
    pass


def test_interrupted_and_resumed_run_ends_at_the_uninterrupted_loss(tmp_path):
    config = TrainConfig(lr=3e-3, max_steps=7, batch_size=2, grad_accum=2, seq_len=32, eval_every=2,
                         eval_windows=2, patience=None, checkpoint_every=2, seed=3)
    model, adapters = fresh_model()
    straight = train(model, adapters, LORA, text_tokens(), config, out_dir=tmp_path / "a", progress=False)
    straight_weights = adapter_tensors(adapters)

    def interrupt_at_5(step: int, loss: float) -> None:
        if step == 5:  # after step 5; the last checkpoint is step 4's, so step 5 is done twice
            raise Interrupted
    model, adapters = fresh_model()
    with pytest.raises(Interrupted):
        train(model, adapters, LORA, text_tokens(), config, out_dir=tmp_path / "b", progress=False,
              on_step_end=interrupt_at_5)
    assert latest_checkpoint(tmp_path / "b").name == "step-000004"
    assert len(list((tmp_path / "b" / "checkpoints").iterdir())) == 1  # older checkpoints removed, no temp dirs

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config()).eval()  # the same base model (checkpoints hold only the adapters)
    torch.manual_seed(123)  # a different RNG state and different initial adapters: the checkpoint must restore both
    adapters = apply_lora(model, LORA)
    resumed = train(model, adapters, LORA, text_tokens(), config, out_dir=tmp_path / "b", resume=True, progress=False)

    assert straight.state.step == resumed.state.step == 7
    assert resumed.final_loss == straight.final_loss
    assert [h["loss"] for h in resumed.state.history] == [h["loss"] for h in straight.state.history]
    assert resumed.state.evals == straight.state.evals
    for a, b in zip(straight_weights, adapter_tensors(adapters)):
        assert torch.equal(a, b)
    assert straight.state.history[-1]["loss"] < straight.state.history[0]["loss"]  # it did learn


def test_early_stopping_keeps_the_best_adapter():
    tokens = text_tokens()
    config = TrainConfig(lr=0.5, max_steps=12, batch_size=2, seq_len=32, eval_every=1, eval_windows=2,
                         patience=2, max_grad_norm=0, warmup_ratio=0, schedule="constant")
    model, adapters = fresh_model()
    result = train(model, adapters, LORA, tokens, config, progress=False)  # lr 0.5: the adapters blow up
    state = result.state
    assert state.stopped_early and state.step < 12
    assert state.best_val_ppl == min(e["val_ppl"] for e in state.evals)
    assert state.evals[-1]["val_ppl"] > state.best_val_ppl
    # the model now holds the best adapter, not the last one
    val = evaluate_perplexity(model, tokens.validation[:64], PerplexityConfig(seq_len=32, max_windows=2), progress=False)
    assert val.ppl == pytest.approx(state.best_val_ppl, rel=1e-6)


def test_gradient_accumulation_equals_the_bigger_batch():
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj"))
    weights = []
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_config()).eval()
        torch.manual_seed(1)
        adapters = apply_lora(model, lora)
        config = TrainConfig(lr=1e-2, max_steps=3, batch_size=batch_size, grad_accum=grad_accum, seq_len=32,
                             eval_every=0, eval_windows=1, patience=None)
        train(model, adapters, lora, text_tokens(), config, progress=False)
        weights.append(adapter_tensors(adapters))
    for other in weights[1:]:
        for a, b in zip(weights[0], other):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_schedule_warms_up_then_decays_to_zero():
    config = TrainConfig(warmup_ratio=0.1, schedule="cosine")
    factors = [lr_factor(step, 100, config) for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 1e-3
    linear = TrainConfig(warmup_ratio=0.0, schedule="linear")
    assert lr_factor(0, 10, linear) == 1.0 and lr_factor(5, 10, linear) == pytest.approx(0.5)
    assert math.isclose(lr_factor(50, 100, TrainConfig(warmup_ratio=0.0)), 0.5, rel_tol=1e-9)  # cosine midpoint


def test_configuration_errors():
    with pytest.raises(LlmpressError, match="--batch-size 0 is too small"):
        TrainConfig(batch_size=0)
    with pytest.raises(LlmpressError, match="unknown --schedule"):
        TrainConfig(schedule="step")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(LlmpressError, match="adamw8bit needs bitsandbytes"):
            make_optimizer([nn.Parameter(torch.zeros(1))], TrainConfig(optimizer="adamw8bit"), torch.device("cpu"))
    model, adapters = fresh_model()
    tokens = TrainingTokens(train=torch.arange(100) % 256, validation=torch.arange(64) % 256, description="tiny")
    with pytest.raises(LlmpressError, match="fewer than one step"):
        train(model, adapters, LORA, tokens, TrainConfig(seq_len=32, batch_size=4), progress=False)

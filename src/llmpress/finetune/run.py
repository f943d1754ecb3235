"""Fine-tune a LoadedModel end to end (the library entry point behind `llmpress finetune` and the pipeline):
optional int4 base (QLoRA), adapters, training, and the adapter / merged outputs."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmpress.errors import LlmpressError
from llmpress.finetune.data import load_training_tokens
from llmpress.finetune.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from llmpress.finetune.trainer import TrainConfig, TrainResult, train
from llmpress.quant.linear import QuantLinear

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora")
QLORA_QUANTIZERS = ("rtn", "gptq")


@dataclass
class FinetuneResult:
    loaded: object  # the LoadedModel holding the trained adapters (or merged, after `merge`)
    adapters: dict[str, LoRALinear]
    train: TrainResult
    data_description: str


def qlora_base(loaded, quantizer: str = "rtn", group_size: int = 128, calib: str = "default", nsamples: int = 16,
               seqlen: int = 512):
    """`loaded` itself when its projections are already int4 QuantLinear (a GPTQ/AWQ checkpoint: the way to
    tune a model too large for bf16 memory), else an int4 copy made with RTN or GPTQ."""
    if any(isinstance(m, QuantLinear) for m in loaded.model.modules()):
        return loaded
    from llmpress.commands.quantize import quantized_copy
    from llmpress.quant.scheme import QuantScheme
    if quantizer not in QLORA_QUANTIZERS:
        raise LlmpressError(f"unknown --qlora-quantizer {quantizer}; choose {', '.join(QLORA_QUANTIZERS)}.")
    scheme = QuantScheme(bits=4, group_size=group_size)
    extra = {} if quantizer == "rtn" else dict(calib=calib, nsamples=nsamples, seqlen=seqlen, seed=0)
    return quantized_copy(loaded, quantizer, scheme, **extra)


def finetune(loaded, lora_config: LoRAConfig, train_config: TrainConfig, data: str = "default",
             out_dir: Path | None = None, resume: bool = False, progress: bool = True,
             copy_model: bool = True, on_step_end=None) -> FinetuneResult:
    """Train LoRA adapters on `data` (see finetune/data.py); the model is copied first unless copy_model=False.
    Adapters are initialized from `train_config.seed`."""
    tokens = load_training_tokens(loaded.tokenizer, data, train_config.seq_len)
    if copy_model:
        loaded = copy.copy(loaded)
        loaded.model = copy.deepcopy(loaded.model)
    torch.manual_seed(train_config.seed)  # A's Kaiming init
    adapters = apply_lora(loaded.model, lora_config)
    result = train(loaded.model, adapters, lora_config, tokens, train_config, out_dir=out_dir, resume=resume,
                   progress=progress, on_step_end=on_step_end)
    return FinetuneResult(loaded, adapters, result, tokens.description)


def merge_adapters(result: FinetuneResult):
    """Fold the adapters into plain nn.Linear weights, in place, and return the LoadedModel: a plain float
    model. With an int4 base (QLoRA) every QuantLinear is dequantized, the adapted ones before adding
    (alpha/r) B A, so the merged model computes exactly what was trained."""
    merge_lora(result.loaded.model)
    dequantize_linears(result.loaded.model)
    return result.loaded


def dequantize_linears(model: nn.Module) -> int:
    """Swap every QuantLinear for the nn.Linear holding its dequantized weight. Returns how many."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        q = model.get_submodule(name)
        weight = q.dequantize_weight()
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if q.bias is not None:
                linear.bias.copy_(q.bias)
        model.set_submodule(name, linear.requires_grad_(False))
    return len(names)

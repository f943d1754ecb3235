"""`--draft` specs -> drafters: ngram | ngram:N | self:N | int4:rtn | int4:gptq | any model spec."""

from __future__ import annotations

from llmpress.errors import LlmpressError
from llmpress.speculative.drafters import (Drafter, ModelDrafter, NGramDrafter, SelfSpeculativeDrafter,
                                           check_same_vocabulary)

DRAFT_HELP = ("draft for speculative decoding: ngram (prompt lookup; ngram:N for n-grams up to N), self:N (the "
              "target's first N layers), int4:rtn | int4:gptq (the target's own 4-bit g128 copy), or a model spec "
              "sharing the target's tokenizer")


def build_drafter(spec: str, target, dtype="auto", device=None) -> Drafter:
    """target: the LoadedModel being accelerated; a model draft is loaded with `dtype` on the target's device."""
    if spec == "ngram" or spec.startswith("ngram:"):
        return NGramDrafter(max_ngram=_int_suffix(spec, "ngram:N", default=3))
    if spec.startswith("self:"):
        return SelfSpeculativeDrafter(target.model, _int_suffix(spec, "self:N"))
    if spec.startswith("int4:"):
        method = spec.split(":", 1)[1]
        if method not in ("rtn", "gptq", "awq"):
            raise LlmpressError(f"--draft {spec}: choose int4:rtn, int4:gptq or int4:awq.")
        from llmpress.commands.quantize import quantized_copy
        from llmpress.quant.scheme import QuantScheme
        # Small calibration (as the pipeline's CPU defaults): a draft only has to agree often, not always.
        copy = quantized_copy(target, method, QuantScheme(bits=4, group_size=128), calib="default",
                              nsamples=16, seqlen=512, seed=0)
        return ModelDrafter(copy.model, name=spec)
    from llmpress.loading import load_model
    draft = load_model(spec, dtype=dtype, device=device or target.model.device)
    check_same_vocabulary(target, draft, f"the draft model {spec}")
    return ModelDrafter(draft.model, name=spec)


def _int_suffix(spec: str, form: str, default: int | None = None) -> int:
    head, _, tail = spec.partition(":")
    if not tail and default is not None:
        return default
    try:
        value = int(tail)
    except ValueError:
        value = 0
    if value < 1:
        raise LlmpressError(f"--draft {spec}: expected {form} with N a positive integer.")
    return value

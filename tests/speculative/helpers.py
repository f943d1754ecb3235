"""Tiny random targets and drafters for the speculative tests."""

from __future__ import annotations

import torch

from llmpress.generation import Generator, SamplingParams
from llmpress.model import LlamaForCausalLM
from tests.conftest import tiny_config

NEW = 40  # tokens the greedy-equivalence tests generate
PROMPT = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))


def tiny_model(seed: int, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides))
    # A larger init than nn.Linear's default: peaked next-token distributions, like a trained model,
    # so greedy decoding has clear winners (random near-ties are not what these tests are about).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval().requires_grad_(False)


def loaded(model: LlamaForCausalLM):
    from llmpress.loading.loader import LoadedModel
    from llmpress.loading.resolve import ModelSource
    return LoadedModel(model, None, model.config, "tiny", ModelSource("random", architecture="tiny"))


def plain_greedy(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int, stop_ids=()) -> list[int]:
    gen = Generator(model, prompt.shape[1] + new_tokens, mode="eager")
    out = gen.generate(prompt, SamplingParams(max_new_tokens=new_tokens), list(stop_ids))
    return out.token_ids[0, :out.num_generated[0]].tolist()


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper quantile of chi-square(df) by the Wilson-Hilferty approximation; z = 3.09 is the 0.999 quantile
    of the standard normal, so a correct sampler fails 1 time in 1000 (and never, with a fixed seed)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * a ** 0.5) ** 3


def chi_square(observed: torch.Tensor, expected_probs: torch.Tensor, min_expected: float = 5.0) -> tuple[float, int]:
    """Pearson's statistic and degrees of freedom; cells expecting fewer than `min_expected` are pooled."""
    n = observed.sum().item()
    expected = expected_probs.double() * n
    small = expected < min_expected
    obs = observed.double()
    if small.any():
        obs = torch.cat([obs[~small], obs[small].sum()[None]])
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    stat = ((obs[keep] - expected[keep]) ** 2 / expected[keep]).sum().item()
    return stat, int(keep.sum().item()) - 1

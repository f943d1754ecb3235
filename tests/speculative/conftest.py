"""Fixtures shared by the speculative tests: a tiny target, its greedy continuation of PROMPT, its int4 copy."""

import pytest

from tests.speculative.helpers import NEW, PROMPT, loaded, plain_greedy, tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model(0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def reference(target):
    # NEW + 8 tokens: the oracle always has a right answer, even for the last round's drafts.
    return plain_greedy(target, PROMPT, NEW + 8)


@pytest.fixture(scope="module")
def int4_target(target):
    from llmpress.commands.quantize import quantized_copy
    from llmpress.quant.linear import QuantLinear
    from llmpress.quant.scheme import QuantScheme
    copy = quantized_copy(loaded(target), "rtn", QuantScheme(bits=4, group_size=32)).model
    assert any(isinstance(m, QuantLinear) for m in copy.modules())
    return copy

"""Speculative decoding: drafters propose, the target verifies k tokens per forward pass, losslessly."""

from llmpress.speculative.decoder import SpeculativeConfig, SpeculativeGenerator, SpeculativeOutput, SpeculativeStats
from llmpress.speculative.drafters import (Draft, Drafter, ModelDrafter, NGramDrafter, OracleDrafter,
                                           SelfSpeculativeDrafter, check_same_vocabulary)

__all__ = ["SpeculativeConfig", "SpeculativeGenerator", "SpeculativeOutput", "SpeculativeStats", "Draft", "Drafter",
           "ModelDrafter", "NGramDrafter", "OracleDrafter", "SelfSpeculativeDrafter", "check_same_vocabulary"]

"""Gradient (activation) checkpointing as a module swap: each decoder layer keeps only its input during
the forward pass and recomputes its activations in backward (Chen et al. 2016), so activation memory
no longer grows with the number of layers. The model code is untouched."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointedLayer(nn.Module):
    """Runs `layer` under torch.utils.checkpoint while autograd records; plainly under no_grad (evaluation)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *args):
        if torch.is_grad_enabled():
            # preserve_rng_state (default): the recomputation draws the same dropout masks as the forward.
            return checkpoint(self.layer, *args, use_reentrant=False)
        return self.layer(*args)


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool = True):
    """Wrap every decoder layer of `model` in a CheckpointedLayer for the duration of the block."""
    layers = model.model.layers
    originals = list(layers)
    if enabled:
        for i, layer in enumerate(originals):
            layers[i] = CheckpointedLayer(layer)
    try:
        yield model
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer

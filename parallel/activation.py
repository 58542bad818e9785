"""Activation checkpointing: recompute each block's activations in backward instead of storing them."""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Wrap each block's forward in place.

    Replacing `forward` (rather than wrapping the module) keeps parameter names unchanged, so
    checkpoints do not depend on whether this was on.
    """
    for block in model.layers.values():
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)

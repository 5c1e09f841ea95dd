"""The one random dihedral augmentation (rotation by 90 degrees and flip) of training batches."""

from __future__ import annotations

import torch
from torch import Tensor


def dihedral(gen: torch.Generator, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The same random rotation by 90 degrees and flip of every tensor over its last two dims
    (images [B,C,H,W] and their maps [B,G,G] move together). Normal parts appear in any pose."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    out = tuple(torch.rot90(t, k, (-2, -1)) for t in tensors)
    if bool(torch.rand(1, generator=gen) < 0.5):
        out = tuple(t.flip(-1) for t in out)
    return out

"""The keep-mask applied to a frame: below both the teacher (which learns with random
masks) and CMER (which decides the mask), so neither imports the other for it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_keep(keep: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """[B,G,G] -> [B,1,H,W] by nearest upsampling (each patch covers its pixels exactly)."""
    # python ints: constant Resize sizes in the traced graph (H, W are static in the contract)
    return F.interpolate(keep.unsqueeze(1).float(), size=(int(size[0]), int(size[1])), mode="nearest")


def apply_mask(x: Tensor, keep: Tensor) -> Tensor:
    """x normalised NCHW, keep [B,G,G] -> x * nearest-upsampled keep (fill 0 = dataset mean)."""
    return x * upsample_keep(keep, x.shape[-2:])

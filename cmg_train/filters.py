"""Image filters shared by training (synthetic anomalies) and the served graph (the anomaly
map), so both blur the same way and the ONNX export traces plain Pad + Conv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B,C,H,W] with reflect padding (a flat image stays flat;
    the kernel is 2 round(3 sigma) + 1 taps, which must be shorter than twice each side)."""
    k = int(2 * round(3 * sigma) + 1)
    # The kernel from Python numbers and the channel count as an int: constants with a known
    # shape in the traced graph (the ONNX exporter cannot export a Conv of unknown kernel shape).
    w = [math.exp(-((i - k // 2) ** 2) / (2 * sigma * sigma)) for i in range(k)]
    total = sum(w)
    g = torch.tensor([v / total for v in w], dtype=x.dtype, device=x.device)
    c = int(x.shape[1])
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1).repeat(c, 1, 1, 1), groups=c)

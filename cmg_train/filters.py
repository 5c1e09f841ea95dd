"""Image filters shared by training (synthetic anomalies) and the served graph (the anomaly
map), so both blur the same way and the ONNX export traces plain Pad + Conv."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg.config import gaussian_kernel_size


def gaussian_taps(sigma: float) -> Tensor:
    """The normalised 1-D Gaussian, 2 round(3 sigma) + 1 taps (float32)."""
    k = gaussian_kernel_size(sigma)
    w = [math.exp(-((i - k // 2) ** 2) / (2 * sigma * sigma)) for i in range(k)]
    total = sum(w)
    return torch.tensor([v / total for v in w], dtype=torch.float32)


class GaussianBlur(nn.Module):
    """Separable Gaussian blur of [B,C,H,W] with reflect padding (a flat image stays flat;
    the kernel must be shorter than twice each side).

    The taps are a buffer made once, so they move with the module: a forward that built them
    from Python numbers would copy host memory to the GPU on every call, which CUDA-graph
    capture refuses. In the traced graph they are a constant of known shape (the ONNX
    exporter cannot export a Conv of unknown kernel shape)."""

    taps: Tensor

    def __init__(self, sigma: float):
        super().__init__()
        self.register_buffer("taps", gaussian_taps(sigma), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        k = int(self.taps.numel())
        c = int(x.shape[1])
        g = self.taps.to(x.dtype)
        x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode="reflect"), g.view(1, 1, 1, k).repeat(c, 1, 1, 1), groups=c)
        return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode="reflect"), g.view(1, 1, k, 1).repeat(c, 1, 1, 1),
                        groups=c)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """One-off blur (training's synthetic anomalies, on the host)."""
    return GaussianBlur(sigma).to(x.device)(x)

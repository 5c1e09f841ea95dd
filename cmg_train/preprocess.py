"""The one frame normalisation: UINT8 NHWC frames -> normalised float NCHW.

Training, evaluation and every exported graph call it, so the served graphs start from
the UINT8 frames the clients send. After it, 0 is the dataset mean: the fill value of
CMER masking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class Preprocess(nn.Module):
    """uint8 [B,H,W,3] -> (x / 255 - mean) / std as float [B,3,H,W]."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"Preprocess: mean/std need 3 channel values, got {mean} / {std}")
        if min(std) <= 0:
            raise ValueError(f"Preprocess: std must be positive, got {std}")
        # Folded into one multiply-add per channel on the 0..255 scale.
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        self.register_buffer("scale", (1.0 / (255.0 * std_t)).view(1, 3, 1, 1))
        self.register_buffer("shift", (-mean_t / std_t).view(1, 3, 1, 1))

    @property
    def mean(self) -> list[float]:
        return [float(-sh * sd) for sh, sd in zip(self.shift.flatten(), self.std, strict=True)]

    @property
    def std(self) -> list[float]:
        return [float(1.0 / (255.0 * s)) for s in self.scale.flatten()]

    def forward(self, frames: Tensor) -> Tensor:
        # Cast before permuting: TensorRT allows UINT8 only at the network boundary.
        x = frames.to(torch.float32).permute(0, 3, 1, 2)
        return x * self.scale + self.shift

    @staticmethod
    def to_unit(frames: Tensor) -> Tensor:
        """uint8 [B,H,W,3] -> float NCHW in [0, 1]: what training-time augmentations work on."""
        return torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255.0

    def from_unit(self, x: Tensor) -> Tensor:
        """Images already as float NCHW in [0, 1] (training-time augmentations) -> normalised."""
        return x * (255.0 * self.scale) + self.shift

    @classmethod
    def fit(cls, frames: Tensor, chunk: int = 64) -> Preprocess:
        """Per-channel mean and std of the user's training frames (uint8 [N,H,W,3]), summed in
        float64 over `chunk` frames at a time: all pixels at once took 16 times the frames'
        memory (2.3 GB for 1,000 frames of 224 px)."""
        total, squares, n = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0
        for part in torch.as_tensor(frames).split(chunk):
            pix = part.reshape(-1, 3).double() / 255.0
            total, squares, n = total + pix.sum(0), squares + pix.square().sum(0), n + len(pix)
        mean = total / n
        std = ((squares - n * mean.square()).clamp_min(0) / max(n - 1, 1)).sqrt()
        return cls(mean.tolist(), std.clamp_min(1e-3).tolist())

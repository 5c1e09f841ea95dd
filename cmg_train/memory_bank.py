"""The memory bank of normal embeddings and its kNN distance.

The distance is |a|^2 + |b|^2 - 2ab: one MatMul and one TopK. The same module runs in
training, evaluation and inside the exported ONNX graph; broadcasting a [batch, M, D]
difference instead is what blows peers' memory-bank exports up to tens of GB (and past
TensorRT's 2^31-element tensor limit).
"""

from __future__ import annotations

import torch
from torch import nn


class KNNDistance(nn.Module):
    """Mean Euclidean distance to the k nearest rows of a constant bank."""

    def __init__(self, bank: torch.Tensor, k: int):
        super().__init__()
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(f"memory bank must be a non-empty [M, D] matrix, got {list(bank.shape)}")
        self.k = min(int(k), bank.shape[0])
        self.register_buffer("bank_t", bank.t().contiguous().float())
        self.register_buffer("bank_sq", (bank.float() ** 2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> [...] distances."""
        d2 = (x**2).sum(-1, keepdim=True) + self.bank_sq - 2.0 * torch.matmul(x, self.bank_t)
        nearest = torch.topk(d2, self.k, dim=-1, largest=False).values
        return torch.sqrt(torch.clamp(nearest, min=0.0)).mean(-1)

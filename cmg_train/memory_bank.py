"""Memory banks of normal features and their kNN distances.

The distance is |a|^2 + |b|^2 - 2ab: one MatMul and one TopK. The same module runs in
training, evaluation and inside the exported ONNX graph; broadcasting a [batch, M, D]
difference instead is what blows peers' memory-bank exports up to tens of GB (and past
TensorRT's 2^31-element tensor limit).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm


def greedy_coreset(features: torch.Tensor, m: int, seed: int = 0, progress: bool = False,
                   project_dim: int = 128) -> torch.Tensor:
    """Indices of at most m rows chosen by greedy k-centre selection (PatchCore's coreset).

    Distances are computed on a fixed random projection when the features are wider than
    `project_dim` (Johnson-Lindenstrauss), which keeps selection O(N * project_dim) per step.
    """
    n = features.shape[0]
    if n <= m:
        return torch.arange(n)
    gen = torch.Generator().manual_seed(seed)
    x = features.float()
    if x.shape[1] > project_dim:
        proj = torch.randn(x.shape[1], project_dim, generator=gen) / project_dim**0.5
        x = x @ proj
    start = int(torch.randint(n, (1,), generator=gen))
    chosen = [start]
    min_d = ((x - x[start]) ** 2).sum(1)
    for _ in tqdm(range(m - 1), desc="coreset", disable=not progress, leave=False):
        nxt = int(torch.argmax(min_d))
        chosen.append(nxt)
        min_d = torch.minimum(min_d, ((x - x[nxt]) ** 2).sum(1))
    return torch.tensor(chosen)


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

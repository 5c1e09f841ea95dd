"""CMLE's exported piece: the head that maps the teacher's embedding of a CMER-masked image
to the global embedding z (training in cmle/fit.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CMLEHead(nn.Module):
    """[B, E] teacher embedding -> [B, D] L2-normalised z = normalize(P e + MLP(e)).

    An orthogonal projection plus a zero-initialised residual MLP: training starts from the
    teacher's geometry (from-scratch one-class encoders scored at chance in a prototype) and
    bends it towards compactness and the captions' structure.
    """

    def __init__(self, embed_in: int, embed_dim: int):
        super().__init__()
        self.embed_in, self.embed_dim = int(embed_in), int(embed_dim)
        self.proj = nn.Linear(embed_in, embed_dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        hidden = max(embed_in, embed_dim)
        self.mlp = nn.Sequential(nn.Linear(embed_in, hidden), nn.GELU(), nn.Linear(hidden, embed_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, e: Tensor) -> Tensor:
        return F.normalize(self.proj(e) + self.mlp(e), dim=-1)


def head_state(head: CMLEHead) -> dict:
    return {"embed_in": head.embed_in, "embed_dim": head.embed_dim,
            "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}


def head_from_state(state: dict) -> CMLEHead:
    head = CMLEHead(state["embed_in"], state["embed_dim"])
    head.load_state_dict(state["state_dict"])
    return head.eval()


def cmle_loss(z_anchor: torch.Tensor, z_neighbours: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """mean_i ||z_i - sum_j W_ij z_j||^2; z_neighbours [B, k, D], weights [B, k]."""
    recon = (weights.unsqueeze(-1) * z_neighbours).sum(1)
    return ((z_anchor - recon) ** 2).sum(-1).mean()


def oneclass_loss(z: torch.Tensor, center: torch.Tensor, std_floor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(compactness, variance hinge). Deep-SVDD compactness around a fixed centre, plus a
    VICReg variance hinge keeping each dimension's spread above `std_floor`: compactness
    alone collapses every image onto the centre, and a constant embedding detects nothing."""
    compact = ((z - center) ** 2).sum(-1).mean()
    if z.shape[0] < 2:
        return compact, z.new_zeros(())
    return compact, 10.0 * F.relu(std_floor - z.std(0)).mean()

"""The local anomaly model, `unet` kind (the default `bank` kind is local/bank.py): a small U-Net from normalised pixels to per-pixel anomaly logits.

Learned from scratch on the user's normal images (local/fit.py): it segments synthetic
anomalies pasted onto them, so it has to learn what normal surfaces, edges and textures of
this product look like at the scale of a scratch. Fully convolutional and translation-
equivariant (no coordinates): a part may be anywhere. Output at half resolution: defects
of a few pixels survive one stride-2 stem, and it halves the served cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg_train.local.bank import PatchBank, bank_from_state, bank_state
from cmg_train.teacher.model import conv_bn_relu


class LocalNet(nn.Module):
    """Normalised [B,3,H,W] -> anomaly logits [B,1,H/2,W/2]; channels = widths at 1/2, 1/4, 1/8."""

    def __init__(self, channels: list[int]):
        super().__init__()
        if len(channels) != 3:
            raise ValueError(f"LocalNet: channels needs 3 widths (1/2, 1/4, 1/8), got {channels}")
        c1, c2, c3 = (int(c) for c in channels)
        self.channels = [c1, c2, c3]
        self.s1 = nn.Sequential(conv_bn_relu(3, c1, 2), conv_bn_relu(c1, c1))
        self.s2 = nn.Sequential(conv_bn_relu(c1, c2, 2), conv_bn_relu(c2, c2))
        self.s3 = nn.Sequential(conv_bn_relu(c2, c3, 2), conv_bn_relu(c3, c3, dilation=2),
                                conv_bn_relu(c3, c3, dilation=4))
        self.u2 = nn.Sequential(conv_bn_relu(c3 + c2, c2, kernel=1), conv_bn_relu(c2, c2))
        self.u1 = nn.Sequential(conv_bn_relu(c2 + c1, c1, kernel=1), conv_bn_relu(c1, c1))
        self.out = nn.Conv2d(c1, 1, 1)

    @staticmethod
    def _up(x: Tensor, skip: Tensor) -> Tensor:
        return torch.cat([F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False), skip], 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.s1(x)
        b = self.s2(a)
        c = self.s3(b)
        return self.out(self.u1(self._up(self.u2(self._up(c, b)), a)))


def anomaly_probability(net: nn.Module, x: Tensor, pool: int) -> Tensor:
    """Per-pixel anomaly probability [B,1,H/2,W/2] of a local model's logits, mean-filtered over
    pool x pool: the map whose maximum is the local score (served graph and synthetic check)."""
    p = torch.sigmoid(net(x))
    return F.avg_pool2d(p, pool, stride=1, padding=pool // 2, count_include_pad=False)


def local_state(net: LocalNet | PatchBank) -> dict:
    """The checkpoint convention for either local model (`kind` tells which)."""
    if isinstance(net, PatchBank):
        return bank_state(net)
    return {"kind": "unet", "channels": net.channels,
            "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}}


def local_from_state(state: dict) -> LocalNet | PatchBank:
    if state.get("kind") == "bank":
        return bank_from_state(state)
    net = LocalNet(state["channels"])
    net.load_state_dict(state["state_dict"])
    return net.eval()

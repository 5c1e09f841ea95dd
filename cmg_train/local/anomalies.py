"""Synthetic anomalies made from the user's own normal images (no external data).

The local model learns what is normal by learning to segment what was made abnormal.
Every family here is a generic one from the from-scratch literature, not modelled on any
defect kind of any test set:
- shapes: noise-shaped blobs (DRAEM's thresholded fractal noise, from specks to patches),
  thin strokes (CutPaste-scar, straight or gently curved), rectangles (CutPaste);
- fills: another training image's texture under a random rotation/scale (DRAEM), the
  same image shifted (CutPaste), a seamless transplant of another texture's detail onto
  this image's low frequencies (NSA-style blending), a colour/brightness change, or a
  random flat colour;
- edges hard or feathered, and a random blend with the original (beta < 0.6).
Pixels that barely changed are not labelled anomalous (an invisible defect teaches nothing).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from cmg_train.augment import dihedral
from cmg_train.filters import gaussian_blur


def _u(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.rand(*shape, generator=gen)


def noise_masks(b: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """Thresholded fractal value noise: a random subset of octaves and a random area per image."""
    field = 0.01 * torch.randn(b, 1, h, w, generator=gen)
    for s in (2, 4, 8, 16):
        on = (_u(gen, b, 1, 1, 1) < 0.6).float()
        grid = torch.randn(b, 1, s + 1, s + 1, generator=gen)
        field = field + on * F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=True) / s**0.5
    area = 0.003 + 0.08 * _u(gen, b, 1) ** 2
    flat = field.flatten(1)
    thr = flat.sort(dim=1).values.gather(1, ((1 - area) * (flat.shape[1] - 1)).long())
    return (flat > thr).float().view(b, 1, h, w)


def stroke_masks(b: int, h: int, w: int, gen: torch.Generator, segments: int = 8) -> Tensor:
    """Thin strokes: a polyline of `segments` steps with random heading drift (0 = straight)."""
    start = torch.stack([(0.15 + 0.7 * _u(gen, b)) * h, (0.15 + 0.7 * _u(gen, b)) * w], 1)
    heading = 2 * math.pi * _u(gen, b, 1)
    drift = 0.6 * _u(gen, b, 1) * torch.randn(b, segments, generator=gen)
    angles = heading + drift.cumsum(1)                                        # [b,n]
    step = (0.03 + 0.05 * _u(gen, b, 1)) * h                                  # [b,1]
    deltas = torch.stack([torch.sin(angles), torch.cos(angles)], -1) * step.unsqueeze(-1)
    pts = torch.cat([start.unsqueeze(1), start.unsqueeze(1) + deltas.cumsum(1)], 1)  # [b,n+1,2]
    p, v = pts[:, :-1].unsqueeze(-1), (pts[:, 1:] - pts[:, :-1]).unsqueeze(-1)  # [b,n,2,1]
    ys = torch.arange(h, dtype=torch.float32).repeat_interleave(w)
    xs = torch.arange(w, dtype=torch.float32).repeat(h)
    ry, rx = ys - p[:, :, 0], xs - p[:, :, 1]                                # [b,n,hw]
    vy, vx = v[:, :, 0], v[:, :, 1]
    t = ((ry * vy + rx * vx) / (vy * vy + vx * vx).clamp_min(1e-6)).clamp(0, 1)
    dist2 = ((ry - t * vy) ** 2 + (rx - t * vx) ** 2).amin(1)                # [b,hw]
    width = 0.5 + 1.5 * _u(gen, b, 1)
    return (dist2 < width**2).float().view(b, 1, h, w)


def rect_masks(b: int, h: int, w: int, gen: torch.Generator) -> Tensor:
    """Rotated rectangles, 3 px to 30% of the crop long (CutPaste)."""
    cy, cx = ((0.1 + 0.8 * _u(gen, b, 1, 1)) * h), ((0.1 + 0.8 * _u(gen, b, 1, 1)) * w)
    length = 3 + 0.3 * h * _u(gen, b, 1, 1)
    width = length * (0.3 + 0.7 * _u(gen, b, 1, 1))
    a = math.pi * _u(gen, b, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    u = (xx - cx) * torch.cos(a) + (yy - cy) * torch.sin(a)
    v = -(xx - cx) * torch.sin(a) + (yy - cy) * torch.cos(a)
    return ((u.abs() < length / 2) & (v.abs() < width / 2)).float().unsqueeze(1)


def random_affine(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image rotated by any angle, scaled by 0.5-2x and shifted (reflect padding)."""
    b = x.shape[0]
    ang = 2 * math.pi * _u(gen, b)
    scale = torch.exp((2 * _u(gen, b) - 1) * math.log(2.0))
    shift = 2 * _u(gen, b, 2) - 1
    c, s = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([c, -s, shift[:, 0]], 1), torch.stack([s, c, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)


def colour_jitter(x: Tensor, gen: torch.Generator, strength: float = 1.0) -> Tensor:
    """Per-channel gain and a shared offset, images in [0, 1]."""
    b = x.shape[0]
    gain = 1 + strength * 0.8 * (_u(gen, b, 3, 1, 1) - 0.5)
    bias = strength * 0.4 * (_u(gen, b, 1, 1, 1) - 0.5)
    return (x * gain + bias).clamp(0, 1)


def _pick(choice: Tensor, options: list[Tensor]) -> Tensor:
    out = options[-1]
    for i in range(len(options) - 2, -1, -1):
        out = torch.where((choice == i).view(-1, 1, 1, 1), options[i], out)
    return out


def random_shapes(n: int, size: int, gen: torch.Generator, chunk: int = 256) -> Tensor:
    """[n,1,size,size] anomaly shapes, a third each of noise blobs, strokes and rectangles.

    Drawn once per training run and reused under random rotations and flips: drawing them
    anew at every step cost more CPU than the model's own step.
    """
    out = []
    for i in range(0, n, chunk):
        b = min(chunk, n - i)
        shape = torch.randint(0, 3, (b,), generator=gen)
        out.append(_pick(shape, [noise_masks(b, size, size, gen), stroke_masks(b, size, size, gen),
                                 rect_masks(b, size, size, gen)]))
    return torch.cat(out) > 0.5


def draw_shapes(bank: Tensor, b: int, gen: torch.Generator) -> Tensor:
    """b shapes from a bank, each under a random rotation by 90 degrees and flip."""
    (m,) = dihedral(gen, bank[torch.randint(len(bank), (b,), generator=gen)].float())
    return m


def synthesize(x: Tensor, shapes: Tensor, gen: torch.Generator, prob: float = 0.5,
               allowed: Tensor | None = None, min_change: float = 0.06) -> tuple[Tensor, Tensor]:
    """x [B,3,H,W] normal images in [0,1], shapes [B,1,H,W] -> (images with anomalies, masks).

    A `prob` share of the images gets its shape filled; `allowed` [B,1,H,W] (e.g. a CMER
    keep-mask) restricts where anomalies may appear. Masks are {0,1} floats [B,1,H,W].
    """
    b, _, h, w = x.shape
    has = (_u(gen, b, 1, 1, 1) < prob).float()
    m = shapes if allowed is None else shapes * allowed
    soft = torch.where(_u(gen, b, 1, 1, 1) < 0.5, gaussian_blur(m, 0.7).clamp(0, 1), m)
    other = random_affine(x[torch.roll(torch.arange(b), 1)], gen)
    dy, dx = (int(v) for v in torch.randint(h // 8, h - h // 8, (2,), generator=gen))
    shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    src = torch.where(_u(gen, b, 1, 1, 1) < 0.5, other, shifted)
    paste = colour_jitter(src, gen)
    detail = 1 + 2 * _u(gen, b, 1, 1, 1)
    seamless = (gaussian_blur(x, 2.0) + detail * (src - gaussian_blur(src, 2.0))).clamp(0, 1)
    gain = 1 + 1.2 * (_u(gen, b, 3, 1, 1) - 0.6)
    recolour = (x * gain + 0.3 * (_u(gen, b, 3, 1, 1) - 0.5)).clamp(0, 1)
    solid = (_u(gen, b, 3, 1, 1).expand_as(x) * (0.85 + 0.3 * _u(gen, b, 1, h, w))).clamp(0, 1)  # flat colour, grainy
    fill = _pick(torch.randint(0, 4, (b,), generator=gen), [paste, seamless, recolour, solid])
    beta = 0.6 * _u(gen, b, 1, 1, 1)
    fill = (1 - beta) * fill + beta * x
    out = x * (1 - soft * has) + fill * soft * has
    changed = ((out - x).abs().amax(1, keepdim=True) > min_change).float()
    return out, m * has * changed

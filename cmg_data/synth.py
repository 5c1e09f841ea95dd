"""Synthetic factory data: one product part per image on a conveyor, plus irrelevant clutter.

Why synthetic: the method needs (a) captions that describe each normal image, (b) clutter
that the CMER mask must remove, with pixel ground truth to measure how well it does, and
(c) small on-part defects with masks. Real datasets have at most one of the three.

Rendering is numpy + PIL only (no torch) and deterministic by seed. Each scene draws its
attributes, background, clutter and defect from four independent generators, so the same
seed with and without a defect (or without clutter) gives the same scene except for that
one difference: a defect's effect is exactly its mask, and `--no-clutter` is a clean twin.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw
from tqdm import tqdm

from cmg.argtypes import MAX_SEED, seed_int
from cmg.dataset import SYNTH_INCOMPLETE
from cmg.errors import CMGError
from cmg.files import write_atomic
from cmg.locks import writing

CATEGORIES: tuple[str, ...] = ("hex_nut", "washer", "screw", "gear", "bottle_cap")
DEFECTS: tuple[str, ...] = ("scratch", "hole", "stain", "deformation")
SEMANTIC = "wrong_part"
ANOMALIES: tuple[str, ...] = DEFECTS + (SEMANTIC,)
KINDS: tuple[str, ...] = ("good",) + ANOMALIES

CATEGORY_NAMES: dict[str, str] = {
    "hex_nut": "hex nut",
    "washer": "tab washer",
    "screw": "screw",
    "gear": "gear",
    "bottle_cap": "bottle cap",
}

# Material name -> RGB. Metal parts and plastic caps draw from different palettes.
_METALS: dict[str, tuple[int, int, int]] = {
    "steel": (150, 155, 162),
    "brass": (184, 152, 74),
    "copper": (176, 104, 60),
    "black oxide": (62, 62, 68),
    "zinc-plated": (196, 198, 186),
    "blue anodized": (62, 98, 168),
    "white nylon": (222, 220, 208),
    "gold anodized": (205, 170, 60),
}
_PLASTICS: dict[str, tuple[int, int, int]] = {
    "red plastic": (176, 46, 42),
    "blue plastic": (48, 84, 170),
    "white plastic": (226, 226, 220),
    "green plastic": (52, 132, 70),
    "yellow plastic": (214, 182, 46),
    "black plastic": (44, 44, 48),
    "aluminium": (176, 178, 182),
    "orange plastic": (220, 120, 40),
}
MATERIALS: dict[str, dict[str, tuple[int, int, int]]] = {
    c: (_PLASTICS if c == "bottle_cap" else _METALS) for c in CATEGORIES
}
SIZES: tuple[tuple[str, float], ...] = (("small", 0.13), ("medium", 0.17), ("large", 0.21))
ROTATIONS: tuple[int, ...] = (0, 30, 60, 90, 120, 150)
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)
BACKGROUNDS: tuple[str, ...] = (
    "green conveyor belt", "black rubber belt", "steel mesh belt",
    "grey roller conveyor", "blue modular belt",
)
LIGHTING: dict[str, tuple[float, float, float]] = {
    "bright": (1.12, 1.12, 1.12),
    "dim": (0.78, 0.78, 0.8),
    "warm": (1.08, 0.98, 0.84),
    "cool": (0.9, 0.98, 1.1),
}
# Captions describe the part and its attributes; never clutter or defects.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {material} {cat} at the {pos} of a {bg}, rotated {rot} degrees, {light} light",
    "{size} {cat} made of {material} on a {bg}, {pos} of the frame, turned {rot} degrees under {light} light",
    "inspection photo of one {material} {cat}, {size}, lying at the {pos} of the {bg}, rotation {rot} degrees, {light} lighting",
    "a photo of a {size} {material} {cat} on a {bg} in {light} light, placed {pos}, angle {rot} degrees",
    "{material} {cat} ({size}) on the {bg}, position {pos}, rotated by {rot} degrees, {light} illumination",
)

_SS = 4  # supersampling factor for PIL drawing (clean anti-aliased shapes)


@dataclass(frozen=True)
class Preset:
    """Sizes of one synthetic dataset."""

    image_size: int
    n_train: int
    n_test_good: int
    n_test_per_anomaly: int


PRESETS: dict[str, Preset] = {
    "tiny": Preset(image_size=64, n_train=300, n_test_good=60, n_test_per_anomaly=15),
    "small": Preset(image_size=128, n_train=600, n_test_good=100, n_test_per_anomaly=20),
}


@dataclass
class Scene:
    """One rendered image with its ground truth."""

    image: np.ndarray         # uint8 [S, S, 3]
    part_mask: np.ndarray     # bool [S, S]: the product part's pixels
    clutter_mask: np.ndarray  # bool [S, S]: irrelevant clutter pixels (objects, dust, specks, glare)
    defect_mask: np.ndarray   # bool [S, S]: ground-truth anomaly pixels (all False for normal)
    attrs: dict               # category, colour, size, rotation, position, background, ...
    caption: str              # describes the part and its attributes; never clutter or defects
    defect: str               # "good" | one of DEFECTS | SEMANTIC


# ----------------------------------------------------------------------------- helpers


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Square binary dilation by `r` pixels (separable max; no scipy needed)."""
    if r <= 0:
        return mask.copy()
    h, w = mask.shape
    p = np.pad(mask, ((r, r), (0, 0)))
    rows = np.zeros_like(mask)
    for k in range(2 * r + 1):
        rows |= p[k:k + h]
    p = np.pad(rows, ((0, 0), (r, r)))
    out = np.zeros_like(mask)
    for k in range(2 * r + 1):
        out |= p[:, k:k + w]
    return out


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    return ~_dilate(~mask, r)


def _reduce(img: Image.Image) -> np.ndarray:
    """Box-downsample a supersampled layer to float32 in [0, 1]."""
    return np.asarray(img.reduce(_SS), dtype=np.float32) / 255.0


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _shade(rgb: Sequence[float], f: float, add: float = 0.0) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, round(c * f + add)))) for c in rgb)  # type: ignore[return-value]


def _ellipse_poly(cx: float, cy: float, a: float, b: float, angle: float, n: int = 16) -> list[tuple[float, float]]:
    """Rotated ellipse as a polygon (PIL ellipses are axis-aligned)."""
    ca, sa = math.cos(angle), math.sin(angle)
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x, y = a * math.cos(t), b * math.sin(t)
        pts.append((cx + x * ca - y * sa, cy + x * sa + y * ca))
    return pts


def _rect_poly(cx: float, cy: float, length: float, width: float, angle: float) -> list[tuple[float, float]]:
    """Rotated rectangle centred on (cx, cy), `length` along `angle`."""
    ca, sa = math.cos(angle), math.sin(angle)
    half = ((-length / 2, -width / 2), (length / 2, -width / 2), (length / 2, width / 2), (-length / 2, width / 2))
    return [(cx + dx * ca - dy * sa, cy + dx * sa + dy * ca) for dx, dy in half]


def _circle(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, **kw) -> None:
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)


# ----------------------------------------------------------------------------- attributes


def _sample_attrs(rng: np.random.Generator, size: int, category: str) -> dict:
    materials = MATERIALS[category]
    material = list(materials)[int(rng.integers(len(materials)))]
    size_name, scale = SIZES[int(rng.integers(len(SIZES)))]
    rotation = ROTATIONS[int(rng.integers(len(ROTATIONS)))]
    cell = int(rng.integers(9))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    lighting = list(LIGHTING)[int(rng.integers(len(LIGHTING)))]
    template = int(rng.integers(len(CAPTION_TEMPLATES)))
    radius = scale * size * float(rng.uniform(0.94, 1.06))
    row, col = divmod(cell, 3)
    jitter = rng.uniform(-size / 18, size / 18, size=2)
    lo, hi = radius * 1.35 + 1, size - radius * 1.35 - 1  # keep the part (and a tab) in frame
    cx = float(np.clip(size * (col + 0.5) / 3 + jitter[0], lo, hi))
    cy = float(np.clip(size * (row + 0.5) / 3 + jitter[1], lo, hi))
    return {
        "category": category,
        "colour": material,
        "size": size_name,
        "radius": round(radius, 3),
        "rotation": rotation,
        "angle": round(rotation + float(rng.uniform(-4, 4)), 3),
        "position": POSITIONS[cell],
        "cell": [row, col],
        "center": [round(cx, 3), round(cy, 3)],
        "background": background,
        "lighting": lighting,
        "template": template,
    }


def caption_for(attrs: dict, category: str | None = None) -> str:
    """The caption of a scene's attributes (`category` overrides the drawn one)."""
    cat = CATEGORY_NAMES[category or attrs["category"]]
    return CAPTION_TEMPLATES[attrs["template"]].format(
        size=attrs["size"], material=attrs["colour"], cat=cat, pos=attrs["position"],
        bg=attrs["background"], rot=attrs["rotation"], light=attrs["lighting"],
    )


# ----------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """Conveyor-like texture at the final resolution, float32 [S, S, 3] in 0..255."""
    u = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ph = rng.uniform(0, 100, size=2).astype(np.float32)
    jitter = rng.uniform(-10, 10, size=3)
    grain = rng.standard_normal((size, size), dtype=np.float32)
    if kind == "green conveyor belt":
        base = np.array([46, 104, 64])
        tex = 7 * np.sin(2 * np.pi * (yy + ph[0]) / (3 * u)) + 4 * grain
    elif kind == "black rubber belt":
        base = np.array([40, 40, 43])
        smooth = (grain + np.roll(grain, 1, 0) + np.roll(grain, 1, 1)) / 3
        tex = 8 * smooth + 4 * np.sin((xx + yy + ph[0]) / (1.5 * u))
    elif kind == "steel mesh belt":
        base = np.array([128, 130, 134])
        lines = (((xx + ph[0]) % (6 * u)) < u) | (((yy + ph[1]) % (6 * u)) < u)
        tex = -48 * lines.astype(np.float32) + 5 * grain
    elif kind == "grey roller conveyor":
        base = np.array([120, 120, 117])
        phase = ((yy + ph[0]) % (10 * u)) / (10 * u)
        tex = base.mean() * (0.45 * np.sin(np.pi * phase) - 0.3) + 4 * grain
    elif kind == "blue modular belt":
        base = np.array([58, 86, 136])
        seams = ((yy + ph[0]) % (8 * u)) < u
        holes = (((xx + ph[1]) % (8 * u)) < u) & (((yy + ph[0] + 4 * u) % (8 * u)) < u)
        tex = -28 * seams.astype(np.float32) - 35 * holes.astype(np.float32) + 4 * grain
    else:  # pragma: no cover - BACKGROUNDS is closed
        raise ValueError(f"unknown background {kind!r}")
    g = rng.uniform(-1, 1, size=2)
    gradient = 10 * (g[0] * (xx / size - 0.5) + g[1] * (yy / size - 0.5))
    return (base + jitter)[None, None, :].astype(np.float32) + (tex + gradient)[..., None]


# ----------------------------------------------------------------------------- the part


def _draw_part(rgb: ImageDraw.ImageDraw, alpha: ImageDraw.ImageDraw, category: str,
               cx: float, cy: float, r: float, theta: float, colour: tuple[int, int, int]) -> None:
    """Draw one part at supersampled coordinates (premultiplied: holes are black and alpha 0)."""
    dark, light = _shade(colour, 0.62), _shade(colour, 1.18, 18)
    lw = max(1, round(r * 0.07))

    def both(poly=None, circle=None, fill=255) -> None:
        if poly is not None:
            rgb.polygon(poly, fill=colour if fill else (0, 0, 0))
            alpha.polygon(poly, fill=fill)
        else:
            _circle(rgb, *circle, fill=colour if fill else (0, 0, 0))
            _circle(alpha, *circle, fill=fill)

    if category == "hex_nut":
        both(poly=[(cx + r * math.cos(theta + k * math.pi / 3), cy + r * math.sin(theta + k * math.pi / 3))
                   for k in range(6)])
        _circle(rgb, cx, cy, r * 0.8, outline=light, width=lw)
        _circle(rgb, cx, cy, r * 0.52, fill=dark)
        both(circle=(cx, cy, r * 0.4), fill=0)
    elif category == "washer":
        tab = (cx + 0.75 * r * math.cos(theta), cy + 0.75 * r * math.sin(theta))
        both(poly=_rect_poly(*tab, 1.1 * r, 0.42 * r, theta))
        both(circle=(cx, cy, r))
        _circle(rgb, cx, cy, r * 0.74, outline=light, width=lw)
        both(circle=(cx, cy, r * 0.46), fill=0)
    elif category == "screw":
        ca, sa = math.cos(theta), math.sin(theta)

        def at(t: float, s: float = 0.0) -> tuple[float, float]:
            return (cx + t * ca - s * sa, cy + t * sa + s * ca)

        hw = 0.17 * r
        both(poly=[at(-0.6 * r, -hw), at(0.82 * r, -hw), at(1.12 * r, 0), at(0.82 * r, hw), at(-0.6 * r, hw)])
        for k in range(8):  # thread crests
            t = -0.35 * r + k * 0.16 * r
            rgb.line([at(t, -hw), at(t + 0.08 * r, hw)], fill=dark, width=lw)
        head = at(-0.72 * r)
        both(circle=(head[0], head[1], 0.4 * r))
        _circle(rgb, head[0], head[1], 0.4 * r, outline=light, width=lw)
        slot = 0.26 * r
        rgb.line([(head[0] - slot * sa, head[1] + slot * ca), (head[0] + slot * sa, head[1] - slot * ca)],
                 fill=dark, width=max(1, round(r * 0.1)))
    elif category == "gear":
        n, step = 10, 2 * math.pi / 10
        pts = []
        for k in range(n):
            a0 = theta + k * step
            for off, rad in ((-0.3, 0.76), (-0.17, 1.0), (0.17, 1.0), (0.3, 0.76)):
                pts.append((cx + rad * r * math.cos(a0 + off * step), cy + rad * r * math.sin(a0 + off * step)))
        both(poly=pts)
        _circle(rgb, cx, cy, r * 0.42, outline=light, width=lw)
        key = (cx + 0.24 * r * math.cos(theta), cy + 0.24 * r * math.sin(theta))
        both(circle=(cx, cy, r * 0.22), fill=0)
        both(poly=_rect_poly(*key, 0.14 * r, 0.12 * r, theta), fill=0)
    elif category == "bottle_cap":
        n = 28
        both(poly=[(cx + r * (1.0 if k % 2 else 0.93) * math.cos(theta + math.pi * k / n),
                    cy + r * (1.0 if k % 2 else 0.93) * math.sin(theta + math.pi * k / n)) for k in range(2 * n)])
        _circle(rgb, cx, cy, r * 0.8, fill=_shade(colour, 1.08, 8))
        _circle(rgb, cx, cy, r * 0.8, outline=dark, width=lw)
        rgb.line([(cx + 0.15 * r * math.cos(theta), cy + 0.15 * r * math.sin(theta)),
                  (cx + 0.62 * r * math.cos(theta), cy + 0.62 * r * math.sin(theta))],
                 fill=dark, width=max(1, round(r * 0.14)))
    else:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


def _render_part(size: int, category: str, attrs: dict, colour: tuple[int, int, int]):
    s4 = size * _SS
    layer = Image.new("RGB", (s4, s4), (0, 0, 0))
    alpha = Image.new("L", (s4, s4), 0)
    cx, cy = (c * _SS for c in attrs["center"])
    _draw_part(ImageDraw.Draw(layer), ImageDraw.Draw(alpha), category, cx, cy,
               attrs["radius"] * _SS, math.radians(attrs["angle"]), colour)
    # Premultiplied: detail strokes that overshoot the outline must not add colour outside it.
    layer = Image.composite(layer, Image.new("RGB", layer.size, (0, 0, 0)), alpha)
    return layer, alpha


# ----------------------------------------------------------------------------- clutter


def _free_spot(rng: np.random.Generator, blocked: np.ndarray, rad: float) -> tuple[float, float] | None:
    """A centre whose box of half-size `rad` avoids `blocked`; None after a few tries."""
    size = blocked.shape[0]
    for _ in range(12):
        x, y = rng.uniform(rad, size - rad, size=2)
        x0, y0 = int(max(0, x - rad)), int(max(0, y - rad))
        x1, y1 = int(min(size, x + rad + 1)), int(min(size, y + rad + 1))
        if not blocked[y0:y1, x0:x1].any():
            return float(x), float(y)
    return None


_OBJECT_COLOURS = ((120, 112, 100), (90, 80, 66), (200, 60, 50), (230, 225, 210), (30, 30, 32),
                   (60, 120, 200), (210, 190, 60), (150, 150, 150))


def _clutter(rng: np.random.Generator, size: int, blocked: np.ndarray):
    """Objects, specks and streaks (a supersampled layer), dust and glare (final resolution).

    Returns (premultiplied rgb, alpha, dust rgb, dust alpha, glare map, counts).
    Some clutter deliberately looks like defects: dark specks (holes) and thin streaks
    (scratches), so that only *where* a mark is tells it apart.
    """
    u = size / 64.0
    s4 = size * _SS
    layer = Image.new("RGB", (s4, s4), (0, 0, 0))
    alpha = Image.new("L", (s4, s4), 0)
    d_rgb, d_a = ImageDraw.Draw(layer), ImageDraw.Draw(alpha)
    heavy = rng.random() < 0.3
    counts = {
        "objects": int(rng.integers(0, 5 if heavy else 3)),
        "specks": int(rng.integers(0, 5 if heavy else 3)),
        "streaks": int(rng.integers(0, 3 if heavy else 2)),
        "dust": int(rng.integers(20, 80) if heavy else rng.integers(0, 25)),
        "glare": int(rng.random() < 0.35),
    }
    placed = {k: 0 for k in counts}

    def put(poly=None, circle=None, fill=(0, 0, 0), width=0, line=None) -> None:
        if poly is not None:
            d_rgb.polygon([(x * _SS, y * _SS) for x, y in poly], fill=fill)
            d_a.polygon([(x * _SS, y * _SS) for x, y in poly], fill=255)
        elif circle is not None:
            x, y, r = circle
            if width:
                _circle(d_rgb, x * _SS, y * _SS, r * _SS, outline=fill, width=width)
                _circle(d_a, x * _SS, y * _SS, r * _SS, outline=255, width=width)
            else:
                _circle(d_rgb, x * _SS, y * _SS, r * _SS, fill=fill)
                _circle(d_a, x * _SS, y * _SS, r * _SS, fill=255)
        else:
            pts = [(x * _SS, y * _SS) for x, y in line]
            d_rgb.line(pts, fill=fill, width=width)
            d_a.line(pts, fill=255, width=width)

    for _ in range(counts["objects"]):
        kind = int(rng.integers(5))
        rad = float(rng.uniform(1.5, 3.2)) * u
        spot = _free_spot(rng, blocked, rad * (2.2 if kind == 3 else 1.0) + 1)
        colour = _OBJECT_COLOURS[int(rng.integers(len(_OBJECT_COLOURS)))]
        ang = float(rng.uniform(0, math.pi))
        if spot is None:
            continue
        x, y = spot
        if kind == 0:  # pebble
            k = 7
            radii = rng.uniform(0.6, 1.0, size=k) * rad
            put(poly=[(x + radii[i] * math.cos(ang + 2 * math.pi * i / k),
                       y + radii[i] * math.sin(ang + 2 * math.pi * i / k)) for i in range(k)], fill=colour)
        elif kind == 1:  # o-ring
            put(circle=(x, y, rad), fill=colour, width=max(1, round(0.8 * u * _SS)))
        elif kind == 2:  # paper chip
            put(poly=_rect_poly(x, y, 1.6 * rad, 0.9 * rad, ang), fill=_shade((232, 228, 214), float(rng.uniform(0.85, 1.05))))
        elif kind == 3:  # cable tie
            put(poly=_rect_poly(x, y, 4.2 * rad, 0.5 * u + 0.5, ang), fill=colour)
        else:  # plastic pellet
            put(circle=(x, y, 0.55 * rad), fill=colour)
        placed["objects"] += 1
    for _ in range(counts["specks"]):  # dark, hole-like
        rad = float(rng.uniform(0.6, 1.4)) * u
        spot = _free_spot(rng, blocked, rad + 1)
        if spot is not None:
            put(circle=(*spot, rad), fill=_shade((24, 22, 20), float(rng.uniform(0.7, 1.5))))
            placed["specks"] += 1
    for _ in range(counts["streaks"]):  # thin, scratch-like
        length = float(rng.uniform(3, 9)) * u
        ang = float(rng.uniform(0, math.pi))
        spot = _free_spot(rng, blocked, length / 2 + 1)
        if spot is not None:
            x, y = spot
            dx, dy = length / 2 * math.cos(ang), length / 2 * math.sin(ang)
            bend = float(rng.uniform(-0.6, 0.6)) * u
            mid = (x - bend * math.sin(ang), y + bend * math.cos(ang))
            shade = (22, 22, 22) if rng.random() < 0.5 else (215, 212, 205)
            put(line=[(x - dx, y - dy), mid, (x + dx, y + dy)], fill=shade,
                width=max(1, round(float(rng.uniform(0.8, 1.2)) * u * _SS)))
            placed["streaks"] += 1
    prgb, pa = _reduce(layer) * 255.0, _reduce(alpha)

    dust_a = np.zeros((size, size), np.float32)
    n = counts["dust"]
    if n:
        ys, xs = rng.integers(0, size, size=n), rng.integers(0, size, size=n)
        strength = rng.uniform(0.3, 0.65, size=n).astype(np.float32)
        ok = ~blocked[ys, xs]
        dust_a[ys[ok], xs[ok]] = strength[ok]
        placed["dust"] = int(ok.sum())
    dust_rgb = np.array([198, 192, 180], np.float32)

    glare = np.zeros((size, size), np.float32)
    if counts["glare"]:
        sx, sy = rng.uniform(2, 5.5, size=2) * u
        spot = _free_spot(rng, blocked, 1.5 * max(sx, sy))
        if spot is not None:
            yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
            amp = float(rng.uniform(50, 100))
            glare = amp * np.exp(-(((xx - spot[0]) / sx) ** 2 + ((yy - spot[1]) / sy) ** 2))
            glare[blocked] = 0.0
            placed["glare"] = 1
    return prgb, pa, dust_rgb, dust_a, glare, placed


# ----------------------------------------------------------------------------- defects


def _defect_alpha(rng: np.random.Generator, size: int, defect: str, part: np.ndarray,
                  attrs: dict, colour: tuple[int, int, int]):
    """Coverage [S, S] in 0..1 of a scratch, hole or stain on the part, and its colour and strength."""
    u = size / 64.0
    r = attrs["radius"]
    s4 = size * _SS
    img = Image.new("L", (s4, s4), 0)
    d = ImageDraw.Draw(img)
    inner = _erode(part, 1)
    ys, xs = np.nonzero(inner if inner.sum() >= 4 else part)
    i = int(rng.integers(len(ys)))
    x, y = (xs[i] + float(rng.uniform(0.2, 0.8))) * _SS, (ys[i] + float(rng.uniform(0.2, 0.8))) * _SS
    lum = _luma(colour)
    if defect == "scratch":
        length = float(rng.uniform(0.55, 0.95)) * r * _SS
        ang = float(rng.uniform(0, math.pi))
        dx, dy = length / 2 * math.cos(ang), length / 2 * math.sin(ang)
        bend = float(rng.uniform(-0.12, 0.12)) * length
        pts = [(x - dx, y - dy), (x - bend * math.sin(ang), y + bend * math.cos(ang)), (x + dx, y + dy)]
        d.line(pts, fill=255, width=max(2, round(float(rng.uniform(0.9, 1.3)) * u * _SS)))
        bright = lum < 80 or (lum < 170 and rng.random() < 0.5)
        tint = (236, 234, 228) if bright else _shade(colour, 0.35)
        strength = float(rng.uniform(0.75, 0.9))
    elif defect == "hole":
        rad = float(rng.uniform(1.1, 1.9)) * u * _SS
        _circle(d, x, y, rad, fill=255)
        tint = (18, 16, 14)
        strength = 0.95
    elif defect == "stain":
        for _ in range(int(rng.integers(3, 6))):
            ox, oy = rng.normal(0, 1.2 * u * _SS, size=2)
            a, b = rng.uniform(0.8, 1.8, size=2) * u * _SS
            d.polygon(_ellipse_poly(x + ox, y + oy, a, b, float(rng.uniform(0, math.pi)), n=12), fill=255)
        tint = (96, 62, 34) if lum > 110 else (176, 150, 110)
        strength = float(rng.uniform(0.6, 0.8))
    else:  # pragma: no cover - callers pass DEFECTS only
        raise ValueError(defect)
    return _reduce(img), np.array(tint, np.float32), strength


def _add_bulge(rng: np.random.Generator, layer: Image.Image, alpha: Image.Image, attrs: dict,
               colour: tuple[int, int, int]) -> None:
    """Deformation: extra bent material pushed out of the part's outline at a random edge point."""
    r = attrs["radius"] * _SS
    cx, cy = (c * _SS for c in attrs["center"])
    a = np.asarray(alpha)
    s4 = a.shape[0]
    for _ in range(16):
        phi = float(rng.uniform(0, 2 * math.pi))
        ca, sa = math.cos(phi), math.sin(phi)
        t = 1.45 * r
        while t > 0:  # march inwards from outside until the part is hit
            px, py = int(cx + t * ca), int(cy + t * sa)
            if 0 <= px < s4 and 0 <= py < s4 and a[py, px] > 127:
                break
            t -= 1.0
        if t > 0.3 * r:
            break
    ex, ey = cx + t * ca, cy + t * sa
    out = float(rng.uniform(0.28, 0.4)) * r
    wide = float(rng.uniform(0.2, 0.3)) * r
    poly = _ellipse_poly(ex + 0.35 * out * ca, ey + 0.35 * out * sa, out, wide, phi, n=16)
    bump, bump_a = Image.new("RGB", layer.size, (0, 0, 0)), Image.new("L", layer.size, 0)
    ImageDraw.Draw(bump).polygon(poly, fill=_shade(colour, float(rng.uniform(0.85, 0.97))))
    ImageDraw.Draw(bump_a).polygon(poly, fill=255)
    # Only new material outside the part: the part itself stays as it was.
    layer.paste(Image.composite(layer, bump, alpha))
    alpha.paste(ImageChops.lighter(alpha, bump_a))


# ----------------------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, size: int, category: str, clutter: bool = True,
                 defect: str = "good") -> Scene:
    """Render one scene; the same generator state gives the same scene up to `defect`/`clutter`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    if defect not in KINDS:
        raise ValueError(f"unknown defect {defect!r}; known: {', '.join(KINDS)}")
    if size < 32 or size % 4:
        raise ValueError(f"image size {size} must be a multiple of 4 and at least 32")
    r_attr, r_bg, r_clut, r_def = (np.random.default_rng(int(s)) for s in rng.integers(0, 2**62, size=4))
    attrs = _sample_attrs(r_attr, size, category)
    caption = caption_for(attrs)
    colour = MATERIALS[category][attrs["colour"]]

    # The nominal part decides where clutter may go, so every variant shares its clutter.
    layer, alpha = _render_part(size, category, attrs, colour)
    nominal = _reduce(alpha) >= 0.5
    if defect == SEMANTIC:
        others = [c for c in CATEGORIES if c != category]
        drawn = others[int(r_def.integers(len(others)))]
        palette = MATERIALS[drawn]
        material = attrs["colour"] if attrs["colour"] in palette else list(palette)[int(r_def.integers(len(palette)))]
        attrs = {**attrs, "category": drawn, "expected_category": category, "colour": material}
        colour = palette[material]
        layer, alpha = _render_part(size, drawn, attrs, colour)
    elif defect == "deformation":
        _add_bulge(r_def, layer, alpha, attrs, colour)

    img = _background(r_bg, size, attrs["background"])
    clutter_mask = np.zeros((size, size), bool)
    glare = None
    if clutter:
        blocked = _dilate(nominal, int(math.ceil(0.45 * attrs["radius"])) + 1)
        c_rgb, c_a, dust_rgb, dust_a, glare, counts = _clutter(r_clut, size, blocked)
        img = img * (1 - c_a[..., None]) + c_rgb
        img = img * (1 - dust_a[..., None]) + dust_rgb * dust_a[..., None]
        clutter_mask = (c_a >= 0.3) | (dust_a >= 0.3) | (glare > 20)
        attrs["clutter"] = counts

    p_rgb, p_a = _reduce(layer) * 255.0, _reduce(alpha)
    part_mask = p_a >= 0.5
    shift = max(1, size // 64)
    shadow = np.zeros_like(p_a)
    shadow[shift:, shift:] = p_a[:-shift, :-shift]
    img = img * (1 - 0.4 * shadow[..., None])
    # Light from the top left: a gentle gradient across the part gives it volume.
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = attrs["center"]
    lit = np.clip(1 + 0.16 * (0.6 * (cx - xx) + 0.8 * (cy - yy)) / attrs["radius"], 0.78, 1.22)
    img = img * (1 - p_a[..., None]) + p_rgb * lit[..., None]

    defect_mask = np.zeros((size, size), bool)
    if defect in ("scratch", "hole", "stain"):
        for _ in range(8):
            cov, tint, strength = _defect_alpha(r_def, size, defect, part_mask, attrs, colour)
            cov = cov * p_a
            defect_mask = (cov >= 0.4) & part_mask
            if defect_mask.sum() >= 2:
                break
        k = (cov * strength)[..., None]
        img = img * (1 - k) + tint * lit[..., None] * k
    elif defect == "deformation":
        defect_mask = part_mask & ~nominal
    elif defect == SEMANTIC:
        defect_mask = part_mask.copy()
    if glare is not None:
        img = img + glare[..., None] * (1 - p_a[..., None])
    img = img * np.array(LIGHTING[attrs["lighting"]], np.float32)
    img = img + 2.5 * r_bg.standard_normal(img.shape, dtype=np.float32)
    clutter_mask &= ~part_mask
    if defect != "good":
        ys, xs = np.nonzero(defect_mask)
        if len(ys):
            attrs["defect_box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    return Scene(
        image=np.clip(np.rint(img), 0, 255).astype(np.uint8),
        part_mask=part_mask,
        clutter_mask=clutter_mask,
        defect_mask=defect_mask,
        attrs=attrs,
        caption=caption,
        defect=defect,
    )


def random_scenes(n: int, size: int, seed: int, categories: Sequence[str] = CATEGORIES,
                  clutter: bool = True, defect_rate: float = 0.0) -> Iterator[Scene]:
    """Varied scenes over all categories, in memory (the CLIP teacher is trained on these).

    Scene i depends only on (seed, i), so any prefix or slice is reproducible.
    """
    categories = tuple(categories)
    for c in categories:
        if c not in CATEGORIES:
            raise ValueError(f"unknown category {c!r}; known: {', '.join(CATEGORIES)}")
    if not categories:
        raise ValueError("random_scenes: no categories given")
    for i in range(n):
        rng = np.random.default_rng([seed, 7, i])
        category = categories[int(rng.integers(len(categories)))]
        defect = DEFECTS[int(rng.integers(len(DEFECTS)))] if rng.random() < defect_rate else "good"
        yield render_scene(rng, size, category, clutter=clutter, defect=defect)


def stream_frames(preset: str = "tiny", seed: int = 0, n: int | None = None, category: str = "hex_nut",
                  anomaly_rate: float = 0.1, clutter: bool = True, start: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
    """A factory line's camera: (frame, info) pairs, mostly good parts, some anomalies.

    Used by the stream client's `synth:` source; `n=None` streams forever. Frame i depends
    only on (seed, i), so `start` skips ahead without rendering the frames before it
    (a resumed stream does not redraw what it already has).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    size = PRESETS[preset].image_size
    i = max(0, int(start))
    while n is None or i < n:
        rng = np.random.default_rng([seed, 11, i])
        kind = ANOMALIES[int(rng.integers(len(ANOMALIES)))] if rng.random() < anomaly_rate else "good"
        scene = render_scene(rng, size, category, clutter=clutter, defect=kind)
        yield scene.image, {"defect": kind, "label": int(kind != "good"), "category": category}
        i += 1


# ----------------------------------------------------------------------------- folders


def _png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    Image.fromarray(array).save(path, format="PNG")


# synth.json marks a whole folder (written last); INCOMPLETE one this generator is writing or
# clearing (there from before the first image until after synth.json): a SIGKILLed run's folder,
# which every rerun had refused ("holds no synth.json"), `cmg demo --fresh` too.
INCOMPLETE = SYNTH_INCOMPLETE
# synth.json first, INCOMPLETE last: a kill while clearing had left synth.json over no images,
# which `cmg demo` trusted
_OWNED = ("synth.json", "train", "test", "ground_truth", "masks", "captions.jsonl", "meta.jsonl", INCOMPLETE)


def _prepare(out: Path) -> None:
    """Start from an empty folder; only ever clear a folder this generator wrote."""
    if out.exists() and not out.is_dir():
        raise CMGError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not ((out / "synth.json").is_file() or (out / INCOMPLETE).is_file()):
            raise CMGError(f"output folder {out} is not empty and holds no synth.json; refusing to overwrite it")
        _clear(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE).touch()  # before the first image


def _clear(out: Path) -> None:
    """Remove what this generator writes (and nothing else) from `out`, marked as this
    generator's until the end (INCOMPLETE)."""
    (out / INCOMPLETE).touch()
    for name in _OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def synthesize(out: Path, preset: str = "tiny", seed: int = 0, clutter: bool = True,
               category: str = "hex_nut", *, n_train: int | None = None,
               n_test_good: int | None = None, n_test_per_anomaly: int | None = None,
               progress: bool = True) -> Path:
    """Write an MVTec-AD style folder for one product line; returns `out`.

    The n_* overrides shrink a preset (tests). Image (split, kind, i) is seeded by
    (seed, split, kind, i): the clutter and no-clutter variants show the same parts.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")
    p = PRESETS[preset]
    counts = {
        "train/good": p.n_train if n_train is None else n_train,
        "test/good": p.n_test_good if n_test_good is None else n_test_good,
    }
    per = p.n_test_per_anomaly if n_test_per_anomaly is None else n_test_per_anomaly
    counts.update({f"test/{a}": per for a in ANOMALIES})
    if any(v < 0 for v in counts.values()) or counts["train/good"] < 1:
        raise ValueError(f"synthesize: bad image counts {counts}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise CMGError(f"--seed must be 0 ... {MAX_SEED}, got {seed}")
    out = Path(out)
    created = not out.exists()
    out.parent.mkdir(parents=True, exist_ok=True)  # the lock file sits beside the folder
    # One writer, and no `cmg train` reading it meanwhile (two had left a folder of neither's
    # images; a training had read one seed's captions with another's frames).
    with writing(out, refusal=f"--out {out} is in use: another `cmg data synth` writes it (pid {{pid}}) or a "
                 "`cmg train` reads it (lock {lock}); wait for it to end"):
        _prepare(out)
        try:
            _write_line(out, p, preset, seed, clutter, category, counts, progress)
        except BaseException:  # Ctrl-C, a full disk: a half-written folder would block the next run
            _clear(out)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            raise
    return out


def _write_line(out: Path, p: Preset, preset: str, seed: int, clutter: bool, category: str,
                counts: dict[str, int], progress: bool) -> None:
    captions, metas = [], []
    total = sum(counts.values())
    with tqdm(total=total, desc=f"synth {preset} {category}", unit="img", disable=not progress) as bar:
        for key, n in counts.items():
            split, kind = key.split("/")
            width = max(3, len(str(max(n - 1, 0))))
            for i in range(n):
                rng = np.random.default_rng([seed, 0 if split == "train" else 1, KINDS.index(kind), i])
                scene = render_scene(rng, p.image_size, category, clutter=clutter, defect=kind)
                name = f"{i:0{width}d}"
                rel = f"{split}/{kind}/{name}.png"
                _png(scene.image, out / rel)
                part_rel = f"masks/part/{split}/{kind}/{name}.png"
                clutter_rel = f"masks/clutter/{split}/{kind}/{name}.png"
                _png(scene.part_mask, out / part_rel)
                _png(scene.clutter_mask, out / clutter_rel)
                meta = {"file": rel, "split": split, "defect": kind, "attrs": scene.attrs,
                        "part_mask": part_rel, "clutter_mask": clutter_rel}
                if kind != "good":
                    gt_rel = f"ground_truth/{kind}/{name}_mask.png"
                    _png(scene.defect_mask, out / gt_rel)
                    meta["gt_mask"] = gt_rel
                captions.append({"file": rel, "caption": scene.caption})
                metas.append(meta)
                bar.update(1)
    (out / "captions.jsonl").write_text("".join(json.dumps(c, sort_keys=True) + "\n" for c in captions))
    (out / "meta.jsonl").write_text("".join(json.dumps(m, sort_keys=True) + "\n" for m in metas))
    info = {"preset": preset, "seed": seed, "clutter": clutter, "category": category,
            "image_size": p.image_size, "counts": counts}
    write_atomic(out / "synth.json", json.dumps(info, indent=2, sort_keys=True) + "\n")  # last: the folder is whole
    (out / INCOMPLETE).unlink(missing_ok=True)  # gone already: the data set is whole all the same


# ----------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_verb", required=True, metavar="SUBVERB")
    p = sub.add_parser("synth", help="write a synthetic MVTec-style folder with captions",
                       description="Synthetic factory data: parts on a conveyor with clutter, "
                                   "captions, defects and ground-truth masks.")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="dataset size (default tiny)")
    p.add_argument("--seed", type=seed_int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--no-clutter", dest="clutter", action="store_false",
                   help="clean variant: the same scenes without clutter")
    p.add_argument("--category", default="hex_nut", choices=CATEGORIES, help="product line")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (logs, CI)")


def run(args: argparse.Namespace) -> int:
    if args.data_verb != "synth":  # pragma: no cover - argparse enforces the choice
        raise CMGError(f"unknown data sub-verb {args.data_verb!r}")
    out = synthesize(args.out, preset=args.preset, seed=args.seed, clutter=args.clutter,
                     category=args.category, progress=args.progress)
    info = json.loads((out / "synth.json").read_text())
    n_test = sum(v for k, v in info["counts"].items() if k.startswith("test/"))
    print(f"wrote {out}: {info['counts']['train/good']} train and {n_test} test images, "
          f"{info['image_size']} px, category {info['category']}, seed {info['seed']}, "
          f"clutter {'on' if info['clutter'] else 'off'}")
    return 0

"""Whole-config validation before any work: types from the dataclasses' own type hints,
ranges and choices from one small table below.

Why generic: a key added to a config dataclass (cmg/config.py) is type-checked with no
code here, and gets a range as soon as its name is in `RANGES` (by key name in any
section, e.g. every `steps` or `batch_size`, or by full path). Errors are one line naming
the key, e.g. `teacher.steps: expected an integer, got 'five'` (ValueError: exit 2).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any

from cmg.argtypes import INT32_MAX, MAX_SEED

# name (any section) or full dotted path -> (low, high, low_open, high_open); None: unbounded.
# A full path wins over a bare name. Lists (channels) are checked element by element.
Range = tuple[float | None, float | None, bool, bool]
RANGES: dict[str, Range] = {
    "seed": (0, MAX_SEED, False, False),         # numpy refuses negative seeds, torch those past 2**64
    "steps": (1, None, False, False),
    "epochs": (1, None, False, False),
    "batch_size": (1, None, False, False),
    "occlusion_batch": (1, None, False, False),
    "channels": (1, None, False, False),
    "lr": (0, None, True, False),
    "image_size": (8, None, False, False),
    "crop": (8, None, False, False),
    "grid": (1, None, False, False),
    "map_size": (1, None, False, False),
    "map_sigma": (0, None, False, False),
    "score_sigma": (0, None, False, False),
    "embed_dim": (1, None, False, False),
    "downsample": (1, None, False, False),
    "shift": (0, None, False, False),
    "brightness": (0, 1, False, True),
    "fill_prob": (0, 1, False, False),
    "fill_max_share": (0, 1, False, False),
    "anomaly_prob": (0, 1, False, False),
    "shapes": (1, None, False, False),
    "pool": (1, None, False, False),
    "k": (1, None, False, False),
    "bank_size": (1, None, False, False),
    "max_patches": (0, None, False, False),
    "self_radius": (0, None, False, False),
    "upsample": (1, 8, False, False),
    "hidden": (1, None, False, False),
    "taps": (0, None, False, False),
    "k_global": (1, None, False, False),
    "reg": (0, None, True, False),
    "lam": (0, None, False, False),
    "min_unique_captions": (2, None, False, False),
    "val_fraction": (0, 1, True, True),
    "alpha": (0, 1, True, False),
    "rho": (0, 1, True, False),
    "fpr": (0, 1, True, True),
    "train_frames": (0, None, False, False),
    "max_batch": (1, INT32_MAX, False, False),
    "opt_batch": (1, INT32_MAX, False, False),
    "queue_delay_us": (0, INT32_MAX, False, False),  # ModelConfig's integers: more failed at `cmg build`
    "instances": (1, INT32_MAX, False, False),
    "workspace_mb": (1, INT32_MAX, False, False),
}
_VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
# Full dotted path -> allowed values of a string key (of each item, for a list of strings).
CHOICES: dict[str, tuple[str, ...]] = {
    "teacher.source": ("backbone", "scratch", "open_clip"),
    "teacher.pool": ("grid", "attention"),
    "cmer.relevance": ("occlusion", "attention"),
    "backbone.variant": _VARIANTS,
    "backbone.ensemble": _VARIANTS,  # each item
    "local.model": ("bank", "unet"),
    "local.score": ("max", "max_minus_p90"),
    "local.colour": ("rgb", "grey", "grey+rgb"),
    "cmer.rule": ("relative", "top_rho"),
    "local.placement": ("keep", "uniform"),
    "scoring.fusion": ("auto", "mean", "max", "local"),
    "cmle.text_encoder": ("minilm", "teacher"),
}

_KIND = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _describe(value: Any) -> str:
    return "nothing (null)" if value is None else repr(value) if not isinstance(value, (dict, list)) else (
        "a mapping" if isinstance(value, dict) else f"a list {value!r}")


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _check_range(path: str, value: float) -> None:
    rule = RANGES.get(path) or RANGES.get(path.rsplit(".", 1)[-1].split("[", 1)[0])
    if rule is None:
        return
    low, high, low_open, high_open = rule
    bad = (low is not None and (value <= low if low_open else value < low)) or (
        high is not None and (value >= high if high_open else value > high))
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {_number(low)}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {_number(high)}"
        raise ValueError(f"{path}: expected a value {' and '.join(p for p in (lo, hi) if p)}, got {value!r}")


def _check_value(path: str, hint: Any, value: Any) -> None:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:
            _check_value(path, real[0], value)
            return
        for option in real:  # the first that fits
            try:
                _check_value(path, option, value)
                return
            except ValueError:
                continue
        raise ValueError(f"{path}: {_describe(value)} fits none of {hint}")
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise ValueError(f"{path}: expected a list such as [16, 32], got {_describe(value)}")
        if not value:
            raise ValueError(f"{path}: expected a non-empty list, got []")
        for i, v in enumerate(value):
            _check_value(f"{path}[{i}]", item, v)
        return
    if hint is Any:
        return
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif hint is str:
        ok = isinstance(value, str)
    else:
        ok = True  # a type this table does not know: the dataclass takes it as is
    if not ok:
        kind = _KIND.get(hint, getattr(hint, "__name__", str(hint)))
        hint_text = ""
        if hint is float and isinstance(value, str):
            try:
                float(value)
                hint_text = f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-3)"
            except ValueError:
                pass
        raise ValueError(f"{path}: expected {kind}, got {_describe(value)}{hint_text}")
    if hint in (int, float):
        _check_range(path, value)
    choices = CHOICES.get(path.split("[", 1)[0])  # a list's items: `key[i]` checked against `key`
    if hint is str and choices is not None and value not in choices:
        raise ValueError(f"{path}: expected one of {', '.join(choices)}, got {value!r}")


def check_section(cls: type, values: Any, where: str = "") -> None:
    """Check `values` (a YAML mapping) against dataclass `cls`, recursively; ValueError
    naming the first bad key. Unknown keys are left to the loader (it lists the known ones)."""
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping of keys, got {_describe(values)}")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        path = f"{where}.{f.name}" if where else f.name
        hint, value = hints[f.name], values[f.name]
        if dataclasses.is_dataclass(hint):
            if value is not None:  # `section:` with nothing under it: the defaults
                check_section(hint, value, path)
            continue
        _check_value(path, hint, value)


def check_range_table(config_cls: type) -> list[str]:
    """Names in RANGES / CHOICES that no field of `config_cls` (cmg.config.Config) has (a
    renamed key left behind); the class is passed in because cmg.config imports this module."""
    names, paths = set(), set()

    def walk(cls: type, where: str) -> None:
        for f in dataclasses.fields(cls):
            path = f"{where}.{f.name}" if where else f.name
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, path)
            else:
                names.add(f.name)
                paths.add(path)

    walk(config_cls, "")
    return sorted((set(RANGES) - names - paths) | (set(CHOICES) - paths))

"""Argument types shared by every verb's parser (argparse turns their errors into exit 2).

Core layer: the verbs of every layer above use them; imports no torch.
"""

from __future__ import annotations

import argparse
import math

from cmg.contract import threshold_value


def finite_float(text: str) -> float:
    """A finite number: NaN or inf as a threshold would silently flag nothing (or everything)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def threshold_float(text: str) -> float:
    """`--threshold`: finite in FP32, the dtype the graphs compare it in (cmg.contract.threshold_value)."""
    try:
        return threshold_value(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_float(text: str) -> float:
    """A finite number > 0 (timeouts, durations, rates: 0 would fail or spin at once)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


INT32_MAX = 2**31 - 1  # what Triton's config fields and versions take: protobuf refused more, late


def nonnegative_float(text: str) -> float:
    """A finite number >= 0 (a warm-up: none is allowed, an infinite one never ends)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def triton_count(text: str) -> int:
    """A count Triton's config or a model version holds, 1 ... INT32_MAX (`--max-batch
    3000000000` had failed only in the ModelConfig write, a 20-digit `--version` crashed
    tritonserver at start)."""
    value = positive_int(text)
    if value > INT32_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {INT32_MAX}, got {text!r}")
    return value


def port_int(text: str) -> int:
    """A TCP port, 1..65535 (tritonserver took 99999 and listened on a random port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is a number in 1..65535, got {text!r}")
    return value


MAX_SEED = 2**31 - 1  # every stage derives its own seed (seed + 7, + 11, ...): far below torch's 2**64


def seed_int(text: str) -> int:
    """A training seed: 0 ... MAX_SEED."""
    value = nonnegative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_SEED}, got {text!r}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0 (0 often means "the default", e.g. --cpu-threads)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def retries_int(text: str) -> int:
    """A retry budget: an integer >= 0, or -1 for "without limit" (-2 is a typo, not forever)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < -1:
        raise argparse.ArgumentTypeError(f"must be >= 0, or -1 for no limit; got {text!r}")
    return value


def seed_list(text: str) -> tuple[int, ...]:
    """`--seeds` '0,1,2' -> (0, 1, 2): training seeds, each once, in the order given."""
    vals = [v.strip() for v in text.split(",") if v.strip()]
    if not vals or not all(v.isdigit() for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return tuple(dict.fromkeys(seed_int(v) for v in vals))

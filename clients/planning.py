"""Several cameras: each `--source` gets a name (`NAME=SRC`, or one made from SRC) and its
own NAME.jsonl in the `--out` folder; two sources may not share a file."""

from __future__ import annotations

import re
from pathlib import Path

from cmg.errors import CMGError, check_parent_folders
from cmg_clients.client import glob_files, is_pattern
from cmg_clients.sources import VIDEO_EXTS, is_live, live_name, parse_synth, redact

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def source_name(spec: str) -> tuple[str, str]:
    """`NAME=SRC` -> (NAME, SRC); otherwise a file-name-safe name made from SRC itself
    (a folder's or video's name, a synth spec with its seed)."""
    name, sep, rest = spec.partition("=")
    # a path or a glob that names files as written (`line=2/*.png`) is the source, not NAME=SRC
    if sep and _NAME.fullmatch(name) and rest and not Path(spec).exists() and not (
            is_pattern(spec) and glob_files(spec)):
        return name, rest
    if spec.startswith("synth:"):
        o = parse_synth(spec)
        base = f"synth_{o['preset']}_seed{o['seed']}"
    elif is_live(spec):
        base = live_name(spec)
    else:
        path = Path(spec.rstrip("/"))
        base = path.stem if path.suffix.lower() in VIDEO_EXTS else path.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_.") or "source", spec


def plan_sources(specs: list[str], out_dir: Path) -> list[tuple[str, str, Path]]:
    """(name, SRC, DIR/name.jsonl) per source; two sources may not share a file."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CMGError(f"--out {out_dir} is a file: with several --source it is a folder (one NAME.jsonl per source)")
    check_parent_folders(out_dir / "x.jsonl", "--out")
    plan, seen = [], {}
    for spec in specs:
        name, src = source_name(spec)
        if name in seen:
            raise CMGError(f"sources {redact(seen[name])!r} and {redact(spec)!r} would both write {name}.jsonl: "
                           f"name them, e.g. --source cam1={redact(src)}")
        seen[name] = spec
        plan.append((name, src, out_dir / f"{name}.jsonl"))
    return plan



"""What every `cmg bench` sub-verb shares: the run's frames, a local server, the common
options. Sub-verb modules import this; this imports none of them (no loops)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from cmg.argtypes import positive_int
from cmg.checksum import file_sha256
from cmg.contract import Contract
from cmg.dataset import MVTecFolder, resolve_data
from cmg.errors import CMGError
from cmg_bench.loadgen import Window
from cmg_bench.memory import available_bytes
from cmg_build.repository import CPU_CMG, build, find_export
from cmg_build.server import TritonServer

FULL_WINDOW = Window(warmup_s=1.0, window_s=3.0, min_requests=8, max_window_s=60.0)
# Of the available memory, what an in-process point may plan to use: ONNX Runtime's arena
# held 1.6 times the arena-less need at 32 concurrent calls (6.3 against 4.0 GB, small-fast int8).
MEMORY_SHARE = 0.5
GB = 1e9
QUICK_WINDOW = Window(warmup_s=0.3, window_s=0.8, min_requests=3, max_window_s=15.0)


def parse_ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise CMGError(f"expected comma-separated integers, got {text!r}") from exc
    if not vals or min(vals) < 1:
        raise CMGError(f"expected positive integers, got {text!r}")
    return vals


def add_out_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--out", type=Path, required=True, help=f"output folder for {what}")


def add_run_arguments(parser: argparse.ArgumentParser, what: str, url: bool = True) -> None:
    """--run, --out, --data (and --url): the options of every sub-verb that measures a run."""
    parser.add_argument("--run", type=Path, required=True, help="trained run folder (RUN/checkpoint.pt)")
    add_out_argument(parser, what)
    parser.add_argument("--data", type=Path, default=None,
                        help="dataset folder (test split); default: the run's training data")
    if url:
        parser.add_argument("--url", default=None,
                            help="gRPC HOST:PORT of a running server with this run's repository "
                                 "(default: build a cpu repository and start one)")


def add_repeats_argument(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument("--repeats", type=positive_int, default=None, help=f"interleaved pairs (default {default})")


def load_test_frames(data: Path, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames and labels of the test split (cmg.frames conversion via the dataset)."""
    ds = MVTecFolder(data)
    samples = ds.samples("test")
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if labels.min() == labels.max():
        raise CMGError(f"test split of {data} has only {'anomalous' if labels[0] else 'normal'} images: "
                       "AUROC needs both")
    return ds.frames(samples, (height, width)), labels


def ensure_export(run_dir: Path) -> tuple[Path, dict]:
    """RUN/onnx and its export.json, exporting first when the run has none."""
    meta_path = run_dir / "onnx" / "export.json"
    why = "no onnx/export.json" if not meta_path.is_file() else None
    if why is None and (run_dir / "checkpoint.pt").is_file():
        try:
            recorded = json.loads(meta_path.read_text()).get("checkpoint_sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded != file_sha256(run_dir / "checkpoint.pt"):
            why = "onnx/ was exported from another checkpoint"
    if why is not None:
        if not (run_dir / "checkpoint.pt").is_file():
            raise CMGError(f"run folder {run_dir} has no checkpoint.pt (run `cmg train` first)")
        from cmg_train.export import export_run  # torch: only when the run must be exported first

        print(f"cmg bench: exporting {run_dir} first ({why})")
        export_run(run_dir)
    return find_export(run_dir)


def check_run_folder(run_dir: Path) -> Path:
    """A trained run folder, before anything is built or started: it exists and holds the
    checkpoint (an export alone would serve, but the torch modes and the calibration need it)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CMGError(f"run folder not found: {run_dir}")
    if not (run_dir / "checkpoint.pt").is_file():
        raise CMGError(f"run folder {run_dir} has no checkpoint.pt (a `cmg train` output folder?)")
    return run_dir


def run_frames(run_dir: Path, out: Path, data: Path | None) -> tuple[Contract, np.ndarray, np.ndarray]:
    """The checks every bench sub-verb starts with: the run folder holds a trained run, OUT is
    made, the run is exported (first if needed); returns its contract and the test split's
    frames and labels."""
    run_dir = check_run_folder(run_dir)
    Path(out).mkdir(parents=True, exist_ok=True)
    _, meta = ensure_export(run_dir)
    contract = Contract.from_dict(meta["contract"])
    frames, labels = load_test_frames(resolve_data(run_dir, data), contract.height, contract.width)
    return contract, frames, labels


def start_local_server(run_dir: Path, out: Path, cpu_cmg: str | None = None) -> TritonServer:
    """A cpu repository of the run in OUT/repository and a real tritonserver on it (caller stops it).
    With `cpu_cmg` (fused or ensemble) that build setting, in OUT/repository_CPU_CMG."""
    suffix = f"_{cpu_cmg}" if cpu_cmg else ""
    repo = Path(out) / f"repository{suffix}"
    build(Path(run_dir), "cpu", repo, cpu_cmg=cpu_cmg or CPU_CMG[0])
    return TritonServer(repo, log_file=Path(out) / f"tritonserver{suffix}.log").start()


def close_all(modes: Iterable, loop: asyncio.AbstractEventLoop, servers: Iterable[TritonServer | None] = ()) -> None:
    """Teardown after a measurement, error or not: every mode (one failing to close does not
    keep the others or the servers alive), the event loop, then the servers this run started."""
    for mode in modes:
        with contextlib.suppress(Exception):
            mode.close()
    loop.close()
    for server in servers:
        if server is not None:
            server.cleanup()


def measure_grid(name: str, mode, settings, bar) -> list[dict]:
    """Every (batch, concurrency) point of `settings` for one mode, advancing `bar` per point:
    the sweep both `cmg bench sweep` and `cmg bench peer` report best and batch-1 points from.

    An in-process point whose concurrent calls would not fit in memory is skipped, said on
    the bar and kept in `mode.skipped` (the reports list it): `small` at concurrency 32 and
    batch 8 needs about 30 GB in one process and the OOM killer took the whole sweep."""
    points = []
    mode.skipped = []
    admitted = 0  # the most this mode's calls have held at once (a runtime's arena keeps it)
    for batch in settings.batch:
        for conc in settings.concurrency:
            bar.set_postfix_str(f"{name} c{conc} b{batch}")
            # served modes are not checked: the server queues requests beyond its instances
            per_call = mode.call_bytes(batch) if hasattr(mode, "call_bytes") else None
            reason = memory_refusal(conc, per_call, admitted)
            if reason:
                mode.skipped.append({"concurrency": conc, "batch": batch, "reason": reason})
                bar.write(f"cmg bench: {name} c{conc} b{batch} not measured: {reason}")
            else:
                points.append(mode.measure(conc, batch, settings.window).to_dict())
                admitted = max(admitted, conc * (per_call or 0))
            bar.update(1)
    return points


def memory_refusal(concurrency: int, per_call: int | None, admitted: int) -> str | None:
    """Why `concurrency` simultaneous in-process calls of `per_call` bytes each should not
    run, or None. Concurrency 1 always runs (the mode must be measurable at all); without a
    per-call or free-memory reading (served modes, no /proc) nothing is refused."""
    free = available_bytes()
    if concurrency == 1 or per_call is None or free is None:
        return None
    need, budget = concurrency * per_call, free + admitted
    if need <= MEMORY_SHARE * budget:
        return None
    return (f"{concurrency} concurrent calls need about {need / GB:.1f} GB "
            f"({per_call / GB:.2f} GB each), {budget / GB:.1f} GB available to this process")


def finish_plot(fig, ax, path: Path, xlabel: str, ylabel: str, title: str, legend_loc: str) -> None:
    """Labels, grid and legend of a one-axes bench picture, written to `path` and closed."""
    import matplotlib.pyplot as plt  # heavy: only pictures need it (the caller chose the backend)

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

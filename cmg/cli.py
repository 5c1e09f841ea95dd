"""`cmg`: one console script whose verbs follow the data through the system.

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the chosen verb's module is imported, so client verbs never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

OWN_PACKAGES = {"cmg", "cmg_train", "cmg_build", "cmg_clients", "cmg_bench", "cmg_configs", "cmg_model_repository"}

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "data": ("cmg.synth", "synthetic factory data: `cmg data synth --out DIR`"),
    "captions": ("cmg_train.captions", "captions.jsonl for a folder without one: open_clip CoCa, or a name template"),
    "train": ("cmg_train.train", "train teacher, CMER scorer, CMLE encoder, memory banks, threshold"),
    "eval": ("cmg_train.evaluate", "AUROC (image and pixel level) and the ablation table"),
    "export": ("cmg_train.export", "ONNX graphs with in-graph masking and scoring, plus parity report"),
    "build": ("cmg_build.repository", "Triton model repository for the cpu, onnxruntime or tensorrt target"),
    "serve": ("cmg.server", "start the real tritonserver on a repository"),
    "deploy": ("cmg_build.deploy", "a retrained run as the next model version of a live server, no downtime"),
    "infer": ("cmg_clients.infer", "score images over gRPC (or HTTP); one JSON line per image"),
    "stream": ("cmg_clients.stream", "factory-stream client: bounded window, retries, exactly-once JSONL"),
    "bench": ("cmg_bench.bench", "latency/throughput/accuracy comparisons measured in one run "
                                  "(`cmg bench peer`: next to anomalib)"),
    "demo": ("cmg.demo", "the whole chain on the embedded default"),
}
# `cmg VERB SUB ...` handled by its own module (same add_arguments/run shape as a verb).
SUBVERBS: dict[tuple[str, str], tuple[str, str]] = {
    ("bench", "peer"): ("cmg_bench.peer", "CMG side by side with anomalib's PatchCore and PaDiM (the `peer` extra)"),
}


# -- argument types shared by the verbs (argparse turns their errors into exit 2) ---------
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
    from cmg.contract import threshold_value

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


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
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


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """All verbs are listed; only `chosen`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="cmg", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, (module_name, help_line) in VERBS.items():
        p = sub.add_parser(verb, help=help_line, description=help_line)
        p.set_defaults(_module=module_name)
        if verb != chosen:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] in OWN_PACKAGES:
                raise
            # A dependency not installed on this host (e.g. torch on a client machine).
            p.set_defaults(_missing=f"{exc}; this verb needs it installed")
            p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            continue
        module.add_arguments(p)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C is: every `finally` runs (servers
    stopped, temporary folders removed) instead of the process vanishing mid-way."""


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    import signal

    from cmg.errors import CMGError
    from cmg.frames import FrameError

    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if tuple(argv[:2]) in SUBVERBS:
        module_name, help_line = SUBVERBS[tuple(argv[:2])]
        parser = argparse.ArgumentParser(prog=f"cmg {argv[0]} {argv[1]}", description=help_line)
        importlib.import_module(module_name).add_arguments(parser)
        args = parser.parse_args(argv[2:])
        args.verb, args._module, args._argv = f"{argv[0]} {argv[1]}", module_name, argv[2:]
    else:
        args = build_parser(chosen).parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"cmg {args.verb}: error: {args._missing}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    debug = bool(os.environ.get("CMG_DEBUG"))
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading_is_main() else None
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt as exc:
        # Frames in flight were dropped on purpose: their coroutines' "never awaited" warnings
        # at exit would bury the one line below.
        import warnings

        warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
        if isinstance(exc, Terminated):
            print(f"cmg {args.verb}: terminated (SIGTERM)", file=sys.stderr)
            return 143
        print(f"cmg {args.verb}: interrupted", file=sys.stderr)
        return 130
    except (CMGError, FrameError, OSError, ValueError) as exc:
        # Bad input or a missing prerequisite: one line naming it (a folder that is a file,
        # a port with nothing behind it, a malformed file), exit 2.
        if debug:
            raise
        details = getattr(exc, "details", None)
        if details:
            print(details.rstrip("\n"), file=sys.stderr)
        print(f"cmg {args.verb}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if debug:
            raise
        print(f"cmg {args.verb}: internal error: {type(exc).__name__}: {_one_line(exc)} "
              "(CMG_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous is not None:  # `cmg serve` installs its own (a graceful stop); main() in a test returns
            signal.signal(signal.SIGTERM, previous)


def threading_is_main() -> bool:
    """Signal handlers can only be installed from the main thread (tests call main() elsewhere)."""
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line; an OSError says what failed on which path."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.strerror}: {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

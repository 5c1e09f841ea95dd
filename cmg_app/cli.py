"""`cmg`: one console script whose verbs follow the data through the system.

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the chosen verb's module is imported, so client verbs never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from pathlib import Path

from cmg.errors import CMGError

OWN_PACKAGES = {"cmg", "cmg_data", "cmg_app", "cmg_train", "cmg_build", "cmg_clients", "cmg_bench", "cmg_configs", "cmg_model_repository"}

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "data": ("cmg_data.synth", "synthetic factory data: `cmg data synth --out DIR`"),
    "captions": ("cmg_train.captions", "captions.jsonl for a folder without one: open_clip CoCa, or a name template"),
    "train": ("cmg_train.train", "train teacher, CMER scorer, CMLE encoder, memory banks, threshold"),
    "eval": ("cmg_train.evaluate", "AUROC (image and pixel level) and the ablation table"),
    "export": ("cmg_train.export", "ONNX graphs with in-graph masking and scoring, plus parity report"),
    "build": ("cmg_build.repository", "Triton model repository for the cpu, onnxruntime or tensorrt target"),
    "serve": ("cmg_build.server", "start the real tritonserver on a repository"),
    "deploy": ("cmg_build.deploy", "a retrained run as the next model version of a live server, no downtime"),
    "infer": ("cmg_clients.infer", "score images over gRPC (or HTTP); one JSON line per image"),
    "stream": ("cmg_clients.stream", "factory-stream client: bounded window, retries, exactly-once JSONL"),
    "bench": ("cmg_bench.bench", "measurements, one sub-verb each: sweep, soak, servers, engines, fused-vs-ensemble, ..."),
    "demo": ("cmg_app.demo", "the whole chain on the embedded default"),
}


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


def _expand_home(args: argparse.Namespace) -> None:
    """`~/line3` in a path option, which a shell leaves as written in `--run=~/line3` or in
    quotes: the user's home, as everywhere else (it had been a folder named `~`)."""
    for key, value in vars(args).items():  # (expanduser leaves every other path as it is)
        if isinstance(value, Path):
            setattr(args, key, value.expanduser())
        elif isinstance(value, list) and any(isinstance(v, Path) for v in value):
            setattr(args, key, [v.expanduser() if isinstance(v, Path) else v for v in value])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    try:  # imports the verb's module (torch: seconds): a Ctrl-C then had printed 25 frames of import
        args, extra = build_parser(chosen).parse_known_args(argv)
    except KeyboardInterrupt:
        print(f"cmg{' ' + chosen if chosen in VERBS else ''}: interrupted", file=sys.stderr)
        return 130
    if getattr(args, "_missing", None):  # before `extra`: a verb that could not load has no options to match
        print(f"cmg {args.verb}: error: {args._missing}", file=sys.stderr)
        return 2
    if extra and isinstance(getattr(args, "inputs", None), list) and not any(a.startswith("-") for a in extra):
        args.inputs += extra  # `cmg infer a.png --threshold 1 b.png`: images after an option are images too
        extra = []
    if extra:  # said by the verb, with the likely cause when it is one: an unquoted glob the shell expanded
        files = [a for a in extra if not a.startswith("-") and os.path.exists(a)]
        hint = (" (a pattern the shell expanded into several files? quote it, e.g. 'DIR/*.png', or give the "
                "option once per file)") if files else ""
        print(f"cmg {args.verb}: error: unrecognized arguments: {' '.join(extra)}{hint}", file=sys.stderr)
        return 2
    _expand_home(args)
    debug = bool(os.environ.get("CMG_DEBUG"))
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if threading_is_main() else None
    try:
        module = importlib.import_module(args._module)  # in the try: a Ctrl-C here is one line too
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
    except (CMGError, OSError, ValueError) as exc:  # FrameError is a CMGError
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
    return threading.current_thread() is threading.main_thread()


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line; an OSError says what failed on which path."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.strerror}: {exc.filename}"
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())

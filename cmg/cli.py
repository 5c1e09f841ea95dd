"""`cmg`: one console script whose verbs follow the data through the system.

Each verb lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
only the chosen verb's module is imported, so client verbs never import torch.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

OWN_PACKAGES = {"cmg", "cmg_train", "cmg_build", "cmg_clients", "cmg_bench"}

# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "data": ("cmg.synth", "synthetic factory data: `cmg data synth --out DIR`"),
    "train": ("cmg_train.train", "train teacher, CMER scorer, CMLE encoder, memory banks, threshold"),
    "eval": ("cmg_train.evaluate", "AUROC (image and pixel level) and the ablation table"),
    "export": ("cmg_train.export", "ONNX graphs with in-graph masking and scoring, plus parity report"),
    "build": ("cmg_build.repository", "Triton model repository for the cpu, onnxruntime or tensorrt target"),
    "serve": ("cmg.server", "start the real tritonserver on a repository"),
    "infer": ("cmg_clients.infer", "score images over gRPC (or HTTP); one JSON line per image"),
    "stream": ("cmg_clients.stream", "factory-stream client: bounded window, retries, exactly-once JSONL"),
    "bench": ("cmg_bench.bench", "latency/throughput/accuracy comparisons measured in one run"),
    "demo": ("cmg.demo", "the whole chain on the embedded default"),
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


def main(argv: list[str] | None = None) -> int:
    from cmg.errors import CMGError
    from cmg.frames import FrameError

    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen).parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"cmg {args.verb}: error: {args._missing}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"cmg {args.verb}: interrupted", file=sys.stderr)
        return 130
    except (CMGError, FrameError, FileNotFoundError, ValueError) as exc:
        if os.environ.get("CMG_DEBUG"):
            raise
        print(f"cmg {args.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""`cmg build`: an export folder (RUN/onnx) -> Triton model repository for one target.

Layout written (cpu target):
  REPO/<model>/config.pbtxt, REPO/<model>/<version>/{model.py, model.onnx}  (cmer_scorer, cmle_encoder, cmer_teacher)
  REPO/cmg/config.pbtxt, REPO/cmg/1/{model.py, model.onnx}   (one fused scorer+encoder graph; build/fuse.py;
                                                             --cpu-cmg ensemble: the two-step ensemble)
  REPO/cmg_exact/config.pbtxt                                (ensemble)
  --precision int8: cmer_scorer and cmle_encoder graphs are Q/DQ int8 (build/quantize.py)
  REPO/build_report.json
onnxruntime: model.onnx per model (platform onnxruntime_onnx); tensorrt: model.plan
(+ the ONNX it came from), REPO/trtexec.sh. On both GPU targets every ensemble step is an ONNX Runtime model or an
engine (THRESHOLD required, its default in the ensemble's config; see build/config.py:
threshold_optional_in).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import importlib.metadata
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path

from tqdm import tqdm

from cmg import model_config as mcfg
from cmg.argtypes import nonnegative_int, triton_count
from cmg.checksum import file_sha256
from cmg.config import ServingConfig
from cmg.contract import CMG, CMLE_ENCODER, ENSEMBLES, ONNX_MODELS, THRESHOLD, Contract
from cmg.errors import CMGError
from cmg.files import can_stage_beside, staged_folder
from cmg.locks import RUN_BEING_TRAINED, reading, writing
from cmg_build import config as cfgmod
from cmg_build import k8s, opcheck
from cmg_build import tensorrt as trtmod
from cmg_build.fuse import fuse
from cmg_build.quantize import PRECISIONS, QUANTIZED, quantize_graphs
from cmg_build.server import is_training_output
from cmg_build.tensorrt import trtexec_command
from cmg_model_repository.model import resolve_threads


def _model_py() -> Path:
    """The generic Python-backend model, shipped as package `cmg_model_repository`."""
    return Path(str(files("cmg_model_repository") / "model.py"))


MODEL_PY = _model_py()
DEFAULT_OUT = Path("model_repository")
CPU_CMG = ("fused", "ensemble")  # how the cpu target serves `cmg` (build/fuse.py); the first is the default


def find_export(run: Path) -> tuple[Path, dict]:
    """RUN/onnx (or RUN itself) with a readable export.json; one-line CMGError otherwise."""
    run = Path(run)
    if not run.exists():
        raise CMGError(f"run folder {run} does not exist")
    if run.is_file():  # RUN/onnx/export.json, RUN/checkpoint.pt: the folder that holds it is meant
        folder = run.parent.parent if run.parent.name == "onnx" else run.parent
        raise CMGError(f"--run {run} is a file: give the run folder ({folder})")
    onnx_dir = run / "onnx" if (run / "onnx").is_dir() else run
    meta_path = onnx_dir / "export.json"
    if not meta_path.is_file():
        raise CMGError(f"{meta_path} not found: run `cmg export --run {run}` first")
    try:
        meta = json.loads(meta_path.read_text())
        Contract.from_dict(meta["contract"])
        if not math.isfinite(float(meta["threshold"])):  # a NaN threshold flags nothing
            raise ValueError(f"threshold {meta['threshold']} is not a finite number; retrain the run")
        models = meta["models"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CMGError(f"{meta_path}: malformed export metadata ({type(exc).__name__}: {exc})") from exc
    for name in ONNX_MODELS:
        if name not in models:
            raise CMGError(f"{meta_path}: model {name!r} missing from 'models'")
        path = onnx_dir / models[name]["file"]
        if not path.is_file():
            raise CMGError(f"{path} not found (listed in {meta_path})")
        want = models[name].get("sha256")
        if want and file_sha256(path) != want:
            raise CMGError(f"{path}: sha256 differs from {meta_path} (re-run `cmg export`)")
    check_export_matches_checkpoint(onnx_dir, meta, meta_path)
    return onnx_dir, meta


def check_export_matches_checkpoint(onnx_dir: Path, meta: dict, meta_path: Path) -> None:
    """The export must come from the checkpoint beside it: `cmg train` into an existing run
    used to leave the old onnx/, and build served the old model (exit 0). export.json
    records the checkpoint's sha256; a run folder with a checkpoint.pt must match it. An
    export folder on its own (no checkpoint next to it, e.g. copied) is taken as it is."""
    checkpoint = next((c for c in (onnx_dir.parent / "checkpoint.pt", onnx_dir / "checkpoint.pt") if c.is_file()),
                      None)
    if checkpoint is None:
        return
    run = checkpoint.parent
    want = meta.get("checkpoint_sha256")
    if not want:
        raise CMGError(f"{meta_path} does not say which checkpoint it was exported from (an older export): "
                       f"re-run `cmg export --run {run}`; a checkpoint too old for this version's export "
                       f"builds from a copy of {onnx_dir} on its own (`cmg build --run COPY`), or train it again")
    if file_sha256(checkpoint) != want:
        raise CMGError(f"{onnx_dir} was exported from another checkpoint than {checkpoint} "
                       f"(sha256 {want[:12]}... in export.json): re-run `cmg export --run {run}`")


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": sys.version.split()[0]}
    for mod in ("onnx", "onnxruntime", "tritonclient", "tensorrt", "numpy"):
        try:
            out[mod] = importlib.metadata.version(mod)
        except Exception:  # noqa: BLE001 - not installed
            continue
    return out


def strip_threshold_initializer(src: Path, dst: Path) -> None:
    """Encoder for GPU targets: THRESHOLD becomes a plain required input (no initializer).

    TensorRT would otherwise fold the initializer into a constant and drop the input;
    the client supplies the default from the ensemble's `default_threshold` parameter.
    """
    import onnx  # heavy: only GPU-target builds rewrite this graph, not importing cmg_build

    model = onnx.load(str(src))
    kept = [t for t in model.graph.initializer if t.name != THRESHOLD]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


# The TensorRT container of the serving image's NGC release: the same TensorRT version, so
# the plans it builds load in Triton (a plan from another 10.x does not).
TRT_IMAGE = k8s.TRITON_IMAGE.replace("/tritonserver:", "/tensorrt:")


def file_checksums(repo: Path) -> dict[str, str]:
    """SHA-256 of every file of a repository but its report and hidden files (a deploy's
    record): what was built (or deployed) into it."""
    return {str(path.relative_to(repo)): file_sha256(path)
            for path in sorted(p for p in Path(repo).rglob("*") if p.is_file() and p.name != "build_report.json"
                               and not p.name.startswith(".") and "__pycache__" not in p.parts)}


def int8_on_cuda(target: str, kind: str, precision: str) -> bool:
    """int8 graphs on ONNX Runtime's CUDA provider: they follow its CPU recipe, which that
    provider runs without int8 kernels (the accuracy cost, no speed-up). Never built."""
    return precision == "int8" and target == "onnxruntime" and kind == "gpu"


def _script_path(path: Path, out: Path) -> str:
    """A path as trtexec.sh (run from OUT) names it: relative inside OUT, so the repository can
    move or be mounted alone; absolute outside it (relative, it broke when OUT moved)."""
    path = Path(path).resolve()
    return os.path.relpath(path, out.resolve()) if path.is_relative_to(out.resolve()) else str(path)


DEPLOY_RECORD = ".cmg-deploy.json"  # in a repository while a deploy has it staged: what undoes it (build/deploy.py)


@contextlib.contextmanager
def _writing(final: Path, given: Path) -> Iterator[Path]:
    """The folder a build writes OUT's content into, under OUT's lock: a copy beside OUT, put
    into OUT entry by entry when the build ends, the ensembles after their steps and
    build_report.json last (written in place, an interrupted build left two runs' models in
    OUT, cmg and cmg_exact answering differently, and it served). OUT stays the same folder (a
    container that mounts it sees the new models). Where nothing can be written beside OUT (a
    mount point, a read-only folder) OUT itself, as before, said."""
    with writing(final, refusal=f"--out {given} is being written by another `cmg build` or `cmg deploy` (pid "
                 "{pid}), or a server is loading it (lock {lock}): one at a time; wait for it to end") as lockable:
        if not can_stage_beside(final):
            print(f"cmg build: nothing can be written beside {given} and renamed into it (a mount point, or a "
                  "read-only folder): building in place (a build stopped midway can leave it part old, part new: "
                  f"build again){'' if lockable else '; without a lock (another build or deploy is not refused)'}",
                  file=sys.stderr)
            final.mkdir(exist_ok=True)
            (final / "build_report.json").unlink(missing_ok=True)  # a finished build's mark goes first
            yield final
            return
        for stale in final.parent.glob(glob.escape(f".{final.name}.tmp-") + "*"):
            shutil.rmtree(stale, ignore_errors=True)  # a killed build's (the lock is ours)
        with staged_folder(final, copy=True, keep_folder=(*ENSEMBLES, "build_report.json")) as out:
            yield out


def build(run: Path, target: str, out: Path, kind: str = "cpu", max_batch: int | None = None,
          opt_batch: int | None = None, instances: int | None = None, version: int = 1,
          cpu_threads: int = 0, timing_cache: Path | None = None, skip_engines: bool = False,
          precision: str = "fp32", cpu_cmg: str = CPU_CMG[0], data: Path | None = None) -> dict:
    """Write the repository; returns the build report. Raises CMGError (after writing
    configs, ONNX files and trtexec.sh) when the tensorrt target cannot build engines.
    OUT changes whole or not at all: the build writes into a copy beside it and puts each
    changed entry into OUT, the report last (in place where nothing can be staged beside it).
    precision int8: the scorer and encoder graphs are static Q/DQ int8 (build/quantize.py),
    calibrated on the normal training frames of the run's folder, or of `data`.
    cpu_cmg (cpu target): "fused" (default) serves `cmg` as one graph in one Python-backend
    model (build/fuse.py: one stub hop per frame instead of two; `cmg bench fused-vs-ensemble`),
    "ensemble" as the two-step ensemble of the other targets."""

    if precision not in PRECISIONS:
        raise CMGError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if target not in cfgmod.TARGETS:
        raise CMGError(f"unknown target {target!r}: expected one of {', '.join(cfgmod.TARGETS)}")
    if cpu_cmg not in CPU_CMG:
        raise CMGError(f"--cpu-cmg {cpu_cmg!r}: expected one of {', '.join(CPU_CMG)}")
    if kind not in ("cpu", "gpu"):
        raise CMGError(f"--kind {kind!r}: expected cpu or gpu")
    if int8_on_cuda(target, kind, precision):
        raise CMGError("--precision int8 with --target onnxruntime --kind gpu: the int8 graphs follow ONNX "
                       "Runtime's CPU recipe, which its CUDA provider runs without int8 kernels (the accuracy "
                       "cost, no speed-up); int8 on a GPU: --target tensorrt --precision int8")
    if kind == "gpu" and target == "cpu":  # its report (and --k8s) would claim a GPU nothing uses
        raise CMGError("--kind gpu: the cpu target runs ONNX Runtime on CPU instances only; "
                       "for GPU instances use --target onnxruntime --kind gpu, or --target tensorrt")
    if is_training_output(out):
        raise CMGError(f"--out {out} is a training run or export folder, not a model repository: "
                       "write the repository to a folder of its own")
    onnx_dir, meta = find_export(run)
    contract = Contract.from_dict(meta["contract"])
    threshold = float(meta["threshold"])
    serving_d = dict(meta.get("serving") or {})
    for key, val in (("max_batch", max_batch), ("opt_batch", opt_batch), ("instances", instances)):
        if val is not None:
            serving_d[key] = val
    if max_batch is not None and opt_batch is None:
        serving_d["opt_batch"] = min(int(serving_d.get("opt_batch", 8)), max_batch)
    serving = cfgmod.serving_settings(serving_d)
    if target == "cpu" and not MODEL_PY.is_file():
        raise CMGError(f"{MODEL_PY} not found (the Python-backend model source; is the project checked out?)")

    given = Path(out)
    if given.exists() and not given.is_dir():
        raise CMGError(f"--out {given} is a file, not a folder")
    if (given / DEPLOY_RECORD).is_file():  # its undo would put the old build's configs over this one's
        raise CMGError(f"--out {given}: an interrupted `cmg deploy` left it staged ({given / DEPLOY_RECORD}): run "
                       "the same `cmg deploy` again to undo it (it undoes before it deploys), then build")
    # resolved: `--out .` has a name, and `--out current` -> repos/v3 replaces the folder it names (the link stays)
    final = given.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    cwd = Path.cwd()
    with _writing(final, given) as out, contextlib.ExitStack() as scratch:
        specs = contract.models
        report: dict = {"target": target, "kind": "gpu" if target == "tensorrt" else kind, "version": version,
                        "run": str(Path(run).resolve()), "contract": contract.to_dict(), "threshold": threshold,
                        "max_batch": serving.max_batch, "opt_batch": serving.opt_batch,
                        "serving": serving.__dict__, "versions": versions(), "parity": meta.get("parity", {}),
                        "models": {}, "files": {}, "trtexec": []}

        sources = {m: onnx_dir / meta["models"][m]["file"] for m in ONNX_MODELS}
        report["precision"] = {"precision": precision}
        if precision == "int8":  # the quantized graphs' folder goes however the build ends (a failed one's had stayed)
            folder = Path(scratch.enter_context(tempfile.TemporaryDirectory(prefix="cmg-int8-")))
            int8 = {m: folder / f"{m}.int8.onnx" for m in QUANTIZED}
            report["precision"] = quantize_graphs(run, sources, int8, contract, target=target, data=data)
            sources.update(int8)

        # TensorRT readiness is checked for every target (recorded), enforced for tensorrt.
        table = opcheck.load_table()
        op_problems = {m: opcheck.check_file(sources[m], table) for m in ONNX_MODELS}
        report["tensorrt_readiness"] = {"table": table.source, "problems": op_problems}
        if target == "tensorrt" and any(op_problems.values()):
            lines = [p for ps in op_problems.values() for p in ps]
            raise CMGError(f"graphs not TensorRT-ready ({len(lines)} problems): " + "; ".join(lines[:5]))

        cache = Path(timing_cache) if timing_cache else out / "trt_timing.cache"
        if cache.resolve().is_relative_to(final.resolve()):  # OUT's own is replaced: its copy's is updated
            cache = out / cache.resolve().relative_to(final.resolve())
        engines: list[tuple[str, Path, Path, dict, bool]] = []
        int8_models = set(report["precision"].get("models", ()))
        for name in ONNX_MODELS:
            spec = specs[name]
            model_dir = out / name
            vdir = model_dir / str(version)
            if vdir.exists():
                shutil.rmtree(vdir)
            vdir.mkdir(parents=True)
            src = sources[name]
            onnx_dst = vdir / "model.onnx"
            if name == CMLE_ENCODER and not cfgmod.threshold_optional_in(target):
                strip_threshold_initializer(src, onnx_dst)
            else:
                shutil.copyfile(src, onnx_dst)
            if target == "cpu":
                shutil.copyfile(MODEL_PY, vdir / "model.py")
            cfg = cfgmod.model_config(spec, target, serving, kind, threshold, cpu_threads)
            path = mcfg.write(cfg, model_dir)
            cfgmod.validate_config(path, spec, onnx_dst)
            if target == "tensorrt":
                inputs = {t.name: t.dims for t in spec.inputs}
                plan = vdir / "model.plan"
                engines.append((name, onnx_dst, plan, inputs, name in int8_models))
                report["trtexec"].append(
                    _trtexec(onnx_dst.relative_to(out), plan.relative_to(out), inputs, serving,
                             _script_path(cache, out), name in int8_models))
            report["models"][name] = {"config": str(path.relative_to(out)), "platform": cfg.platform or cfg.backend}

        fused = target == "cpu" and cpu_cmg == "fused"
        report["cpu_cmg"] = cpu_cmg if target == "cpu" else None
        if fused:
            report["models"][CMG] = _fused_cmg(out, version, specs[CMG], serving, kind, threshold, cpu_threads)
        for name in ENSEMBLES:
            if fused and name == CMG:
                continue
            cfg = cfgmod.model_config(specs[name], target, serving, kind, threshold)
            path = mcfg.write(cfg, out / name)
            cfgmod.validate_config(path, specs[name])
            (out / name / str(version)).mkdir(exist_ok=True)  # Triton wants a version dir for ensembles too
            report["models"][name] = {"config": str(path.relative_to(out)), "platform": "ensemble",
                                      "steps": [s.model_name for s in cfg.ensemble_scheduling.step]}

        missing = None
        if target == "tensorrt":
            script = out / "trtexec.sh"
            script.write_text("#!/usr/bin/env bash\n# Builds the same engines as `cmg build --target tensorrt`.\n"
                              "# A plan loads only in the TensorRT version that built it: run this in the TensorRT\n"
                              f"# container of the serving image's release ({TRT_IMAGE} for {k8s.TRITON_IMAGE}),\n"
                              "# e.g. docker run --gpus all -v \"$PWD\":/repo -w /repo IMAGE bash trtexec.sh\n"
                              "set -euo pipefail\ncd -- \"$(dirname -- \"$0\")\"\n" + "\n".join(report["trtexec"]) + "\n")
            script.chmod(0o755)

            missing = "engine build skipped (--skip-engines)" if skip_engines else trtmod.missing_prerequisites()
            if missing is None:
                report["engines"] = {}
                for name, onnx_path, plan, inputs, int8 in tqdm(engines, desc="TensorRT engines", unit="engine"):
                    report["engines"][name] = trtmod.build_engine(
                        onnx_path, plan, inputs, serving.max_batch, serving.opt_batch, serving.workspace_mb, cache,
                        int8=int8)
            report["engines_missing"] = missing

        dropped = drop_other_versions(out, list(report["models"]), {version})
        if dropped:
            print(f"cmg build: removed version folder(s) {', '.join(dropped)} (a `cmg deploy`'s or another "
                  f"build's): Triton serves a model's highest version, which would have hidden this build's "
                  f"version {version}", file=sys.stderr)
        report["files"] = file_checksums(out)
        (out / "build_report.json").write_text(json.dumps(report, indent=2))
    if cwd.is_relative_to(final):  # the working folder was the old OUT's (now gone): the same path in the new one
        os.chdir(cwd)
    if missing is not None and not skip_engines:
        raise CMGError(f"tensorrt target: {missing}; configs, ONNX files and {shlex.quote(str(given / 'trtexec.sh'))} are written "
                       "(run it on a host with TensorRT 10 and a GPU; --skip-engines asks for just that, "
                       "exit 0, with --k8s manifests)")
    return report


def drop_other_versions(out: Path, names: list[str], keep: set[int]) -> list[str]:
    """Remove every numeric version folder but those in `keep` of the models `names`: a build
    keeps its own (a deploy's version 2 left in OUT kept serving the deployed run over a
    rebuild's version 1), a deploy the new version and the one it replaced."""
    dropped = []
    for name in names:
        for entry in sorted((out / name).iterdir()):
            if entry.is_dir() and entry.name.isdigit() and int(entry.name) not in keep:
                shutil.rmtree(entry)
                dropped.append(f"{name}/{entry.name}")
    return dropped


def _fused_cmg(out: Path, version: int, spec, serving: ServingConfig, kind: str, threshold: float,
               cpu_threads: int) -> dict:
    """REPO/cmg as one Python-backend model on the fused scorer+encoder graph (the repository's
    own graphs, so int8 when they are); one graph, no pipeline: cores // instances threads."""
    import onnx  # heavy: only the fused cpu `cmg` model needs it, not importing cmg_build

    fused = dataclasses.replace(spec, steps=())
    vdir = out / CMG / str(version)
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    graphs = [out / m / str(version) / "model.onnx" for m in spec.steps]
    onnx.save(fuse(*graphs, spec), str(vdir / "model.onnx"))
    shutil.copyfile(MODEL_PY, vdir / "model.py")
    threads = resolve_threads(cpu_threads, serving.instances, stages=1)
    cfg = cfgmod.model_config(fused, "cpu", serving, kind, threshold, threads)
    path = mcfg.write(cfg, out / CMG)
    cfgmod.validate_config(path, fused, vdir / "model.onnx")
    return {"config": str(path.relative_to(out)), "platform": "python", "fused": list(spec.steps)}


def _trtexec(onnx_rel: Path, plan_rel: Path, inputs: dict, serving: ServingConfig, cache_rel: str,
             int8: bool = False) -> str:

    return trtexec_command(str(onnx_rel), str(plan_rel), inputs, serving.max_batch, serving.opt_batch,
                           serving.workspace_mb, cache_rel, int8)


def add_arguments(parser: argparse.ArgumentParser) -> None:

    parser.add_argument("--run", type=Path, required=True, help="training run (with onnx/ from `cmg export`)")
    parser.add_argument("--target", choices=cfgmod.TARGETS, default="cpu")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="repository folder (default model_repository/)")
    parser.add_argument("--kind", choices=("cpu", "gpu"), default="cpu", help="onnxruntime target: instance kind")
    parser.add_argument("--max-batch", type=triton_count, default=None)
    parser.add_argument("--opt-batch", type=triton_count, default=None)
    parser.add_argument("--instances", type=triton_count, default=None, help="instances per model")
    parser.add_argument("--version", type=triton_count, default=1, help="model version dir to write")
    parser.add_argument("--cpu-threads", type=nonnegative_int, default=0,
                        help="cpu target and onnxruntime --kind cpu: ONNX Runtime threads per instance "
                             "(0 = cores // instances for the fused "
                             "cmg, cores // (instances x 2) for ensemble steps, two of which run at once; written "
                             "resolved into config.pbtxt)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="int8: scorer and encoder as static Q/DQ int8 graphs calibrated on the run's "
                             "normal training images (cpu/onnxruntime: ONNX Runtime's uint8-activation recipe with "
                             "7-bit weights; tensorrt: symmetric int8 for explicit quantization; build/quantize.py)")
    parser.add_argument("--data", type=Path, default=None,
                        help="--precision int8: the data folder to calibrate on (default: the run's training "
                             "folder, if still there)")
    parser.add_argument("--cpu-cmg", choices=CPU_CMG, default=CPU_CMG[0],
                        help="cpu target: `cmg` as one fused scorer+encoder graph in one Python-backend model "
                             "(default: one stub hop per frame instead of two; `cmg bench fused-vs-ensemble` compares "
                             "them) or as the two-step ensemble of the GPU targets")
    parser.add_argument("--timing-cache", type=Path, default=None, help="TensorRT timing cache file")
    parser.add_argument("--skip-engines", action="store_true", help="tensorrt: write configs/trtexec.sh only")
    parser.add_argument("--k8s", type=Path, default=None, metavar="DIR",
                        help="also write Kubernetes manifests (official Triton image, N replicas, HPA) into DIR")
    parser.add_argument("--replicas", type=int, default=k8s.K8sOptions.replicas,
                        help="--k8s: Triton replicas (default %(default)s)")
    parser.add_argument("--max-replicas", type=int, default=None,
                        help="--k8s: the autoscaler's ceiling (default the larger of --replicas and 8)")


def run(args: argparse.Namespace) -> int:
    if args.replicas < 1:
        raise CMGError(f"--replicas must be >= 1, got {args.replicas}")
    if args.data is not None and args.precision != "int8":
        raise CMGError("--data is the int8 calibration's folder: it goes with --precision int8")
    # flags of one target or of --k8s, given where nothing reads them (they had been ignored)
    cpu_sessions = args.target == "cpu" or (args.target == "onnxruntime" and args.kind == "cpu")
    alone = [(args.cpu_threads, "--cpu-threads", cpu_sessions, "goes with --target cpu or onnxruntime --kind cpu"),
             (args.cpu_cmg != CPU_CMG[0], "--cpu-cmg", args.target == "cpu", "goes with --target cpu"),
             (args.timing_cache, "--timing-cache", args.target == "tensorrt", "goes with --target tensorrt"),
             (args.skip_engines, "--skip-engines", args.target == "tensorrt", "goes with --target tensorrt"),
             (args.replicas != k8s.K8sOptions.replicas or args.max_replicas is not None, "--replicas/--max-replicas",
              args.k8s is not None, "go with --k8s DIR")]
    for given, flag, read, what in alone:
        if given and not read:
            raise CMGError(f"{flag} {what} (here --target {args.target}{'' if args.k8s else ', no --k8s'})")
    max_replicas = args.max_replicas if args.max_replicas is not None else max(args.replicas, k8s.K8sOptions.max_replicas)
    if max_replicas < args.replicas:
        raise CMGError(f"--max-replicas {max_replicas} is below --replicas {args.replicas}")
    if args.k8s is not None:  # before the build: a bad DIR must not cost one
        k8s.check_out(args.k8s, [args.run, args.out])
    with reading(Path(args.run), refusal=RUN_BEING_TRAINED.format(run=args.run)):  # a training replaces its export
        report = build(args.run, args.target, args.out, args.kind, args.max_batch, args.opt_batch,
                       args.instances, args.version, args.cpu_threads, args.timing_cache, args.skip_engines,
                       args.precision, args.cpu_cmg, args.data)
    precision = report["precision"]
    int8 = (f"; int8 {', '.join(precision['models'])}, calibrated on {precision['calibration_images']} normal "
            "training images" if precision.get("precision") == "int8" else "")
    print(f"built {report['target']} repository {args.out} "
          f"({', '.join(report['models'])}; max batch {report['max_batch']}{int8}); "
          f"report {args.out / 'build_report.json'}")
    if precision.get("precision") == "int8" and precision["calibration_images"] < 16:
        print(f"note: int8 scales from only {precision['calibration_images']} images: check its accuracy "
              f"(`cmg bench sweep --run {args.run} --modes ort_inprocess,ort_int8`)")
    if report.get("engines_missing"):
        print(f"no TensorRT engines ({report['engines_missing']}): run {args.out / 'trtexec.sh'} on a host with "
              "TensorRT 10 and a GPU")
    if args.k8s is not None:
        gpus = 1 if report["kind"] == "gpu" else 0
        folder = Path(args.out).resolve().name
        paths = k8s.write(args.k8s, k8s.K8sOptions(replicas=args.replicas, max_replicas=max_replicas, gpus=gpus,
                                                   sub_path=folder, build_id=k8s.build_id(report["files"])))
        print(f"Kubernetes manifests: {', '.join(map(str, paths))} (copy {args.out} to the volume "
              f"'{k8s.K8sOptions.claim}' as its folder '{folder}'; a new build goes into a new folder)")
        if report["target"] == "cpu":  # the stock image has the Python backend but not onnxruntime for it
            print(f"note: the cpu target's models run ONNX Runtime inside Triton's Python backend, which "
                  f"{k8s.TRITON_IMAGE} lacks: build an image FROM it with `pip install onnxruntime`, or build with "
                  "--target onnxruntime for the stock image", file=sys.stderr)
    return 0

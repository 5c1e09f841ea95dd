"""`cmg export`: the three ONNX graphs, with everything from UINT8 frame to score inside.

Graphs: cmer_scorer (one-pass CMER), cmle_encoder (mask rule, upsampling, fill, encoder,
kNN distances to constant memory banks, fusion, threshold), cmer_teacher (the P+1-pass
occlusion scorer for the exact mode). Batch is the only dynamic dimension. THRESHOLD is
an input backed by an initializer holding the calibrated value, so ONNX Runtime uses it
when a request sends none and a line can override it per request without a rebuild.
Parity against the PyTorch modules is measured here and written to export.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from cmg import contract as C
from cmg.checksum import file_sha256
from cmg.dataset import MVTecFolder
from cmg.errors import CMGError, naming
from cmg.files import staged_folder
from cmg.locks import RUN_BEING_TRAINED, reading
from cmg_train.checkpoint import Run, load_run

OPSET = 17
PARITY_BATCHES = (1, 7)
# Parity rule, judged per float output against that output's own scale: max |ONNX - PyTorch|
# <= PARITY_REL_TOL x scale, scale = the range (max - min) of PyTorch's values over the
# parity frames, at least PARITY_MIN_SCALE (an output that is constant is held to
# 1e-3 x 1e-2 = 1e-5). An absolute 1e-4 refused runs whose scores span tens (float
# rounding grows with the values), while 1e-3 of the range is far below any threshold step.
PARITY_REL_TOL = 1e-3
PARITY_MIN_SCALE = 1e-2
PARITY_RULE = (f"max|onnx - torch| / max(range(torch), {PARITY_MIN_SCALE:g}) <= {PARITY_REL_TOL:g} per float output, "
               "range = max - min of the PyTorch values over the parity frames")


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str]) -> None:
    dynamic = {name: {0: "batch"} for name in inputs + outputs}
    # MultiheadAttention's fused inference fast path has no ONNX symbolic.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSET,
                          input_names=inputs, output_names=outputs, dynamic_axes=dynamic,
                          do_constant_folding=True)
    torch.backends.mha.set_fastpath_enabled(fastpath)


def _declare_shapes(model: onnx.ModelProto, spec: C.ModelSpec) -> None:
    """Declare every graph input/output as [batch, *contract dims]: the exporter leaves
    some output dims symbolic, and only the batch may be dynamic (TensorRT, Triton)."""
    tensors = {t.name: t for t in spec.inputs + spec.outputs}
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        want = tensors[vi.name].dims
        if len(dims) != len(want) + 1:
            raise CMGError(f"{spec.name}: {vi.name} has rank {len(dims)}, contract says {len(want) + 1}")
        dims[0].dim_param = "batch"
        for d, v in zip(dims[1:], want, strict=True):
            d.dim_value = v


def _add_threshold_default(model: onnx.ModelProto, value: float) -> None:
    """Make THRESHOLD optional: an initializer of the same name is its default (IR >= 4)."""
    model.graph.initializer.append(
        numpy_helper.from_array(np.array([[value]], dtype=np.float32), name=C.THRESHOLD))


def _simplify(path: Path, check) -> bool:
    """Simplify with onnxslim; keep the result only when parity still holds."""
    try:
        # heavy: only simplifying needs it; where it is missing the graph stays unsimplified
        import onnxslim
    except ImportError:
        return False
    original = path.read_bytes()
    try:
        slim = onnxslim.slim(onnx.load(str(path)))
        onnx.save(slim, str(path))
        onnx.checker.check_model(str(path), full_check=True)
        check()
        return True
    except Exception:  # noqa: BLE001 - any failure means: keep the unsimplified graph
        path.write_bytes(original)
        return False


def parity_frames(run: Run, n: int = 7, data: Path | None = None) -> np.ndarray:
    """Frames from the run's own data folder (or `data`): test images (normal and defective)
    where the folder has them, else training images. Never generated: parity is checked on
    the kind of frames the line will send."""
    ds = MVTecFolder(run.data_folder(data))
    try:
        samples = ds.samples("test")
    except CMGError:
        samples = ds.samples("train")
    pick = np.linspace(0, len(samples) - 1, num=min(n, len(samples))).round().astype(int)
    frames = ds.frames([samples[i] for i in pick], (run.cfg.data.image_size,) * 2)
    reps = -(-n // len(frames))
    return np.concatenate([frames] * reps)[:n]


def _ort(path: Path):
    import onnxruntime as ort  # heavy: only the parity check runs the exported graphs

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _compare(torch_out, ort_out, names: list[str]) -> dict:
    report = {}
    for name, t, o in zip(names, torch_out, ort_out, strict=True):
        t = t.detach().numpy()
        if t.dtype in (np.bool_, np.uint8):
            report[name] = {"mismatches": int((t.astype(np.int64) != o.astype(np.int64)).sum())}
        else:
            report[name] = {"max_abs_diff": float(np.abs(t - o).max()), "ref_min": float(t.min()),
                            "ref_max": float(t.max())}
    return report


def _merge(reports: list[dict]) -> dict:
    out: dict = {}
    for rep in reports:
        for name, vals in rep.items():
            for k, v in vals.items():
                have = out.setdefault(name, {}).get(k)
                out[name][k] = v if have is None else (min(have, v) if k == "ref_min" else max(have, v))
    for vals in out.values():  # the judged figure: the difference relative to the output's scale
        if "max_abs_diff" in vals:
            scale = max(vals.pop("ref_max") - vals.pop("ref_min"), PARITY_MIN_SCALE)
            vals["scale"] = scale
            vals["relative_diff"] = vals["max_abs_diff"] / scale
    return out


def parity_failures(report: dict) -> list[str]:
    """The outputs of one model's merged parity report that break PARITY_RULE, as text."""
    return [f"{name} differs by {v['max_abs_diff']:.2e} = {v['relative_diff']:.2e} of its scale "
            f"{v['scale']:.3g} (> {PARITY_REL_TOL:g})"
            for name, v in report.items() if v.get("relative_diff", 0.0) > PARITY_REL_TOL]


def export_run(run_dir: str | Path, out: Path | None = None, data: Path | None = None) -> dict:
    """Export into a temporary folder beside OUT (default RUN/onnx) and move it in whole:
    a failed export (parity, a kill, a full disk) never leaves a half-written OUT over a
    good one. export.json records the checkpoint's sha256 (`cmg build` compares it)."""
    run_path = Path(run_dir)
    final = Path(out) if out else run_path / "onnx"
    if final.exists() and not final.is_dir():
        raise CMGError(f"--out {final} is a file, not a folder")
    # The old export is replaced whole (and removed): only a folder that holds one, or nothing
    if final.resolve() in (run_path.resolve(), *run_path.resolve().parents):
        raise CMGError(f"--out {final} is the run folder or holds it: an export replaces its folder whole; "
                       f"choose a folder of its own (default {run_path / 'onnx'})")
    if final.is_dir() and any(final.iterdir()) and not (final / "export.json").is_file():
        raise CMGError(f"--out {final} holds files but no export (no export.json): an export replaces its "
                       "folder whole; choose an empty folder or an earlier export's")
    run = load_run(run_dir)
    if final.is_symlink():  # `--out current` -> exports/v3: replace the folder it names, keep the link
        final = final.resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    with staged_folder(final) as out:
        return _export_into(run, out, data)


def _export_into(run: Run, out: Path, data: Path | None = None) -> dict:
    contract = run.contract
    frames = parity_frames(run, max(PARITY_BATCHES), data)
    ft = torch.from_numpy(frames)
    scorer, encoder, teacher = run.scorer_graph(), run.detector, run.exact_graph()
    threshold = float(run.detector.threshold)
    if not math.isfinite(threshold):  # it would flag nothing on the line, without a word
        raise CMGError(f"run {run.path}: its threshold is {threshold}; retrain it (`cmg train`)")
    modules = {C.CMER_SCORER: scorer, C.CMLE_ENCODER: encoder, C.CMER_TEACHER: teacher}
    specs = {name: (module, [t.name for t in contract.models[name].inputs],
                    [t.name for t in contract.models[name].outputs]) for name, module in modules.items()}

    def inputs_for(name: str, b: int, with_threshold: bool = False):
        f = ft[:b]
        if name != C.CMLE_ENCODER:
            return (f,), {C.IMAGE: f.numpy()}
        with torch.no_grad():
            ps = scorer(f)
        th = torch.full((b, 1), threshold)
        feed = {C.IMAGE: f.numpy(), C.PATCH_SCORES: ps.numpy()}
        if with_threshold:
            feed[C.THRESHOLD] = th.numpy()
        return (f, ps, th), feed

    report: dict = {"contract": contract.to_dict(), "threshold": threshold, "opset": OPSET,
                    "models": {}, "parity": {}, "parity_rule": PARITY_RULE,
                    "serving": vars(run.cfg.serving).copy(), "run": str(run.path),
                    "checkpoint_sha256": file_sha256(run.path / "checkpoint.pt")}
    reference: dict[tuple, tuple] = {}  # PyTorch outputs, computed once: parity runs up to three times

    def torch_outputs(name: str, module: torch.nn.Module, args: tuple, key: tuple) -> tuple:
        if key not in reference:
            with torch.no_grad():
                t_out = module(*args)
            reference[key] = t_out if isinstance(t_out, tuple) else (t_out,)
        return reference[key]

    for name, (module, ins, outs) in specs.items():
        path = out / f"{name}.onnx"
        _export(module, inputs_for(name, 2)[0], path, ins, outs)
        model = onnx.load(str(path))
        _declare_shapes(model, contract.models[name])
        model.producer_name = "cmg-triton"
        onnx.save(model, str(path))
        onnx.checker.check_model(str(path), full_check=True)

        def parity(name=name, module=module, outs=outs, path=path, fed=(True,)) -> dict:
            sess = _ort(path)
            reps = []
            for b in PARITY_BATCHES:
                for with_th in (fed if name == C.CMLE_ENCODER else (False,)):
                    args, feed = inputs_for(name, b, with_th)
                    t_out = torch_outputs(name, module, args, (name, b, with_th))
                    reps.append(_compare(t_out, sess.run(outs, feed), outs))
            rep = _merge(reps)
            failures = parity_failures(rep)
            if failures:
                raise CMGError(f"{name}: ONNX Runtime differs from PyTorch: {'; '.join(failures)} "
                               f"(rule: {PARITY_RULE})")
            return rep

        parity()
        # Simplify while THRESHOLD is still a plain input: onnxslim would fold an
        # initializer-backed input into a constant and drop the override.
        simplified = _simplify(path, parity)
        if name == C.CMLE_ENCODER:
            model = onnx.load(str(path))
            _add_threshold_default(model, threshold)
            onnx.save(model, str(path))
            onnx.checker.check_model(str(path), full_check=True)
        report["parity"][name] = {**parity(fed=(False, True)), "batches": list(PARITY_BATCHES),
                                  "simplified": simplified}
        report["models"][name] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                                  "nodes": len(onnx.load(str(path)).graph.node)}
    with naming(out / "export.json"):
        (out / "export.json").write_text(json.dumps(report, indent=2))
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, type=Path, help="trained run folder (RUN/checkpoint.pt)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN/onnx)")
    p.add_argument("--data", type=Path, default=None,
                   help="data folder for the parity frames (default: the run's training folder, if still there)")


def run(args: argparse.Namespace) -> int:
    with reading(Path(args.run), refusal=RUN_BEING_TRAINED.format(run=args.run)):  # a training replaces the checkpoint
        report = export_run(args.run, args.out, args.data)
    out = args.out or args.run / "onnx"
    print(json.dumps({"onnx": str(out), "parity": report["parity"]}))
    print(parity_verdict(report["parity"], out), file=sys.stderr)
    return 0


def parity_verdict(parity: dict, out: Path) -> str:
    """One line for people (the JSON above is for scripts): the graphs agree with PyTorch."""
    rel = [v["relative_diff"] for model in parity.values() if isinstance(model, dict)
           for v in model.values() if isinstance(v, dict) and "relative_diff" in v]
    flips = sum(v.get("mismatches", 0) for model in parity.values() if isinstance(model, dict)
                for v in model.values() if isinstance(v, dict))
    return (f"cmg export: {len(parity)} graphs in {out}, each output within {max(rel, default=0.0):.1e} of its "
            f"scale of PyTorch's (the rule: {PARITY_REL_TOL:g}), {flips} flags or keep-mask cells differ. "
            f"Next: `cmg build --run {shlex.quote(str(out.parent if out.name == 'onnx' else out))}`")

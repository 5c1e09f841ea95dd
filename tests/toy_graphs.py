"""Contract-conforming toy ONNX graphs and export.json, for testing the build and the server.

Same inputs, outputs, dtypes, dynamic batch dim and THRESHOLD-with-initializer
convention as `cmg export`, but a few arithmetic nodes instead of trained networks,
so build/serve tests need neither torch nor a training run. The reference numpy
functions below compute what the graphs compute, so served results can be checked.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cmg.contract import (
    ANOMALY_MAP,
    ANOMALY_SCORE,
    CMER_SCORER,
    CMER_TEACHER,
    CMLE_ENCODER,
    EMBEDDING,
    IMAGE,
    IS_ANOMALY,
    KEEP_MASK,
    ONNX_ELEM_TYPES,
    PATCH_SCORES,
    THRESHOLD,
    Contract,
    TensorSpec,
)

TOY_OPSET = 17
KEEP_LEVEL = 0.3  # toy keep-mask rule: patch score above this level


def _value_info(spec: TensorSpec):
    from onnx import helper

    return helper.make_tensor_value_info(spec.name, ONNX_ELEM_TYPES[spec.dtype], ["batch", *spec.dims])


def _patch_means(c: Contract, image: str, out: str, invert: bool) -> list:
    """IMAGE uint8 [B,H,W,3] -> per-patch mean brightness in [0,1], [B,G,G]."""
    from onnx import helper

    g, ph, pw = c.grid, c.height // c.grid, c.width // c.grid
    mean_out = "p_mean_inv" if invert else out
    nodes = [
        helper.make_node("Cast", [image], ["p_f"], to=1),
        helper.make_node("ReduceMean", ["p_f"], ["p_gray"], axes=[3], keepdims=0),
        helper.make_node("Reshape", ["p_gray", "p_shape"], ["p_tiles"]),
        helper.make_node("ReduceMean", ["p_tiles"], ["p_sum"], axes=[2, 4], keepdims=0),
        helper.make_node("Div", ["p_sum", "p_255"], [mean_out]),
    ]
    if invert:
        nodes.append(helper.make_node("Sub", ["p_one", mean_out], [out]))
    inits = [
        helper.make_tensor("p_shape", 7, [5], [-1, g, ph, g, pw]),
        helper.make_tensor("p_255", 1, [], [255.0]),
    ]
    if invert:
        inits.append(helper.make_tensor("p_one", 1, [], [1.0]))
    return nodes, inits


def scorer_graph(c: Contract, name: str = CMER_SCORER, invert: bool = False):
    from onnx import helper

    spec = c.models[name]
    nodes, inits = _patch_means(c, IMAGE, PATCH_SCORES, invert)
    graph = helper.make_graph(nodes, name, [_value_info(t) for t in spec.inputs],
                              [_value_info(t) for t in spec.outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TOY_OPSET)])


def encoder_graph(c: Contract, threshold: float, seed: int = 0):
    """Toy encoder: keep = PATCH_SCORES > 0.3, map = scores*keep (each patch repeated to M x M),
    score = max(map), embed = W @ rgb mean."""
    from onnx import helper

    spec = c.models[CMLE_ENCODER]
    g, m, d = c.grid, c.map_size, c.embed_dim
    if m % g:
        raise ValueError(f"toy encoder: map_size {m} must be a multiple of grid {g}")
    r = m // g
    w = np.random.default_rng(seed).standard_normal((3, d)).astype(np.float32)
    patch_map = "e_patch_map" if r > 1 else ANOMALY_MAP
    nodes = [
        helper.make_node("Greater", [PATCH_SCORES, "e_level"], ["e_keep_b"]),
        helper.make_node("Cast", ["e_keep_b"], [KEEP_MASK], to=2),
        helper.make_node("Cast", ["e_keep_b"], ["e_keep_f"], to=1),
        helper.make_node("Mul", [PATCH_SCORES, "e_keep_f"], [patch_map]),
    ]
    if r > 1:  # nearest upsampling G -> M: [B,G,1,G,1] broadcast to [B,G,r,G,r]
        nodes += [
            helper.make_node("Reshape", [patch_map, "e_split"], ["e_cells"]),
            helper.make_node("Expand", ["e_cells", "e_rep"], ["e_rep_cells"]),
            helper.make_node("Reshape", ["e_rep_cells", "e_map_shape"], [ANOMALY_MAP]),
        ]
    nodes += [
        helper.make_node("Reshape", [ANOMALY_MAP, "e_flat"], ["e_map_flat"]),
        helper.make_node("ReduceMax", ["e_map_flat"], [ANOMALY_SCORE], axes=[1], keepdims=1),
        helper.make_node("Greater", [ANOMALY_SCORE, THRESHOLD], [IS_ANOMALY]),
        helper.make_node("Cast", [IMAGE], ["e_img_f"], to=1),
        helper.make_node("ReduceMean", ["e_img_f"], ["e_rgb"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["e_rgb", "e_w"], [EMBEDDING]),
    ]
    inits = [
        helper.make_tensor("e_level", 1, [], [KEEP_LEVEL]),
        helper.make_tensor("e_flat", 7, [2], [-1, m * m]),
        helper.make_tensor("e_w", 1, [3, d], w.ravel().tolist()),
        # Overridable default: THRESHOLD is also a graph input (IR >= 4).
        helper.make_tensor(THRESHOLD, 1, [1, 1], [float(threshold)]),
    ]
    if r > 1:
        inits += [helper.make_tensor("e_split", 7, [5], [-1, g, 1, g, 1]),
                  helper.make_tensor("e_rep", 7, [5], [1, g, r, g, r]),
                  helper.make_tensor("e_map_shape", 7, [3], [-1, m, m])]
    graph = helper.make_graph(nodes, CMLE_ENCODER, [_value_info(t) for t in spec.inputs],
                              [_value_info(t) for t in spec.outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", TOY_OPSET)]), w


def reference(c: Contract, images: np.ndarray, threshold: float, exact: bool = False) -> dict[str, np.ndarray]:
    """What the toy `cmg` (or `cmg_exact`) ensemble returns for uint8 frames [B,H,W,3]."""
    g = c.grid
    gray = images.astype(np.float32).mean(axis=3)
    tiles = gray.reshape(len(images), g, c.height // g, g, c.width // g).mean(axis=(2, 4)) / 255.0
    scores = (1.0 - tiles) if exact else tiles
    keep = scores > KEEP_LEVEL
    r = c.map_size // g
    amap = (scores * keep).repeat(r, axis=1).repeat(r, axis=2)
    score = amap.reshape(len(images), -1).max(axis=1, keepdims=True)
    return {PATCH_SCORES: scores.astype(np.float32), KEEP_MASK: keep.astype(np.uint8),
            ANOMALY_MAP: amap.astype(np.float32), ANOMALY_SCORE: score.astype(np.float32),
            IS_ANOMALY: score > threshold}


def write_toy_export(out: Path, contract: Contract | None = None, threshold: float = 0.5,
                     serving: dict | None = None) -> Path:
    """Write OUT/{cmer_scorer,cmle_encoder,cmer_teacher}.onnx + export.json like `cmg export`."""
    import onnx

    contract = contract or Contract(64, 64, 8, 16)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    encoder, _ = encoder_graph(contract, threshold)
    graphs = {CMER_SCORER: scorer_graph(contract), CMLE_ENCODER: encoder,
              CMER_TEACHER: scorer_graph(contract, CMER_TEACHER, invert=True)}
    models = {}
    for name, model in graphs.items():
        onnx.checker.check_model(model, full_check=True)
        path = out / f"{name}.onnx"
        onnx.save(model, path)
        models[name] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    meta = {
        "contract": contract.to_dict(),
        "threshold": float(threshold),
        "opset": TOY_OPSET,
        "models": models,
        "parity": {name: {"max_abs_diff": 0.0, "batches": [1, 7], "toy": True} for name in graphs},
        "serving": serving or {"max_batch": 16, "opt_batch": 4, "queue_delay_us": 500,
                               "instances": 1, "workspace_mb": 256},
    }
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    return out


def engine_shaped_repo(root: Path, contract: Contract, threshold: float, max_batch: int = 8) -> Path:
    """ROOT/repo: the `onnxruntime` target's repository of a toy export (the GPU targets'
    ensemble: scorer -> encoder, THRESHOLD required, the calibrated one in the ensemble's
    `default_threshold`), its two ONNX models served by the Python backend instead (the
    server here has no ORT or TensorRT backend), THRESHOLD required on them too, as on engines,
    with the warmup samples the build wrote for the GPU."""
    import shutil

    from cmg import model_config as mcfg
    from cmg.config import ServingConfig
    from cmg.contract import ONNX_MODELS
    from cmg_build import config as cfgmod
    from cmg_build import repository

    write_toy_export(root / "run" / "onnx", contract, threshold=threshold)
    repo = root / "repo"
    repository.build(root / "run", "onnxruntime", repo, kind="gpu", max_batch=max_batch)
    serving = ServingConfig(max_batch=max_batch, opt_batch=4)
    for name in ONNX_MODELS:
        built = mcfg.read(repo / name / "config.pbtxt")
        cfg = cfgmod.model_config(contract.models[name], "cpu", serving, cpu_threads=1)
        for t in cfg.input:
            t.optional = False
        cfg.model_warmup.extend(built.model_warmup)  # the server runs the GPU targets' warmup as written
        mcfg.write(cfg, repo / name)
        shutil.copyfile(repository.MODEL_PY, repo / name / "1" / "model.py")
    return repo

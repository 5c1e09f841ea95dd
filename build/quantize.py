"""`cmg build --precision int8`: the scorer and encoder graphs as static Q/DQ int8 ONNX.

ONNX Runtime's `quantize_static` (QuantFormat.QDQ) inserts QuantizeLinear/DequantizeLinear
pairs around the arithmetic-heavy ops (Conv, MatMul, Gemm), with scales calibrated
(MinMax) on the run's normal training images, read through the project's one frame
conversion (`MVTecFolder.frames`, the same uint8 frames clients send). The encoder's
PATCH_SCORES input comes from the fp32 scorer on the same frames, as in serving.

Two recipes, one per runtime (RECIPES), both with weights per output channel:
- tensorrt: int8 activations and weights, both symmetric (zero point 0), which is what
  TensorRT 10's explicit quantization takes.
- cpu: uint8 asymmetric activations and int8 weights with `reduce_range` (7-bit weights),
  ONNX Runtime's own CPU recipe. On x86 without VNNI (AVX2 only) ONNX Runtime multiplies
  u8 x s8 pairs with VPMADDUBSW, whose int16 sums saturate with full 8-bit weights; the
  symmetric recipe lost 0.05 image AUROC on `out/small_s0` (score correlation with fp32
  0.84), this one 0.001 (correlation 0.99), and it runs faster there.
Both recipes leave the thin convolutions float32 (`float_convs`): depthwise convolutions and
first layers, whose few input channels per output make one weight row and one activation
range per channel the whole story. Quantizing them is what moved the backbone's features away
from the float32 patch bank: on `../shared/data/parts` (seed-0 run) the int8 graph scored
0.652 image AUROC against fp32's 0.719 (score correlation 0.59); with them float32, 0.723
(correlation 0.98). They are a small share of the FLOPs: the kNN MatMul and the 1x1
convolutions, quantized, are most of it.
The occlusion teacher (`cmer_teacher`, the exact mode's P+1 passes) stays float32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from cmg import contract as C
from cmg.dataset import MVTecFolder, resolve_data
from cmg.errors import CMGError
from cmg.locks import DATA_BEING_WRITTEN, reading
from cmg.quiet import quiet_logs

PRECISIONS = ("fp32", "int8")
QUANTIZED = (C.CMER_SCORER, C.CMLE_ENCODER)
OP_TYPES = ("Conv", "MatMul", "Gemm")
CALIBRATION_IMAGES = 64  # evenly spread over the training normals
CHUNK = 8  # frames per calibration batch
THIN_CONV = 8  # a Conv with at most this many input channels per group stays float32


def calibration_frames(run: Path, contract: C.Contract, limit: int = CALIBRATION_IMAGES,
                       data: Path | None = None) -> np.ndarray:
    """uint8 [N, H, W, 3] normal training frames of the run's data, or of `data` (at most
    `limit`, evenly spread)."""

    data = resolve_data(Path(run), data)
    with reading(data, refusal=DATA_BEING_WRITTEN.format(data=data)):  # a synth meanwhile: two data sets' frames
        folder = MVTecFolder(data)
        samples = [s for s in folder.samples("train") if s.label == 0]
        if not samples:
            raise CMGError(f"{data}: no normal training images to calibrate int8 scales on")
        pick = np.unique(np.linspace(0, len(samples) - 1, min(limit, len(samples))).round().astype(int))
        return folder.frames([samples[i] for i in pick], (contract.height, contract.width))


def _reader(feeds: list[dict[str, np.ndarray]]):
    """ONNX Runtime's CalibrationDataReader over precomputed feed dicts (ORT imported lazily)."""
    # heavy (imports onnx): only --precision int8 builds need it
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    return Reader()


# runtime -> (activation type, activations symmetric, reduce_range); weights: int8 symmetric per channel
RECIPES = {
    "tensorrt": ("QInt8", True, False),
    "cpu": ("QUInt8", False, True),
}


def recipe_for(target: str) -> str:
    """The recipe a build target's runtime takes: TensorRT's, or ONNX Runtime's CPU one
    (the cpu target; the onnxruntime target may run on CPU instances as well)."""
    return "tensorrt" if target == "tensorrt" else "cpu"


def float_convs(model) -> list[str]:
    """Names of the Conv nodes of an onnx ModelProto that stay float32: depthwise convolutions
    and first layers (at most THIN_CONV input channels per group; weight [O, I/group, k, k])."""
    shapes = {init.name: init.dims for init in model.graph.initializer}
    return [n.name for n in model.graph.node
            if n.op_type == "Conv" and n.input[1] in shapes and shapes[n.input[1]][1] <= THIN_CONV]


def quantize_file(src: Path, dst: Path, feeds: list[dict[str, np.ndarray]], recipe: str = "cpu") -> int:
    """Static Q/DQ quantization of `src` into `dst` with `recipe` (RECIPES), calibrated on
    `feeds`, the thin convolutions left float32; checked by onnx.checker. Returns how many
    convolutions stayed float32."""
    # heavy (onnx, onnxruntime.quantization): only --precision int8 builds need them
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    keep_float = float_convs(onnx.load(str(src)))
    activation, symmetric, reduce_range = RECIPES[recipe]
    # quantize_static logs "Please consider pre-processing before quantization" per graph: the
    # graphs are exported shape-inferred, and users read such lines as their own mistake.
    with quiet_logs(logging.WARNING):
        quantize_static(str(src), str(dst), _reader(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=getattr(QuantType, activation), weight_type=QuantType.QInt8,
                        per_channel=True, reduce_range=reduce_range, op_types_to_quantize=list(OP_TYPES),
                        nodes_to_exclude=keep_float, calibrate_method=CalibrationMethod.MinMax,
                        # TensorRT: biases stay float. An INT32 bias through DequantizeLinear is
                        # ONNX Runtime's form (its QLinearConv fusion wants it), which TensorRT's
                        # parser refuses: it dequantizes INT8 (and FP8, INT4) only
                        extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True,
                                       "QuantizeBias": recipe != "tensorrt"})
    onnx.checker.check_model(onnx.load(str(dst)))
    return len(keep_float)


def quantize_graphs(run: Path, graphs: dict[str, Path], out: dict[str, Path], contract: C.Contract,
                    limit: int = CALIBRATION_IMAGES, target: str = "cpu", data: Path | None = None) -> dict:
    """Quantize the fp32 `graphs[m]` (scorer, encoder) into `out[m]` with the recipe of
    `target`'s runtime; returns what was done."""
    import onnxruntime as ort  # heavy: only --precision int8 runs it (calibration feeds)

    frames = calibration_frames(run, contract, limit, data)
    chunks = [frames[i:i + CHUNK] for i in range(0, len(frames), CHUNK)]
    recipe = recipe_for(target)
    # Errors only, for this session and the calibration sessions quantize_static makes: ONNX
    # Runtime warns that THRESHOLD is an input with a default (an initializer), by design.
    ort.set_default_logger_severity(3)
    try:
        scorer = ort.InferenceSession(str(graphs[C.CMER_SCORER]), providers=["CPUExecutionProvider"])
        patch_scores = [scorer.run([C.PATCH_SCORES], {C.IMAGE: x})[0] for x in chunks]
        feeds = {C.CMER_SCORER: [{C.IMAGE: x} for x in chunks],
                 C.CMLE_ENCODER: [{C.IMAGE: x, C.PATCH_SCORES: ps}
                                  for x, ps in zip(chunks, patch_scores, strict=True)]}
        kept = {name: quantize_file(graphs[name], out[name], feeds[name], recipe) for name in QUANTIZED}
    finally:
        ort.set_default_logger_severity(2)
    activation, symmetric, reduce_range = RECIPES[recipe]
    return {"precision": "int8", "format": "QDQ", "models": list(QUANTIZED), "op_types": list(OP_TYPES),
            "calibration_images": len(frames), "calibration": "MinMax on normal training frames",
            "recipe": recipe,
            "activations": f"{'int8' if activation == 'QInt8' else 'uint8'} "
                           f"{'symmetric' if symmetric else 'asymmetric'}",
            "weights": "int8 symmetric per channel" + (", reduce_range (7-bit)" if reduce_range else ""),
            "float_convs": kept}

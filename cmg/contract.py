"""The serving contract: model names, tensor names, dtypes and shapes.

Single source of truth for export, build, Triton configs, clients and tests
(DESIGN.md section 2). Deliberately imports no torch: clients and the Triton
Python backend use it on machines without PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Model names in the Triton repository.
CMER_SCORER = "cmer_scorer"
CMLE_ENCODER = "cmle_encoder"
CMER_TEACHER = "cmer_teacher"
CMG = "cmg"
CMG_EXACT = "cmg_exact"
ONNX_MODELS = (CMER_SCORER, CMLE_ENCODER, CMER_TEACHER)
ENSEMBLES = (CMG, CMG_EXACT)

# Tensor names.
IMAGE = "IMAGE"
PATCH_SCORES = "PATCH_SCORES"
THRESHOLD = "THRESHOLD"
ANOMALY_SCORE = "ANOMALY_SCORE"
IS_ANOMALY = "IS_ANOMALY"
ANOMALY_MAP = "ANOMALY_MAP"
KEEP_MASK = "KEEP_MASK"


def threshold_value(value: object) -> float:
    """THRESHOLD as the FP32 the graphs compare with: the one check every entry shares
    (CLI `--threshold`, the dashboard's slider endpoint, the client library).

    A number that is finite as float64 but not as FP32 (1e39) becomes inf on the wire and
    every frame an error; NaN never flags and inf flags nothing or all. Strings of numbers
    are accepted (command line, config parameters); bools and other types are not.
    Raises ValueError with one line naming the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str, np.floating, np.integer)):
        raise ValueError(f"threshold {value!r} is not a number")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"threshold {value!r} is not a number") from None
    if not np.isfinite(number) or abs(number) > float(np.finfo(np.float32).max):
        raise ValueError(f"threshold {value!r} is not a finite number in FP32 "
                         f"(|value| <= {float(np.finfo(np.float32).max):.4g})")
    return number
EMBEDDING = "EMBEDDING"

# Output order of the cmle_encoder graph (cmg_train.detector.DetectorOutput follows it).
ENCODER_OUTPUTS = (ANOMALY_SCORE, IS_ANOMALY, ANOMALY_MAP, KEEP_MASK, EMBEDDING)

# Triton datatype string -> numpy dtype.
NUMPY_DTYPES: dict[str, np.dtype] = {
    "UINT8": np.dtype(np.uint8),
    "FP32": np.dtype(np.float32),
    "BOOL": np.dtype(np.bool_),
}
# Triton datatype string -> onnx.TensorProto enum value (kept numeric: no onnx import).
ONNX_ELEM_TYPES: dict[str, int] = {"UINT8": 2, "FP32": 1, "BOOL": 9}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model; `dims` excludes the batch dimension."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def np_dtype(self) -> np.dtype:
        return NUMPY_DTYPES[self.dtype]

    def check(self, array: np.ndarray, batched: bool = True) -> None:
        """Raise ValueError naming the tensor when `array` breaks the contract."""
        want = ((-1,) if batched else ()) + self.dims
        if array.dtype != self.np_dtype:
            raise ValueError(f"{self.name}: dtype {array.dtype}, expected {self.np_dtype} ({self.dtype})")
        if array.ndim != len(want) or any(w not in (-1, g) for w, g in zip(want, array.shape, strict=True)):
            shown = ["batch" if w == -1 else str(w) for w in want]
            raise ValueError(f"{self.name}: shape {list(array.shape)}, expected [{', '.join(shown)}]")


@dataclass(frozen=True)
class ModelSpec:
    """A served model: its inputs and outputs (all batched on the first dimension)."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[str, ...] = field(default=())  # ensemble members, in order

    @property
    def is_ensemble(self) -> bool:
        return bool(self.steps)

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def output(self, name: str) -> TensorSpec:
        return next(t for t in self.outputs if t.name == name)


@dataclass(frozen=True)
class Contract:
    """All models for one trained run: H x W frames, G x G patch grid, D-dim embedding,
    M x M anomaly map (M defaults to G)."""

    height: int
    width: int
    grid: int
    embed_dim: int
    map_size: int = 0

    def __post_init__(self) -> None:
        if not self.map_size:
            object.__setattr__(self, "map_size", self.grid)

    def image(self) -> TensorSpec:
        return TensorSpec(IMAGE, "UINT8", (self.height, self.width, 3))

    def patch_scores(self) -> TensorSpec:
        return TensorSpec(PATCH_SCORES, "FP32", (self.grid, self.grid))

    def threshold(self) -> TensorSpec:
        return TensorSpec(THRESHOLD, "FP32", (1,), optional=True)

    def _scores(self) -> tuple[TensorSpec, ...]:
        return (
            TensorSpec(ANOMALY_SCORE, "FP32", (1,)),
            TensorSpec(IS_ANOMALY, "BOOL", (1,)),
            TensorSpec(ANOMALY_MAP, "FP32", (self.map_size, self.map_size)),
        )

    @property
    def models(self) -> dict[str, ModelSpec]:
        g = self.grid
        keep = TensorSpec(KEEP_MASK, "UINT8", (g, g))
        scorer = ModelSpec(CMER_SCORER, (self.image(),), (self.patch_scores(),))
        teacher = ModelSpec(CMER_TEACHER, (self.image(),), (self.patch_scores(),))
        encoder = ModelSpec(
            CMLE_ENCODER,
            (self.image(), self.patch_scores(), self.threshold()),
            self._scores() + (keep, TensorSpec(EMBEDDING, "FP32", (self.embed_dim,))),
        )
        ens_out = self._scores() + (self.patch_scores(), keep)
        ens_in = (self.image(), self.threshold())
        return {
            CMER_SCORER: scorer,
            CMLE_ENCODER: encoder,
            CMER_TEACHER: teacher,
            CMG: ModelSpec(CMG, ens_in, ens_out, steps=(CMER_SCORER, CMLE_ENCODER)),
            CMG_EXACT: ModelSpec(CMG_EXACT, ens_in, ens_out, steps=(CMER_TEACHER, CMLE_ENCODER)),
        }

    def to_dict(self) -> dict[str, int]:
        return {"height": self.height, "width": self.width, "grid": self.grid, "embed_dim": self.embed_dim,
                "map_size": self.map_size}

    @classmethod
    def from_dict(cls, d: dict) -> Contract:
        return cls(int(d["height"]), int(d["width"]), int(d["grid"]), int(d["embed_dim"]),
                   int(d.get("map_size", 0)))

"""Run configuration: small YAML files under `configs/`, loaded into dataclasses.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    preset: str = "tiny"          # synthetic preset used by `cmg demo` and tests
    image_size: int = 64          # frames are image_size x image_size UINT8 RGB
    category: str = "hex_nut"     # product line of the synthetic preset
    val_fraction: float = 0.15    # held-out normals: score normalisation and threshold


@dataclass
class TeacherConfig:
    source: str = "scratch"       # scratch (trained here) | open_clip (arch + pretrained/checkpoint)
    arch: str | None = None       # open_clip architecture name, e.g. ViT-B-32
    pretrained: str | None = None # open_clip pretrained tag, e.g. laion2b_s34b_b79k
    checkpoint: str | None = None # local weights file for `arch`
    embed_dim: int = 64
    width: int = 64
    layers: int = 2
    heads: int = 4
    patch_size: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32
    scenes: int = 6000            # synthetic scenes (all categories) for training from scratch
    epochs: int = 2
    batch_size: int = 128
    lr: float = 1e-3


@dataclass
class ScorerConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    epochs: int = 30
    batch_size: int = 64
    lr: float = 2e-3
    extra_scenes: int = 0         # extra teacher-labelled scenes beyond the training images


@dataclass
class CMERConfig:
    enabled: bool = True
    rule: str = "relative"        # relative (alpha * max, grown) | top_rho
    alpha: float = 0.2
    rho: float = 0.4
    grow: bool = True             # grow the keep-mask by one patch (3x3 max-pool)
    occlusion_batch: int = 512    # teacher passes per forward when computing relevance
    scorer: ScorerConfig = field(default_factory=ScorerConfig)


@dataclass
class CMLEConfig:
    enabled: bool = True
    text_encoder: str = "minilm"  # minilm (offline sentence encoder) | teacher (teacher's text tower)
    k: int = 5                    # caption neighbours in the LLE graph
    reg: float = 1e-3             # LLE regulariser, relative to the local Gram trace
    min_unique_captions: int = 20
    lam: float = 1.0              # weight of the CMLE term
    embed_dim: int = 64           # D, the global embedding z
    patch_dim: int = 64           # per-patch feature size
    patch_source: str = "embedding"  # local features: embedding (teacher patch embedding) | tokens
    patch_layer: int = -1         # with patch_source tokens: the block whose tokens are used (-1: last)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class ScoringConfig:
    k_global: int = 5             # neighbours for the global kNN score
    coreset: int = 2000           # M, rows of the patch memory bank after greedy coreset
    fpr: float = 0.05             # threshold: this false-positive rate on held-out normals
    fusion: str = "mean"          # image score from normalised global and local scores: mean | max


@dataclass
class ServingConfig:
    max_batch: int = 32
    opt_batch: int = 8
    queue_delay_us: int = 500
    instances: int = 1
    workspace_mb: int = 1024      # TensorRT builder workspace


@dataclass
class Config:
    name: str = "tiny"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    cmer: CMERConfig = field(default_factory=CMERConfig)
    cmle: CMLEConfig = field(default_factory=CMLEConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def grid(self) -> int:
        """G: the CMER grid equals the teacher's ViT patch grid, so patch features align."""
        return self.data.image_size // self.teacher.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"config {where or 'root'}: unknown key(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}.{name}".lstrip("."))
        else:
            kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any]) -> Config:
    cfg = _build(Config, values, "")
    if cfg.data.image_size % cfg.teacher.patch_size:
        raise ValueError(
            f"config: data.image_size {cfg.data.image_size} is not a multiple of "
            f"teacher.patch_size {cfg.teacher.patch_size}"
        )
    return cfg


def load_config(path: str | Path) -> Config:
    """Load a YAML config; a missing or malformed file raises with the path named."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path}: not valid YAML ({exc})") from exc
    return config_from_dict(values)


CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_config(name_or_path: str | Path) -> Path:
    """Accept `tiny`, `configs/tiny.yaml` or any path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    return CONFIG_DIR / f"{name_or_path}.yaml"

"""Run configuration: small YAML files under `configs/`, loaded into dataclasses.

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import yaml

from cmg.config_check import check_section


@dataclass
class DataConfig:
    image_size: int = 64          # frames are image_size x image_size UINT8 RGB
    val_fraction: float = 0.15    # held-out normals: score normalisation and threshold
    preset: str = "tiny"          # synthetic preset of `cmg demo` and the tests (sample data only)
    category: str = "hex_nut"     # product line of that preset


@dataclass
class BackboneConfig:
    """The frozen ImageNet backbone a package ships (cmg_train/backbone.py): features of the
    local memory bank and of the backbone teacher's image side."""

    variant: str = "efficientnet_lite0"   # efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2
    upsample: int = 2             # frames are resized to upsample x image_size before the backbone
    strides: list[int] = field(default_factory=lambda: [8, 16])  # patch features: the last block at each stride
                                  # (4: finer detail, averaged onto the stride-8 map)
    taps: list[int] | None = None # block indices instead of `strides` (when set)
    ensemble: list[str] | None = None  # more variants for the patch bank, each with its own bank at
                                  # the same strides (PatchCore's backbone ensemble); the teacher
                                  # uses `variant` alone


@dataclass
class TeacherConfig:
    source: str = "backbone"      # backbone (frozen pretrained image features + projection trained
                                  # here, MiniLM text frozen) | scratch (small CNN trained here) | open_clip
    arch: str | None = None       # open_clip architecture name, e.g. ViT-B-32
    pretrained: str | None = None # open_clip pretrained tag, e.g. laion2b_s34b_b79k
    checkpoint: str | None = None # local weights file for `arch`
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 96])  # scratch image tower
    downsample: int = 1           # image tower (backbone or scratch): average-pool frames by this factor first
    hidden: int = 512             # backbone teacher: width of the projection MLP
    pool: str = "grid"            # backbone teacher: grid (deepest tap on a 4 x 4 grid, one MLP) |
                                  # attention (each CMER cell embedded, attention-pooled: it localises)
    steps: int = 300
    batch_size: int = 64
    lr: float = 2e-3
    shift: int = 4                # augmentation: max shift in pixels (captions name positions)
    brightness: float = 0.1       # augmentation: max relative brightness change
    fill_prob: float = 0.6        # occlusion practice: share of images with filled patches
    fill_max_share: float = 0.3   # ... and at most this share of their patches


@dataclass
class ScorerConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    steps: int = 600
    batch_size: int = 64
    lr: float = 2e-3


@dataclass
class CMERConfig:
    enabled: bool = True
    grid: int = 8                 # G: the CMER patch grid, G x G patches (the one source of G)
    rule: str = "relative"        # relative (alpha * max, grown) | top_rho
    alpha: float = 0.2
    rho: float = 0.4
    grow: bool = True             # grow the keep-mask by one patch (3x3 max-pool)
    relevance: str = "occlusion"  # what the scorer learns: occlusion (the paper's P+1 passes) |
                                  # attention (the attention teacher's cell weights; teacher.pool: attention)
    occlusion_batch: int = 512    # teacher passes per forward when computing relevance
    scorer: ScorerConfig = field(default_factory=ScorerConfig)


@dataclass
class LocalConfig:
    model: str = "bank"           # bank: kNN to a coreset of normal backbone patch features (PatchCore)
                                  # | unet: a U-Net trained here on synthetic anomalies
    bank_size: int = 10000        # bank: greedy-coreset rows kept of all training patches
    max_patches: int = 2_000_000  # bank: the coreset is chosen among at most this many training patches, an even
                                  # random share of every frame's (0: all): memory and time stay bounded on a
                                  # folder of thousands of images (2,000,000 x 352 FP32 features: 2.8 GB)
    k: int = 1                    # bank: neighbours averaged for a patch's distance
    colour: str = "rgb"           # bank: rgb | grey (the backbone sees the luma only: for lines whose
                                  # normal parts vary in colour; hue-only defects are then missed)
    self_radius: int = 0          # bank: ANOMALY_MAP weighted by each patch's distance to its own frame's
                                  # patches beyond this many cells (0: off); the image score is unchanged
    score: str = "max_minus_p90"  # image local score: max of the kept map | max_minus_p90 (minus the
                                  # map's 90th percentile: a whole part slightly off is not a defect)
    score_sigma: float = 0.0      # also read that score off the map blurred by this many cells, and keep the
                                  # larger, each standardised on the held-out normals (0: off): a tint spread
                                  # thin over many cells adds up where a crack's one cell stays the peak
    channels: list[int] = field(default_factory=lambda: [16, 32, 64])  # widths at 1/2, 1/4, 1/8
    steps: int = 2000
    batch_size: int = 32
    crop: int = 64                # training crops (pixels); the served model sees whole frames
    lr: float = 3e-3
    anomaly_prob: float = 0.5     # share of training crops given a synthetic anomaly
    shapes: int = 3000            # synthetic anomaly shapes drawn once per run
    placement: str = "uniform"    # uniform: practise anywhere | keep: inside the CMER keep-mask
    pool: int = 5                 # local image score: max of the pool x pool mean-filtered map


@dataclass
class CMLEConfig:
    enabled: bool = True
    text_encoder: str = "minilm"  # caption embeddings: minilm (offline sentence encoder) | teacher
    k: int = 5                    # caption neighbours in the LLE graph
    reg: float = 1e-3             # LLE regulariser, relative to the local Gram trace
    min_unique_captions: int = 20
    lam: float = 1.0              # weight of the CMLE term
    embed_dim: int = 64           # D, the global embedding z
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3


@dataclass
class ScoringConfig:
    k_global: int = 5             # neighbours for the global kNN score
    fpr: float = 0.05             # threshold: at most this false-positive rate on new normals (split-conformal)
    train_frames: int = 200       # bank: also calibrate the threshold on up to this many training frames, each
                                  # scored with its own rows out of both banks (0: the held-out normals alone)
    fusion: str = "auto"          # image score from the normalised global and local scores: auto (weighted sum,
                                  # weight chosen on synthetic anomalies of held-out normals) | max | mean | local
    map_size: int = 16            # ANOMALY_MAP is map_size x map_size (divides the local map's side)
    map_sigma: float = 0.0        # Gaussian blur of ANOMALY_MAP, in map cells (0: none); not the image score


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
    local: LocalConfig = field(default_factory=LocalConfig)
    cmle: CMLEConfig = field(default_factory=CMLEConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def grid(self) -> int:
        """G, the CMER grid: one source (cmer.grid) for the scorer, the teacher's occlusion
        queries, the keep-mask and the contract."""
        return self.cmer.grid

    @property
    def local_map_side(self) -> int:
        """Side of the local anomaly map: stride 8 of the upsampled frame (bank), or H/2 (unet)."""
        if self.local.model == "bank":
            return self.data.image_size * self.backbone.upsample // 8
        return self.data.image_size // 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def gaussian_kernel_size(sigma: float) -> int:
    """Taps of the Gaussian blur of `sigma` (cells): what `cmg_train/filters.py` builds, and what
    the config checks against the map it must fit (reflect padding needs it shorter than the map)."""
    return int(2 * round(3 * sigma) + 1)


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
    """Validate the whole mapping (types, ranges, choices: cmg.config_check), then build."""
    check_section(Config, values)
    cfg = _build(Config, values, "")
    size, grid = cfg.data.image_size, cfg.cmer.grid
    if size % grid:
        raise ValueError(f"config: data.image_size {size} is not a multiple of cmer.grid {grid}")
    if size % 8:
        raise ValueError(f"config: data.image_size {size} must be a multiple of 8 (local model strides)")
    if cfg.cmer.relevance == "attention" and (cfg.teacher.source, cfg.teacher.pool) != ("backbone", "attention"):
        raise ValueError(f"config: cmer.relevance attention reads the attention teacher's weights; it needs "
                         f"teacher.source backbone and teacher.pool attention, got {cfg.teacher.source} / "
                         f"{cfg.teacher.pool}")
    side = cfg.local_map_side
    if side % cfg.scoring.map_size:
        raise ValueError(f"config: scoring.map_size {cfg.scoring.map_size} must divide the local map's side "
                         f"{side} (local.model {cfg.local.model})")
    if cfg.local.self_radius and (cfg.local.model != "bank" or 2 * cfg.local.self_radius + 1 >= side):
        raise ValueError(f"config: local.self_radius {cfg.local.self_radius} needs local.model bank and a radius "
                         f"that leaves cells to compare with on the {side} x {side} map (2 r + 1 < {side})")
    if cfg.backbone.ensemble and (cfg.local.model != "bank" or cfg.local.colour == "grey+rgb"):
        raise ValueError(f"config: backbone.ensemble needs local.model bank and local.colour rgb or grey, got "
                         f"{cfg.local.model} / {cfg.local.colour}")
    if cfg.local.score_sigma and gaussian_kernel_size(cfg.local.score_sigma) > side:
        raise ValueError(f"config: local.score_sigma {cfg.local.score_sigma} is too wide for the local map "
                         f"({side} x {side}; its kernel must be shorter than the map)")
    if cfg.scoring.map_sigma and gaussian_kernel_size(cfg.scoring.map_sigma) > cfg.scoring.map_size:
        raise ValueError(f"config: scoring.map_sigma {cfg.scoring.map_sigma} is too wide for the "
                         f"{cfg.scoring.map_size} x {cfg.scoring.map_size} map (its kernel must be shorter than the map)")
    # What would otherwise fail only after the teacher and the scorer have trained:
    if cfg.local.model == "unet" and (cfg.local.crop % 8 or len(cfg.local.channels) != 3):
        raise ValueError(f"config: local.model unet needs local.crop a multiple of 8 and 3 local.channels (its "
                         f"three poolings), got crop {cfg.local.crop} and channels {cfg.local.channels}")
    strides = {2, 4, 8, 16, 32}  # every EfficientNet-Lite variant's block strides
    teacher_side = size // cfg.teacher.downsample  # what the backbone teacher sees
    if cfg.teacher.source == "backbone" and cfg.teacher.pool == "grid" and teacher_side < max(strides):
        raise ValueError(f"config: teacher.downsample {cfg.teacher.downsample} leaves the teacher a {teacher_side} px "
                         f"frame of data.image_size {size}; its backbone needs at least {max(strides)} px")
    if cfg.teacher.source == "backbone" and cfg.teacher.pool == "attention" and (
            teacher_side % grid or teacher_side // grid not in strides):
        raise ValueError(f"config: teacher.pool attention puts a backbone block on the {grid} x {grid} CMER grid: "
                         f"the teacher's {teacher_side} px frame (data.image_size {size} / teacher.downsample "
                         f"{cfg.teacher.downsample}) needs {grid} x a block stride ({sorted(strides)})")
    if cfg.backbone.taps is None and not set(cfg.backbone.strides) <= strides:
        raise ValueError(f"config: backbone.strides {cfg.backbone.strides}: the backbones have blocks at strides "
                         f"{sorted(strides)}")
    if cfg.backbone.taps is not None and min(cfg.backbone.taps) < 0:
        raise ValueError(f"config: backbone.taps {cfg.backbone.taps}: block indices start at 0")
    return cfg


# Settings that one mode does not read: (section, keys, when they are not read, why).
_UNET_KEYS = ("channels", "steps", "batch_size", "crop", "lr", "anomaly_prob", "shapes", "placement", "pool")
_TRAINED_TEACHER = ("channels", "downsample", "hidden", "steps", "batch_size", "lr", "shift", "brightness",
                    "fill_prob", "fill_max_share", "pool")
_NOT_READ: tuple[tuple[str, tuple[str, ...], Callable[[Config], bool], str], ...] = (
    ("local", _UNET_KEYS, lambda c: c.local.model == "bank", "local.model bank (they are the U-Net's)"),
    ("teacher", _TRAINED_TEACHER, lambda c: c.teacher.source == "open_clip",
     "teacher.source open_clip (its weights are used as they are)"),
    ("teacher", ("arch", "pretrained", "checkpoint"), lambda c: c.teacher.source != "open_clip",
     "a teacher.source other than open_clip"),
    ("cmer", ("rho",), lambda c: c.cmer.rule == "relative", "cmer.rule relative"),
    ("cmer", ("alpha", "grow"), lambda c: c.cmer.rule == "top_rho", "cmer.rule top_rho"),
    ("cmer", ("occlusion_batch",), lambda c: c.cmer.relevance == "attention",
     "cmer.relevance attention (no occlusion passes)"),
    ("local", ("bank_size", "max_patches", "k", "colour"), lambda c: c.local.model == "unet",
     "local.model unet (they are the patch bank's)"),
    ("scoring", ("train_frames",), lambda c: c.local.model == "unet",
     "local.model unet (the training frames are scored with the bank's own rows left out)"),
    ("teacher", ("channels",), lambda c: c.teacher.source == "backbone", "teacher.source backbone (they are the "
     "scratch tower's)"),
    ("teacher", ("hidden", "pool"), lambda c: c.teacher.source == "scratch",
     "teacher.source scratch (they are the backbone teacher's)"),
)


def unread_settings(cfg: Config) -> list[str]:
    """Settings given another value than the default that this config's modes do not read:
    `cmg train` says so (a U-Net's crop set on a bank config changes nothing)."""
    default = Config()
    out = []
    for section, keys, applies, why in _NOT_READ:
        if not applies(cfg):
            continue
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if value != getattr(getattr(default, section), key):
                out.append(f"{section}.{key} {value!r} is not read with {why}")
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently: a second `cmer:` section would drop every setting of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    None, None, "a key that is a list or a mapping, not a name", key_node.start_mark) from None
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        self.flatten_mapping(node)
        return super().construct_mapping(node, deep=deep)


MAX_VAL_FRACTION = 0.9  # held-out share of train/good a new config may ask for


def load_config(path: str | Path) -> Config:
    """Load a YAML config; a missing or malformed file raises with the path named."""
    path = Path(path)
    if path.is_dir():  # a run folder, most likely: its config is inside
        raise FileNotFoundError(f"config {path} is a folder: give a YAML file (a run's own is {path / 'config.yaml'})")
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        values = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.MarkedYAMLError as exc:  # one line: where and what
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ValueError(f"config {path}: not valid YAML{where}: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise ValueError(f"config {path}: not valid YAML ({exc})") from exc
    if values is None:  # an empty file must not silently train the defaults
        raise ValueError(f"config {path} is empty: copy a shipped config ({config_dir() / 'tiny.yaml'}) and edit it")
    try:
        cfg = config_from_dict(values)
    except ValueError as exc:  # name the file once: "config PATH: data: unknown key(s) ..."
        text = str(exc)
        text = text[len("config: "):] if text.startswith("config: ") else text.removeprefix("config ")
        raise ValueError(f"config {path}: {text}") from None
    # A new config's, not a saved run's (config_from_dict reads those too): `cmg build` clamps
    # opt_batch for runs trained before this check, which would otherwise no longer load.
    if cfg.serving.opt_batch > cfg.serving.max_batch:
        raise ValueError(f"config {path}: serving.opt_batch {cfg.serving.opt_batch} is above serving.max_batch "
                         f"{cfg.serving.max_batch}")
    if cfg.data.val_fraction > MAX_VAL_FRACTION:  # a new config's: a saved run of 0.95 still loads
        raise ValueError(f"config {path}: data.val_fraction {cfg.data.val_fraction} holds out more than "
                         f"{MAX_VAL_FRACTION:g} of the training images (just below 1 it hung the search for the "
                         "training-image minimum)")
    if cfg.local.model == "unet" and cfg.local.pool % 2 == 0:  # the filter is centred: an even one adds a row
        raise ValueError(f"config {path}: local.pool {cfg.local.pool} must be odd (the U-Net's mean filter is "
                         "centred on each pixel; an even one made the served map a row and a column larger than "
                         "the contract's)")
    cell = cfg.data.image_size // cfg.cmer.grid
    if cfg.teacher.shift > cell:  # torch.roll wraps: a part shifted out comes in on the other side
        raise ValueError(f"config {path}: teacher.shift {cfg.teacher.shift} moves frames by more than one CMER "
                         f"cell ({cell} px); captions name positions, which a larger shift makes untrue")
    return cfg


def config_dir() -> Path:
    """The shipped configs (package `cmg_configs`, i.e. the repository's configs/ folder)."""
    return Path(str(files("cmg_configs")))


def resolve_config(name_or_path: str | Path) -> Path:
    """Accept `tiny`, `configs/tiny.yaml` or any path. A bare name is a shipped config even
    where the current folder has a file or folder of that name (a run trained `--out tiny`)."""
    p = Path(name_or_path)
    shipped = config_dir() / f"{name_or_path}.yaml"
    if p.suffix in (".yaml", ".yml") or (p.exists() and not (p.name == str(name_or_path) and shipped.is_file())):
        return p
    path = shipped
    if not path.is_file():
        known = sorted(p.stem for p in config_dir().glob("*.yaml"))
        raise FileNotFoundError(f"config {name_or_path!r} not found (shipped: {', '.join(known)}; or give a YAML path)")
    return path

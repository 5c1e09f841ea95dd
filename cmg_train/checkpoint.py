"""RUN/checkpoint.pt: everything needed to rebuild the served modules, nothing else.

One convention for every part: `{"config": ..., "state_dict": ...}` plus the few
constructor arguments a part needs (its `*_state` / `*_from_state` pair). Loading uses
module constructors and state dicts only (no training code, no network), so export,
evaluation and benchmarks start from the same file.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cmg.config import Config, config_from_dict
from cmg.contract import Contract
from cmg.dataset import resolve_data
from cmg.errors import CMGError
from cmg.files import write_atomic_all
from cmg_train.cmer.model import (
    CMERScorer,
    OcclusionTeacher,
    ScorerGraph,
    scorer_from_state,
    scorer_state,
)
from cmg_train.cmle.model import head_from_state, head_state
from cmg_train.detector import CMGDetector
from cmg_train.local.model import local_from_state, local_state
from cmg_train.teacher.model import Teacher, teacher_from_state, teacher_state

FORMAT = "cmg-run/2"


@dataclass
class Run:
    """A trained run, ready to score or export."""

    path: Path
    cfg: Config
    teacher: Teacher
    scorer: CMERScorer
    detector: CMGDetector
    caption_bank: torch.Tensor
    captions: list[str]
    metrics: dict

    @property
    def contract(self) -> Contract:
        s = self.cfg.data.image_size
        return Contract(s, s, self.cfg.grid, self.cfg.cmle.embed_dim, self.cfg.scoring.map_size)

    def scorer_graph(self) -> ScorerGraph:
        return ScorerGraph(self.teacher.preprocess, self.scorer).eval()

    def exact_graph(self) -> OcclusionTeacher:
        return OcclusionTeacher(self.teacher, self.caption_bank, self.cfg.grid).eval()

    @property
    def data(self) -> Path:
        """The training folder, as `cmg train` stored it (one that moved is named)."""
        return self.data_folder()

    def data_folder(self, data: Path | None = None) -> Path:
        """`data` (a `--data` option), else the training folder (`resolve_data`: RUN/metrics.json,
        else the checkpoint's own record for a run copied as its checkpoint alone)."""
        return resolve_data(self.path, data, self.metrics.get("data"))


def detector_state(det: CMGDetector) -> dict:
    return {
        "use_mask": det.use_mask,
        "local": local_state(det.local),
        "head": head_state(det.head),
        "global_bank": det.global_knn.bank_t.t().contiguous(),
        "stats": det.stats.clone(),
        "threshold": det.threshold.clone(),
        "global_weight": det.global_weight.clone(),
        **({"view_stats": det.view_stats.clone()} if det.score_blur is not None else {}),
    }


def detector_from_state(cfg: Config, teacher: Teacher, state: dict) -> CMGDetector:
    det = CMGDetector(cfg, teacher, local_from_state(state["local"]), head_from_state(state["head"]),
                      use_mask=state["use_mask"])
    det.set_bank(state["global_bank"])
    det.stats.copy_(state["stats"])
    det.threshold.copy_(state["threshold"])
    det.global_weight.copy_(state.get("global_weight", torch.tensor(0.5)))
    if det.score_blur is not None:  # `local.score_sigma`: its views' statistics, saved with it
        det.view_stats.copy_(state["view_stats"])
    return det.eval().requires_grad_(False)


def save_run(out: Path, cfg: Config, teacher: Teacher, scorer: CMERScorer, det: CMGDetector,
             caption_bank: torch.Tensor, captions: list[str], metrics: dict) -> Path:
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "teacher": teacher_state(teacher),
        "scorer": scorer_state(scorer),
        "detector": detector_state(det),
        "caption_bank": caption_bank.detach().cpu(),
        "captions": list(captions),
        "metrics": without_wall_clock(metrics),
    }
    path = out / "checkpoint.pt"
    # All three written before any is renamed, the checkpoint last: saved first, then the records
    # with plain writes, an interrupted save left a new checkpoint beside the old run's records.
    write_atomic_all([(out / "config.yaml", config_record(cfg)),
                      (out / "metrics.json", json.dumps(metrics, indent=2, default=float)),
                      (path, checkpoint_bytes(state))])
    return path


def without_wall_clock(metrics: dict) -> dict:
    """The metrics without what a clock measured (`timings`, `*_s`, `speed_ratio`; they stay in
    RUN/metrics.json): the same training twice gives the same checkpoint bytes, so its sha256
    (export.json, the eval cache's key) says whether a retrain reproduced."""
    def keep(value):
        if isinstance(value, dict):
            return {k: keep(v) for k, v in value.items()
                    if k not in ("timings", "speed_ratio") and not (isinstance(k, str) and k.endswith("_s"))}
        return value
    return keep(metrics)


def config_record(cfg: Config) -> str:
    """RUN/config.yaml: the run's config, marked as a record (RECORD_HEADER)."""
    return RECORD_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# RUN/config.yaml is what the run was trained with, for people and `--config RUN/config.yaml`;
# the run itself is the checkpoint (which holds the same config): edits here change nothing.
RECORD_HEADER = ("# The config this run was trained with (a record: the run reads its checkpoint.pt, so editing\n"
                 "# this file changes nothing; train a copy of it with `cmg train --config THIS_FILE`).\n")


def checkpoint_bytes(state: dict) -> memoryview:
    """torch.save's bytes, serialised in memory, for a write through a temporary file (a kill
    or a full disk mid-save leaves the old checkpoint): torch.save into a full disk raises a
    RuntimeError ("unexpected pos"), a plain write an OSError that names the problem."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer()


def saved_config(values: dict, detector: dict) -> Config:
    """A saved run's config, the settings added after it was trained given what the run
    computed then, not today's defaults: runs trained before `local.model` and `local.score`
    existed (2026-12-03) carry a U-Net or a bank and scored the kept map's maximum; loaded
    with the defaults (bank, max minus p90) they scored otherwise than their own reports and
    served threshold, without a word. Later settings' defaults are what the code did before."""
    values = copy.deepcopy(values)
    local = values.setdefault("local", {})
    if "model" not in local:
        local["model"] = "bank" if detector["local"].get("kind") == "bank" else "unet"
    local.setdefault("score", "max")
    return config_from_dict(values)


def load_run(run_dir: str | Path) -> Run:
    """Rebuild a run; a missing folder or checkpoint is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CMGError(f"run folder not found: {run_dir}")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise CMGError(f"no checkpoint in run folder {run_dir} (expected {path.name}; run `cmg train` first)")
    try:  # tensors and plain values only: a run folder from elsewhere must not run code when read
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # a torn or foreign file, not a refused object
            why = str(exc).partition("WeightsUnpickler error:")[2].strip().split("\n")[0] or str(exc)
            raise CMGError(f"unreadable checkpoint {path}: {why}") from exc
        raise CMGError(f"refused checkpoint {path}: it holds objects other than tensors and plain values, "
                       "which `cmg train` never writes (loading them could run code)") from exc
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CMGError(f"unreadable checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        what = f"written by an older version ({found})" if found else "not a checkpoint of `cmg train`"
        raise CMGError(f"{path} is {what}; this version reads {FORMAT} checkpoints: train the run again "
                       f"(`cmg train --config small --data DATA --out {run_dir}`)")
    cfg = saved_config(state["config"], state["detector"])
    teacher = teacher_from_state(state["teacher"]).eval().requires_grad_(False)
    scorer = scorer_from_state(state["scorer"]).requires_grad_(False)
    det = detector_from_state(cfg, teacher, state["detector"])
    return Run(run_dir, cfg, teacher, scorer, det, state["caption_bank"], state["captions"], state["metrics"])


def _settings(cfg: Config) -> dict[str, object]:
    """Every setting as dotted keys, but the seed, `cmle.enabled` (the benches turn CMLE off
    on a folder whose captions cannot carry it; that run is still the config's run) and where
    an open_clip teacher's weights were read from (`--teacher-weights` saves the file's path
    resolved; a bench or a second machine names it otherwise or not at all)."""
    flat: dict[str, object] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(cfg.to_dict(), "")
    for key in ("seed", "cmle.enabled", "teacher.checkpoint", "teacher.pretrained"):
        flat.pop(key, None)
    return flat


def run_mismatch(run: Run, cfg: Config, data: str | Path | None) -> str | None:
    """Why a finished run is not what training `cfg` on `data` would make now (its config
    name, seed, any setting or, unless `data` is None, training folder differ), or None. The
    benches and the demo reuse runs they find; without this check they reported another
    config's run under this one's name (and, comparing only the name, a YAML edited under
    the same name)."""
    trained_on = Path(run.metrics.get("data", "")).resolve()
    want = Path(data).resolve() if data is not None else trained_on
    had, now = _settings(run.cfg), _settings(cfg)
    changed = sorted(k for k in had.keys() | now.keys() if had.get(k) != now.get(k))
    if (run.cfg.name, run.cfg.seed, trained_on) == (cfg.name, cfg.seed, want) and not changed:
        return None
    on = f", on {want}" if data is not None else ""
    edits = (f" (settings that differ: {', '.join(f'{k} {had.get(k)!r} -> {now.get(k)!r}' for k in changed[:3])}"
             f"{', ...' if len(changed) > 3 else ''})") if changed else ""
    return (f"{run.path} holds a run of config {run.cfg.name!r}, seed {run.cfg.seed}, trained on {trained_on}, "
            f"not {cfg.name!r}, seed {cfg.seed}{on}{edits}")

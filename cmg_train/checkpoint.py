"""RUN/checkpoint.pt: everything needed to rebuild the served modules, nothing else.

Loading uses module constructors and state dicts only (no training code paths, no
network), so export, evaluation and benchmarks start from the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cmg.config import Config, config_from_dict
from cmg.contract import Contract
from cmg.errors import CMGError
from cmg_train.cmer import (
    CMERScorer,
    OcclusionTeacher,
    ScorerGraph,
    scorer_from_state,
    scorer_state,
)
from cmg_train.cmle import CMLEHead
from cmg_train.detector import CMGDetector
from cmg_train.teacher import Teacher, teacher_from_state, teacher_state

FORMAT = "cmg-run/1"


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
        return Contract(s, s, self.cfg.grid, self.cfg.cmle.embed_dim)

    def scorer_graph(self) -> ScorerGraph:
        return ScorerGraph(self.teacher.preprocess, self.scorer).eval()

    def exact_graph(self) -> OcclusionTeacher:
        return OcclusionTeacher(self.teacher, self.caption_bank).eval()


def save_run(out: Path, cfg: Config, teacher: Teacher, scorer: CMERScorer, det: CMGDetector,
             caption_bank: torch.Tensor, captions: list[str], metrics: dict) -> Path:
    head = det.head
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "teacher": teacher_state(teacher),
        "scorer": scorer_state(scorer),
        "detector": {
            "use_mask": det.use_mask,
            "embed_in": head.proj.in_features,
            "token_in": head.patch_proj.in_features,
            "head": head.state_dict(),
            "global_bank": det.global_knn.bank_t.t().contiguous(),
            "patch_bank": det.patch_knn.bank_t.t().contiguous(),
            "stats": det.stats.clone(),
            "threshold": det.threshold.clone(),
        },
        "caption_bank": caption_bank.detach().cpu(),
        "captions": list(captions),
        "metrics": metrics,
    }
    path = out / "checkpoint.pt"
    torch.save(state, path)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path


def load_run(run_dir: str | Path) -> Run:
    """Rebuild a run; a missing folder or checkpoint is a one-line error."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CMGError(f"run folder not found: {run_dir}")
    path = run_dir / "checkpoint.pt"
    if not path.is_file():
        raise CMGError(f"no checkpoint in run folder {run_dir} (expected {path.name}; run `cmg train` first)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the same thing here
        raise CMGError(f"unreadable checkpoint {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CMGError(f"{path} is not a {FORMAT} checkpoint")
    cfg = config_from_dict(state["config"])
    teacher = teacher_from_state(state["teacher"]).eval().requires_grad_(False)
    scorer = scorer_from_state(state["scorer"])
    d = state["detector"]
    head = CMLEHead(d["embed_in"], d["token_in"], cfg.cmle.embed_dim, cfg.cmle.patch_dim)
    head.load_state_dict(d["head"])
    det = CMGDetector(cfg, teacher, head, use_mask=d["use_mask"])
    det.set_banks(d["global_bank"], d["patch_bank"])
    det.stats.copy_(d["stats"])
    det.threshold.copy_(d["threshold"])
    return Run(run_dir, cfg, teacher, scorer.eval().requires_grad_(False), det.eval().requires_grad_(False),
               state["caption_bank"], state["captions"], state["metrics"])

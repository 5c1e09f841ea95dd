"""A full-size `vit-b32` run for speed figures, with no weights to download.

    python -m cmg_bench.vit_b32 OUT        # OUT/data, OUT/open_clip_vit_b32_random.bin, OUT/vit-b32-ci.yaml, OUT/run
    cmg bench sweep --run OUT/run --out OUT/bench --modes served_cmg,ort_inprocess \\
        --concurrency 1,4 --batch 1,4 --window 10 --warmup 2 --repeats 1

The teacher is an open_clip ViT-B-32 of random weights written to a file the way open_clip
saves and loads checkpoints, then read through `cmg train --teacher-weights`: the served
graphs are exactly as large and as slow as with downloaded weights (accuracy is
meaningless). The config is `configs/vit-b32.yaml` (224 px, ViT-B-32, its serving settings)
with CI step counts and a 2x2 CMER grid; the one-pass `cmg` ensemble's cost does not depend
on either. `tests/test_vit_b32.py` uses the same weights and config.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import yaml

from cmg.config import resolve_config
from cmg_data.synth import synthesize

ARCH = "ViT-B-32"


def random_open_clip_weights(path: Path, arch: str = ARCH, seed: int = 0) -> Path:
    """A checkpoint as open_clip saves and loads it: torch.save(model.state_dict())."""
    # heavy (open_clip, torch): only writing the random checkpoint needs them, not the config
    import open_clip
    import torch

    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns that the model is random: it is meant to be
    torch.manual_seed(seed)
    torch.save(open_clip.create_model(arch, pretrained=None).state_dict(), path)
    return path


def ci_config(path: Path) -> Path:
    """vit-b32 as shipped (224 px, ViT-B-32, serving) with CI step counts: 2x2 CMER grid
    (5 teacher passes per image instead of 50), a few scorer/local/CMLE steps, a CMLE
    minimum that 9 training captions meet, a quarter of 12 images held out."""
    cfg = yaml.safe_load(resolve_config("vit-b32").read_text())
    cfg["name"] = "vit-b32-ci"
    cfg["data"]["val_fraction"] = 0.25
    cfg["cmer"].update(grid=2, occlusion_batch=64)
    cfg["cmer"]["scorer"].update(steps=5, batch_size=8)
    cfg["local"].update(steps=30, batch_size=4, shapes=20)
    cfg["cmle"].update(epochs=1, min_unique_captions=6)
    path.write_text(yaml.safe_dump(cfg))
    return path


def sample_folder(path: Path) -> Path:
    """Twelve captioned normal images and six test images (128 px, served at 224)."""

    return synthesize(path, preset="small", n_train=12, n_test_good=1, n_test_per_anomaly=1, progress=False)


def _verb(module, argv: list[str]) -> int:
    """One verb's `add_arguments`/`run` in this process (torch is imported once, not per verb)."""
    parser = argparse.ArgumentParser(prog=f"cmg {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(argv)) or 0)


def main(argv: list[str] | None = None) -> int:
    from cmg_train import export, train  # torch: only this script's main needs it

    p = argparse.ArgumentParser(prog="python -m cmg_bench.vit_b32", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    out = p.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    data = sample_folder(out / "data") if not (out / "data" / "synth.json").is_file() else out / "data"
    weights = random_open_clip_weights(out / "open_clip_vit_b32_random.bin")
    config = ci_config(out / "vit-b32-ci.yaml")
    run = out / "run"
    for module, argv_ in ((train, ["--config", str(config), "--data", str(data), "--out", str(run),
                                   "--teacher-weights", str(weights), "--no-progress"]),
                          (export, ["--run", str(run)])):
        rc = _verb(module, argv_)
        if rc:
            return rc
    print(f"run ready: cmg bench sweep --run {run} --out {out / 'bench'} --modes served_cmg,ort_inprocess "
          "--concurrency 1,4 --batch 1,4 --window 10 --warmup 2 --repeats 1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Configs: every shipped YAML loads, typos are errors, the CMER grid follows the teacher's patches."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmg.config import CONFIG_DIR, config_from_dict, load_config, resolve_config
from cmg.synth import PRESETS

SHIPPED = sorted(CONFIG_DIR.glob("*.yaml"))


def test_the_three_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"tiny", "small", "vit-b32"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load_and_agree_with_the_data(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.grid == cfg.data.image_size // cfg.teacher.patch_size
    assert cfg.grid * cfg.teacher.patch_size == cfg.data.image_size
    assert cfg.data.preset in PRESETS
    if cfg.teacher.source == "scratch":  # trained here on frames of the preset's size
        assert PRESETS[cfg.data.preset].image_size == cfg.data.image_size


def test_tiny_grid_and_resolve():
    assert resolve_config("tiny") == CONFIG_DIR / "tiny.yaml"
    cfg = load_config(resolve_config("tiny"))
    assert cfg.grid == 8 and cfg.data.image_size == 64
    vit = load_config(resolve_config("vit-b32"))
    assert vit.teacher.source == "open_clip" and vit.teacher.arch == "ViT-B-32"


@pytest.mark.parametrize("values, where", [
    ({"nmae": "x"}, "root"),
    ({"data": {"image_sise": 64}}, "data"),
    ({"cmer": {"scorer": {"epoch": 3}}}, "cmer.scorer"),
])
def test_unknown_keys_are_errors(values, where):
    with pytest.raises(ValueError, match=rf"config {where}: unknown key"):
        config_from_dict(values)


def test_bad_files_and_sizes(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ValueError, match="multiple"):
        config_from_dict({"data": {"image_size": 60}, "teacher": {"patch_size": 8}})
    with pytest.raises(ValueError, match="mapping"):
        config_from_dict({"data": 3})

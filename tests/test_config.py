"""Configs: every shipped YAML loads, typos are errors, cmer.grid is the one source of G,
and the sizes that the graphs need to divide are checked when a config is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cmg.config import Config, config_dir, config_from_dict, load_config, resolve_config
from cmg.synth import PRESETS

SHIPPED = sorted(config_dir().glob("*.yaml"))


def test_the_three_configs_are_shipped():
    assert {p.stem for p in SHIPPED} >= {"tiny", "small", "vit-b32"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load_and_agree_with_the_data(path: Path):
    """What config_from_dict enforces must also hold for what we ship (a shipped config that
    only fails at export time would be found by a user, not by us)."""
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.grid == cfg.cmer.grid
    assert cfg.data.image_size % cfg.grid == 0 and cfg.data.image_size % 8 == 0
    assert (cfg.data.image_size // 2) % cfg.scoring.map_size == 0
    assert len(cfg.local.channels) == 3  # LocalNet needs widths at 1/2, 1/4, 1/8
    assert cfg.data.preset in PRESETS
    if cfg.teacher.source == "scratch":  # trained here on frames of the preset's size
        assert PRESETS[cfg.data.preset].image_size == cfg.data.image_size
    raw = yaml.safe_load(path.read_text())
    if "grid" in raw.get("cmer", {}):  # the YAML value is what lands in the one source of G
        assert cfg.grid == raw["cmer"]["grid"]


def test_tiny_values_and_resolve():
    assert resolve_config("tiny") == config_dir() / "tiny.yaml"
    assert resolve_config("configs/tiny.yaml") == Path("configs/tiny.yaml")  # paths as given
    cfg = load_config(resolve_config("tiny"))
    assert (cfg.grid, cfg.data.image_size, cfg.scoring.map_size) == (8, 64, 16)
    assert cfg.teacher.source == "scratch"  # CI trains everything here, offline
    vit = load_config(resolve_config("vit-b32"))
    assert vit.teacher.source == "open_clip" and vit.teacher.arch == "ViT-B-32"


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(FileNotFoundError, match=r"config 'tiyn' not found \(shipped: .*tiny"):
        resolve_config("tiyn")


def test_grid_property_follows_cmer_grid():
    cfg = config_from_dict({"cmer": {"grid": 4}, "scoring": {"map_size": 4}})
    assert cfg.grid == 4 == cfg.cmer.grid
    assert Config().grid == Config().cmer.grid == 8


def test_to_dict_round_trips():
    """The checkpoint stores cfg.to_dict() and load_run rebuilds it with config_from_dict."""
    cfg = load_config(resolve_config("tiny"))
    assert config_from_dict(cfg.to_dict()) == cfg
    assert config_from_dict(Config().to_dict()) == Config()


@pytest.mark.parametrize("values, where", [
    ({"nmae": "x"}, "root"),
    ({"data": {"image_sise": 64}}, "data"),
    ({"cmer": {"scorer": {"epoch": 3}}}, "cmer.scorer"),
    ({"local": {"stpes": 3}}, "local"),
    ({"teacher": {"patch_size": 8}}, "teacher"),  # removed with the ViT teacher: now a typo
])
def test_unknown_keys_are_errors(values, where):
    with pytest.raises(ValueError, match=rf"config {where}: unknown key"):
        config_from_dict(values)


@pytest.mark.parametrize("values, message", [
    ({"data": {"image_size": 60}}, "not a multiple of cmer.grid 8"),
    ({"data": {"image_size": 36}, "cmer": {"grid": 4}, "scoring": {"map_size": 2}}, "multiple of 8"),
    ({"scoring": {"map_size": 12}}, r"map_size 12 must divide image_size / 2 = 32"),
    ({"local": {"placement": "everywhere"}}, "expected keep or uniform"),
    ({"scoring": {"fusion": "sum"}}, "expected mean, max or local"),
    ({"cmle": {"text_encoder": "bert"}}, "expected minilm or teacher"),
    ({"data": 3}, "mapping"),
])
def test_inconsistent_values_are_errors(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)


@pytest.mark.parametrize("map_size", [4, 8, 16, 32])
def test_every_divisor_of_half_the_frame_is_a_valid_map_size(map_size):
    assert config_from_dict({"scoring": {"map_size": map_size}}).scoring.map_size == map_size


def test_bad_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()  # an empty file is all defaults

"""Configs: every shipped YAML loads, typos are errors, cmer.grid is the one source of G,
and the sizes that the graphs need to divide are checked when a config is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cmg.config import Config, config_dir, config_from_dict, load_config, resolve_config
from cmg_data.synth import PRESETS

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
    assert cfg.local_map_side % cfg.scoring.map_size == 0
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
    assert cfg.teacher.source == "backbone" and cfg.local.model == "bank"  # offline: packaged weights
    assert (cfg.teacher.pool, cfg.cmer.relevance) == ("attention", "attention")  # as `small`: a mask that finds the part
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
    ({"scoring": {"map_size": 12}}, r"map_size 12 must divide the local map's side 16"),
    ({"scoring": {"map_size": 4, "map_sigma": 1.0}}, r"map_sigma 1.0 is too wide for the 4 x 4 map"),
    ({"local": {"score_sigma": 3.0}}, r"local.score_sigma 3.0 is too wide for the local map \(16 x 16"),
    ({"local": {"score_sigma": -1.0}}, r"local.score_sigma"),
    ({"local": {"placement": "everywhere"}}, "expected one of keep, uniform"),
    ({"scoring": {"fusion": "sum"}}, "expected one of auto, mean, max, local"),
    ({"cmle": {"text_encoder": "bert"}}, "expected one of minilm, teacher"),
    ({"data": 3}, "mapping"),
    ({"cmer": {"relevance": "attention"}}, "needs teacher.source backbone and teacher.pool attention, got backbone / grid"),
    ({"teacher": {"pool": "mean"}}, "expected one of grid, attention"),
    ({"backbone": {"ensemble": ["efficientnet_lite1", "resnet50"]}},
     r"backbone.ensemble\[1\]: expected one of efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, got 'resnet50'"),
    ({"backbone": {"ensemble": ["efficientnet_lite2"]}, "local": {"model": "bank", "colour": "grey+rgb"}},
     "backbone.ensemble needs local.model bank and local.colour rgb or grey, got bank / grey\\+rgb"),
    # each had failed only after the teacher and the scorer trained (or at `cmg build`):
    ({"local": {"model": "unet", "crop": 12}}, "unet needs local.crop a multiple of 8 .* crop 12"),
    ({"local": {"model": "unet", "channels": [16]}}, r"3 local.channels .* channels \[16\]"),
    ({"backbone": {"strides": [3]}}, r"backbone.strides \[3\]: the backbones have blocks at strides \[2, 4, 8, 16, 32\]"),
    ({"backbone": {"strides": [8, 64]}}, r"backbone.strides \[8, 64\]"),
    # the teacher's frame, checked before training (a ZeroDivisionError and a CMGError after the data were read):
    ({"teacher": {"pool": "grid", "downsample": 4}, "data": {"image_size": 64}},
     "teacher.downsample 4 leaves the teacher a 16 px frame of data.image_size 64; its backbone needs at least 32 px"),
    ({"data": {"image_size": 96}, "teacher": {"pool": "attention"}, "cmer": {"grid": 8}, "scoring": {"map_size": 8}},
     r"the teacher's 96 px frame .* needs 8 x a block stride"),
])
def test_inconsistent_values_are_errors(values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict(values)


@pytest.mark.parametrize("map_size", [2, 4, 8, 16])
def test_every_divisor_of_the_local_maps_side_is_a_valid_map_size(map_size):
    assert config_from_dict({"scoring": {"map_size": map_size}}).scoring.map_size == map_size


def test_bad_files(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match=r"is a folder: give a YAML file \(a run's own is .*config.yaml\)"):
        load_config(tmp_path)  # `--config RUN`: it had said "not found" of a folder that is there
    batches = tmp_path / "batches.yaml"
    batches.write_text("serving: {max_batch: 4}\n")  # opt_batch's default, 8, above it: refused at build before
    with pytest.raises(ValueError, match="serving.opt_batch 8 is above serving.max_batch 4"):
        load_config(batches)
    assert config_from_dict({"serving": {"max_batch": 4}}).serving.opt_batch == 8  # a saved run's still loads
    assert config_from_dict({"data": {"val_fraction": 0.95}}).data.val_fraction == 0.95  # so does one of 0.95
    batches.write_text("local: {model: unet, pool: 4}\n")  # served a 33 x 33 map where the contract says 32
    with pytest.raises(ValueError, match="local.pool 4 must be odd"):
        load_config(batches)
    batches.write_bytes(b"seed: 1\n# caf\xe9\n")  # Latin-1: the decode error had named neither file nor byte
    with pytest.raises(ValueError, match=r"batches.yaml: not UTF-8 text \(byte 13\)"):
        load_config(batches)
    batches.write_text("teacher: {shift: 1000}\n")  # torch.roll wraps the part round to the other side
    with pytest.raises(ValueError, match=r"teacher.shift 1000 moves frames by more than one CMER cell \(8 px\)"):
        load_config(batches)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml"):
        load_config(bad)
    for text in ("", "# only a comment\n"):  # an empty file must not silently train the defaults
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(ValueError, match=r"empty\.yaml is empty"):
            load_config(empty)


def test_a_key_given_twice_is_an_error_not_the_last_one_wins(tmp_path: Path):
    """PyYAML keeps the last of two keys: a second `cmer:` section had dropped the first's
    settings without a word (the run trained another scorer)."""
    shipped = (config_dir() / "tiny.yaml").read_text()
    for extra, needle in (("cmer:\n  alpha: 0.5\n", "duplicate key 'cmer'"),
                          ("", "duplicate key 'alpha'")):
        path = tmp_path / "dup.yaml"
        text = shipped + extra if extra else shipped.replace("cmer:\n", "cmer:\n  alpha: 0.4\n", 1)
        if not extra:
            assert "alpha" in shipped.split("cmer:", 1)[1].split("\n\n", 1)[0], "tiny's cmer section sets alpha"
        path.write_text(text)
        with pytest.raises(ValueError, match=rf"dup\.yaml: not valid YAML at line \d+, column \d+: {needle} \(first on line \d+\)$"):
            load_config(path)


def test_a_shipped_name_is_the_shipped_config_whatever_the_current_folder_holds(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny").mkdir()  # e.g. a run trained with `--out tiny`
    assert resolve_config("tiny") == config_dir() / "tiny.yaml"
    (tmp_path / "mine").write_text("name: mine\n")  # a path that names no shipped config stays a path
    assert resolve_config("mine") == Path("mine")


# The cases (and neighbours): one line naming the key, before any work.
@pytest.mark.parametrize("yaml_text, message", [
    ("teacher: {steps: five}", "teacher.steps: expected an integer, got 'five'"),
    ("local: {batch_size: -8}", "local.batch_size: expected a value >= 1, got -8"),
    ("teacher: {channels: 16}", "teacher.channels: expected a list such as [16, 32], got 16"),
    ("cmer: {scorer: {channels: [16, x]}}", "cmer.scorer.channels[1]: expected an integer, got 'x'"),
    ("local: {channels: []}", "local.channels: expected a non-empty list"),
    ("scoring: {fpr: 1.5}", "scoring.fpr: expected a value > 0 and < 1, got 1.5"),
    ("data: {image_size: -64}", "data.image_size: expected a value >= 8, got -64"),
    ("teacher: {lr: 1e-3}", "teacher.lr: expected a number, got '1e-3' (YAML reads 1e-3 as text"),
    ("teacher: {lr: .nan}", "teacher.lr: expected a number, got nan"),
    ("cmer: {grow: 'yes'}", "cmer.grow: expected true or false, got 'yes'"),
    ("cmer: {enabled: 1}", "cmer.enabled: expected true or false, got 1"),
    ("teacher: {arch: 32}", "teacher.arch: expected a string, got 32"),
    ("teacher: {source: clip}", "teacher.source: expected one of backbone, scratch, open_clip, got 'clip'"),
    ("seed: -1", "seed: expected a value >= 0 and <= 2147483647, got -1"),
    ("seed: 18446744073709551615", "seed: expected a value >= 0 and <= 2147483647, got 18446744073709551615"),
    ("data: {val_fraction: 0}", "data.val_fraction: expected a value > 0 and < 1, got 0"),
    ("data: {val_fraction: 0.9999999999}", "data.val_fraction 0.9999999999 holds out more than 0.9"),  # hung before
    ("serving: {queue_delay_us: 100000000000000000000}", "serving.queue_delay_us: expected a value >= 0 and <= 2147483647"),
    ("serving: {max_batch: 3000000000}", "serving.max_batch: expected a value >= 1 and <= 2147483647"),
    ("cmer: {scorer: {steps: 2.5}}", "cmer.scorer.steps: expected an integer, got 2.5"),
    ("- 1\n- 2", "c.yaml: expected a mapping of keys, got a list"),
])
def test_config_is_validated_whole_with_one_line_naming_the_key(yaml_text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"config {path}: ") and message in text and "\n" not in text, text


def test_config_cli_error_is_exit_2_before_any_work(tmp_path, capsys):
    """`cmg train` with a bad config stops with one line before reading the data (which here
    does not even exist): nothing trains for 36 s first."""
    from cmg_app.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("scoring: {fpr: 1.5}\n")
    rc = main(["train", "--config", str(path), "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "scoring.fpr" in err[0]
    assert not (tmp_path / "r").exists()


def test_validation_is_driven_by_the_dataclasses():
    """A key added to a config dataclass is type-checked with no new code; every name in
    the range table is a real key (a renamed key must not leave a dead rule behind)."""
    import dataclasses

    from cmg.config_check import check_range_table, check_section

    @dataclasses.dataclass
    class Extra:
        new_steps: int = 3
        sizes: list[int] = dataclasses.field(default_factory=lambda: [1])
        batch_size: int = 2

    with pytest.raises(ValueError, match="x.new_steps: expected an integer, got 'many'"):
        check_section(Extra, {"new_steps": "many"}, "x")
    with pytest.raises(ValueError, match=r"x.sizes\[0\]: expected an integer"):
        check_section(Extra, {"sizes": ["a"]}, "x")
    with pytest.raises(ValueError, match="x.batch_size: expected a value >= 1"):  # by name, any section
        check_section(Extra, {"batch_size": 0}, "x")
    assert check_range_table(Config) == []


def test_a_seed_past_what_every_stage_can_derive_from_is_refused_on_the_command_line():
    """`--seed 18446744073709551615` had trained 30 s, then failed with torch's "Overflow
    when unpacking long long" (a stage seeds with seed + 7)."""
    import argparse

    from cmg.argtypes import MAX_SEED, seed_int, seed_list

    assert seed_int(str(MAX_SEED)) == MAX_SEED and seed_list("0,2,1") == (0, 2, 1)
    for bad in (str(MAX_SEED + 1), "18446744073709551615", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            seed_int(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="must be <= 2147483647"):
        seed_list(f"0,{MAX_SEED + 1}")


def test_yaml_merge_keys_still_load_and_an_unhashable_key_is_one_line(tmp_path: Path):
    """The duplicate-key loader must not refuse YAML that safe_load reads (`<<: *anchor`)."""
    shipped = (config_dir() / "tiny.yaml").read_text()
    path = tmp_path / "merge.yaml"
    path.write_text("x-defaults: &d {alpha: 0.5}\n" + shipped.replace("cmer:\n", "cmer:\n  <<: *d\n", 1))
    with pytest.raises(ValueError, match="unknown key"):  # the anchor's own top-level key, not a YAML error
        load_config(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("? [1, 2]\n: x\n")
    with pytest.raises(ValueError, match="a key that is a list or a mapping"):
        load_config(bad)


def test_settings_a_config_does_not_read_are_named():
    """A U-Net's crop on a bank config, an open_clip teacher's training steps, rho under the
    relative rule: accepted and changing nothing; `cmg train` names them (no shipped config has one)."""
    from cmg.config import unread_settings

    for path in sorted(config_dir().glob("*.yaml")):
        assert unread_settings(load_config(path)) == [], path.name
    cfg = config_from_dict({"local": {"model": "bank", "crop": 32}, "cmer": {"rho": 0.5},
                            "teacher": {"source": "open_clip", "arch": "ViT-B-32", "steps": 10}})
    assert unread_settings(cfg) == ["local.crop 32 is not read with local.model bank (they are the U-Net's)",
                                    "teacher.steps 10 is not read with teacher.source open_clip (its weights are "
                                    "used as they are)",
                                    "cmer.rho 0.5 is not read with cmer.rule relative"]
    cfg = config_from_dict({"teacher": {"channels": [8, 16]}, "scoring": {"train_frames": 50, "map_size": 8},
                            "local": {"model": "unet", "colour": "grey", "bank_size": 5000, "k": 3},
                            "cmle": {"enabled": False, "k": 8, "lam": 2.0}})  # each had passed unsaid
    assert [line.split(" is not read")[0] for line in unread_settings(cfg)] == [  # CMLE's: the ablation reads them
        "local.bank_size 5000", "local.k 3", "local.colour 'grey'", "scoring.train_frames 50",
        "teacher.channels [8, 16]"]


@pytest.mark.parametrize("size", [72, 96, 112, 152, 232])
def test_the_grid_teacher_pools_any_frame_side_to_its_grid(size):
    """A deepest block whose side is no multiple of 4 (96 px: side 6) failed with a shape error
    in the teacher's first step; the pooling windows now overlap to give the 4 x 4 grid."""
    import torch

    from cmg.config import TeacherConfig
    from cmg_train.teacher.model import build_teacher

    config_from_dict({"data": {"image_size": size}, "scoring": {"map_size": 1}})  # the config is accepted
    teacher = build_teacher(TeacherConfig(source="backbone", pool="grid"), size, load_weights=False)
    assert teacher.visual(torch.zeros(1, 3, size, size)).shape == (1, teacher.visual.head[-1].out_features)


@pytest.mark.parametrize("size", [64, 144, 224, 256])
def test_the_grid_teacher_pools_as_before_where_that_worked(size):
    """Runs trained at these sizes load with the pooling they were trained with (windows and
    stride side // 4): a teacher rebuilt from its config must embed as it did."""
    import torch
    import torch.nn.functional as F

    from cmg.config import TeacherConfig
    from cmg_train.teacher.model import build_teacher

    visual = build_teacher(TeacherConfig(source="backbone", pool="grid"), size, load_weights=False).visual
    x = torch.randn(1, 3, size, size)
    (f,) = visual.backbone(x * visual.scale + visual.shift)
    old = max(1, f.shape[-1] // 4)
    assert torch.equal(visual.pooled(x), F.avg_pool2d(f, old).flatten(1))


@pytest.mark.parametrize("option", ["--max-batch", "--version"])
def test_counts_on_the_command_line_fit_what_triton_reads(option, capsys):
    """`--max-batch 3000000000` failed only in the ModelConfig write, and a 20-digit `--version`
    was built and then crashed tritonserver at start (std::out_of_range)."""
    from cmg_app.cli import main

    with pytest.raises(SystemExit) as info:
        main(["build", "--run", ".", option, "99999999999999999999"])
    assert info.value.code == 2 and "must be <= 2147483647" in capsys.readouterr().err

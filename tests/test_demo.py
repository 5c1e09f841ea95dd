"""`cmg demo`: what an interrupted demo leaves (the whole demo runs in test_install)."""

from __future__ import annotations

import json

import pytest

from cmg_app import demo as demo_mod


def test_an_interrupted_demo_leaves_no_earlier_report_beside_its_stream(tmp_path, monkeypatch):
    """A report and ROC of an earlier demo would describe another run than the stream.jsonl
    an interrupted one leaves: they go when a demo starts."""
    for name in ("demo_report.json", "demo_roc.png"):
        (tmp_path / name).write_text("from an earlier demo")

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_mod, "synthesize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        demo_mod.demo(tmp_path, progress=False)
    assert not (tmp_path / "demo_report.json").exists() and not (tmp_path / "demo_roc.png").exists()


@pytest.mark.parametrize(("flag", "want"), [(None, 7), (3, 3)])
def test_the_demo_keeps_the_configs_seed_unless_told(tmp_path, flag, want):
    """`cmg demo --config my.yaml` with `seed: 7` in it had trained with seed 0 (the flag's
    default), without a word."""
    import argparse

    from cmg.config import config_dir

    mine = tmp_path / "mine.yaml"
    mine.write_text((config_dir() / "tiny.yaml").read_text().replace("seed: 0", "seed: 7"))
    p = argparse.ArgumentParser()
    demo_mod.add_arguments(p)
    args = p.parse_args(["--config", str(mine)] + ([] if flag is None else ["--seed", str(flag)]))
    assert demo_mod.demo_config(args.config, args.seed).seed == want


def test_the_demo_checks_an_open_clip_teachers_weights_before_making_data(tmp_path):
    """`cmg demo --config` with an open_clip teacher and no weights ran the synthesis first and
    then failed naming `--teacher-weights`, an option the demo does not have."""
    from cmg.config import config_dir
    from cmg.errors import CMGError

    mine = tmp_path / "myvit.yaml"
    mine.write_text((config_dir() / "vit-b32.yaml").read_text())
    with pytest.raises(CMGError, match=r"set teacher.checkpoint FILE .* \(`cmg demo` has no --teacher-weights\)"):
        demo_mod.demo_config(str(mine))


@pytest.mark.parametrize("checkpoint", [b"not a checkpoint", None])
def test_the_demo_trains_again_over_a_run_it_cannot_read(tmp_path, monkeypatch, capsys, checkpoint):
    """A demo folder left by an older version (a checkpoint this one cannot read) is the
    demo's own to redo: it says why and trains again instead of stopping on the old run; a
    folder without a run is trained without a reason printed."""
    cfg = demo_mod.demo_config("tiny", None)
    data, run = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    (data / "synth.json").write_text(json.dumps(
        {"preset": cfg.data.preset, "seed": cfg.seed, "category": cfg.data.category}))  # the data is reused
    if checkpoint is not None:
        run.mkdir()
        (run / "checkpoint.pt").write_bytes(checkpoint)
    trained = []

    class Trained(Exception):
        pass

    def train_run(cfg_, data_, run_, progress=True):
        trained.append((data_, run_))
        raise Trained  # the decision is what is tested; the whole demo runs in test_install

    monkeypatch.setattr(demo_mod, "synthesize", lambda *a, **k: pytest.fail("the data was made again"))
    monkeypatch.setattr(demo_mod, "train_run", train_run)
    with pytest.raises(Trained):
        demo_mod.demo(tmp_path, progress=False)
    assert trained == [(data, run)]
    said = capsys.readouterr().out
    assert ("training again" in said) == (checkpoint is not None)
    assert checkpoint is None or "checkpoint" in said.split("training again")[0].lower()


def test_the_demo_makes_its_data_again_over_a_synth_killed_at_its_end(tmp_path, monkeypatch):
    """Killed between writing synth.json and removing synth.incomplete, the data was reused
    and the training refused it ('not finished') on every demo until --fresh."""
    from cmg.dataset import SYNTH_INCOMPLETE

    data = tmp_path / "data"
    data.mkdir()
    (data / "synth.json").write_text(json.dumps({"preset": "tiny", "seed": 0, "category": "hex_nut"}))
    (data / SYNTH_INCOMPLETE).touch()
    made = []

    def synthesize(out, **_kwargs):
        made.append(out)
        raise KeyboardInterrupt  # enough: the demo chose to make the data again

    monkeypatch.setattr(demo_mod, "synthesize", synthesize)
    with pytest.raises(KeyboardInterrupt):
        demo_mod.demo(tmp_path, progress=False)
    assert made == [data]

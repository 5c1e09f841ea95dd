"""`cmg demo`: what an interrupted demo leaves (the whole demo runs in test_install)."""

from __future__ import annotations

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

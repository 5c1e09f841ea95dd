"""Two commands at once on one folder: the second is refused at once, naming the first, or
both read; never a folder that silently mixes two runs (each case here had, exit 0)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cmg.errors import CMGError
from cmg.locks import OutputLock, reading
from cmg_app.cli import main
from cmg_data.synth import INCOMPLETE, synthesize


def _mini(out, seed: int = 0):
    return synthesize(out, "tiny", seed=seed, n_train=6, n_test_good=2, n_test_per_anomaly=1, progress=False)


def _exit_2(args: list[str], capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    return err.strip().splitlines()[-1]


def test_synth_is_one_writer_and_no_reader_meanwhile(tmp_path):
    """Two synths into one folder left it missing images under a success line; a synth while
    `cmg train` read the folder gave the training one seed's captions and another's frames."""
    data = _mini(tmp_path / "d")
    before = (data / "captions.jsonl").read_text()
    with OutputLock(data, folder=True), pytest.raises(CMGError, match="another `cmg data synth` writes it"):
        _mini(data, seed=1)
    with reading(data, refusal="-"), pytest.raises(CMGError, match="or a `cmg train` reads it"):
        _mini(data, seed=1)
    assert (data / "captions.jsonl").read_text() == before and not (data / INCOMPLETE).exists()


def test_training_refuses_a_folder_synth_is_writing_or_left_unfinished(tmp_path):
    from cmg.config import load_config, resolve_config
    from cmg.dataset import check_training_folder
    from cmg_train.train import train_run

    data = _mini(tmp_path / "d")
    with OutputLock(data, folder=True), pytest.raises(CMGError, match="is being written by `cmg data synth`"):
        train_run(load_config(resolve_config("tiny")), data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    (data / INCOMPLETE).touch()  # a synth stopped midway (SIGKILL)
    with pytest.raises(CMGError, match="is not finished"):
        check_training_folder(data, 64)


def test_eval_export_and_build_wait_for_no_training_and_one_eval_per_run(tmp_path, capsys):
    """An eval while `cmg train` replaced the run put the new checkpoint's hash on the old one's
    scores, which every later eval reused; two evals of one run left one data's json over the
    other's pictures."""
    run = tmp_path / "run"
    run.mkdir()
    with OutputLock(run, folder=True):  # a training writing it: eval, export and build wait for it
        for verb in (["eval", "--run", str(run)], ["export", "--run", str(run)],
                     ["build", "--run", str(run), "--target", "cpu", "--out", str(tmp_path / "repo")]):
            assert "is being trained (`cmg train`" in _exit_2(verb, capsys), verb
    with OutputLock(run / "eval", folder=True):
        assert "being written by another `cmg eval`" in _exit_2(["eval", "--run", str(run)], capsys)
    from cmg_train.runlog import run_folder

    with reading(run, refusal="-"), pytest.raises(CMGError, match="or a `cmg eval` reads it"), run_folder(run):
        pass  # a training is refused while an eval reads


def test_a_server_does_not_load_a_repository_a_build_is_writing(tmp_path):
    """A server started while `cmg build` swapped the repository's entries loaded one run's
    scorer beside another's encoder."""
    from cmg_build.server import TritonServer

    repo = tmp_path / "repo"
    repo.mkdir()
    with OutputLock(repo, folder=True), pytest.raises(CMGError, match="is being written by `cmg build`"):
        TritonServer(repo).start(timeout=30)


def test_infer_overlays_and_bench_out_are_one_writer_each(tmp_path, capsys):
    """Two `cmg infer --overlays` into one folder left each line naming the other's picture; two
    `cmg bench` into one --out rebuilt each other's repositories under running servers."""
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    overlays = tmp_path / "ox"
    with OutputLock(overlays, folder=True):
        last = _exit_2(["infer", "--url", "127.0.0.1:1", str(image), "--overlays", str(overlays)], capsys)
        assert "being written by another `cmg infer`" in last
    out = tmp_path / "b"
    with OutputLock(out, folder=True):
        last = _exit_2(["bench", "sweep", "--run", str(tmp_path / "run"), "--out", str(out)], capsys)
        assert "being written by another `cmg bench`" in last


def test_int8_calibration_reads_its_data_under_a_readers_lock(tmp_path):
    """`cmg build --precision int8` read the calibration frames while a synth could rewrite the
    folder (frames of two data sets)."""
    from cmg_build.quantize import calibration_frames

    data = _mini(tmp_path / "d")
    with OutputLock(data, folder=True), pytest.raises(CMGError, match="is being written by `cmg data synth`"):
        calibration_frames(tmp_path / "run", None, data=data)

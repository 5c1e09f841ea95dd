"""The bad-input matrix: every verb x every bad input -> exit 2 and one line naming the
problem, never a traceback (CMG_DEBUG=1 keeps it). In-process through `cmg_app.cli.main`, so
torch is imported once for the whole matrix; the cases that need a server or the trained
run are marked slow."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg.errors import CMGError
from cmg_app.cli import main
from cmg_build.server import free_port


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """main(argv) as the console script runs it: (exit status, stdout, stderr)."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_exit_2(verb: str, rc: int, err: str, needle: str) -> None:
    assert rc == 2, (rc, err)
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cmg {verb}"), err
    assert needle.lower() in last.lower(), (needle, last)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    img = root / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    (root / "a_file").write_text("x")
    (root / "empty").mkdir()
    (root / "folder").mkdir()
    (root / "foreign.jsonl").write_text('{"seq": 5}\n')
    (root / "has_lines.jsonl").write_text('{"seq": 0, "frame_id": "ok.png"}\n')
    run = root / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"")
    return {"root": root, "img": img, "file": root / "a_file", "empty": root / "empty",
            "folder": root / "folder", "foreign": root / "foreign.jsonl", "has_lines": root / "has_lines.jsonl",
            "run": run}


def _dead() -> str:
    return f"127.0.0.1:{free_port()}"


# (verb, argv builder, needle in the last line). Builders take the `files` dict.
Case = tuple[str, Callable[[dict], list[str]], str]
CASES: list[Case] = [
    # infer
    ("infer", lambda f: ["--threshold", "nan", str(f["img"])], "finite"),
    ("infer", lambda f: ["--threshold", "inf", str(f["img"])], "finite"),
    ("infer", lambda f: ["--threshold=-inf", str(f["img"])], "finite"),
    ("infer", lambda f: ["--threshold", "1e39", str(f["img"])], "finite number in FP32"),  # finite in float64 only
    ("infer", lambda f: ["--threshold=-1e39", str(f["img"])], "finite number in FP32"),
    ("infer", lambda f: ["--timeout", "0", str(f["img"])], "> 0"),
    ("infer", lambda f: ["--timeout=-3", str(f["img"])], "> 0"),
    ("infer", lambda f: ["--batch", "0", str(f["img"])], ">= 1"),
    ("infer", lambda f: ["--max-pixels", "0", str(f["img"])], ">= 1"),
    ("infer", lambda f: ["--retries=-1", str(f["img"])], "--retries"),
    ("infer", lambda f: ["--overlays", str(f["file"]), str(f["img"])], "is a file"),
    ("infer", lambda f: ["--overlays", str(f["file"] / "sub"), str(f["img"])], "is a file"),
    ("infer", lambda f: ["--url", _dead(), "--timeout", "3", str(f["img"])], "unreachable"),
    ("infer", lambda f: ["--http", "--url", _dead(), "--timeout", "3", str(f["img"])], "unreachable"),
    ("infer", lambda f: ["--url", "127.0.0.1:notaport", str(f["img"])], "HOST:PORT"),
    ("infer", lambda f: [str(f["empty"])], "no images found"),
    # stream
    ("stream", lambda f: ["--source", str(f["folder"]), "--out", str(f["root"] / "o1.jsonl"),
                          "--threshold", "nan"], "finite"),
    ("stream", lambda f: ["--source", str(f["folder"]), "--out", str(f["root"] / "o1.jsonl"),
                          "--threshold", "1e39"], "finite number in FP32"),
    ("stream", lambda f: ["--source", str(f["folder"]), "--out", str(f["root"] / "o1.jsonl"),
                          "--timeout", "0"], "> 0"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["folder"]), "--overwrite"], "is a folder"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["file"] / "o.jsonl")], "is a file"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o2.jsonl"), "--window", "0"],
     ">= 1"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o2.jsonl"), "--fps", "0"], "> 0"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o2.jsonl"), "--max-retries", "-2"],
     "-1 for no limit"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["has_lines"]), "--resume", "--overwrite"],
     "give one of them"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["file"])], "is not a cmg stream output"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o2.jsonl"),
                          "--backoff-max", "nan"], "finite"),
    ("stream", lambda f: ["--source", str(f["root"] / "nothing"), "--out", str(f["root"] / "o3.jsonl")],
     "no such file or folder"),
    ("stream", lambda f: ["--source", "synth:huge", "--out", str(f["root"] / "o3.jsonl")], "unknown preset"),
    ("stream", lambda f: ["--source", "synth:tiny?n=-1", "--out", str(f["root"] / "o3.jsonl")], "n must be"),
    ("stream", lambda f: ["--source", "synth:tiny?fps=0", "--out", str(f["root"] / "o3.jsonl")], "fps must be"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o3.jsonl"), "--retry-errors"],
     "--resume"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["has_lines"])], "--resume"),
    ("stream", lambda f: ["--url", _dead(), "--source", str(f["root"]), "--out", str(f["root"] / "o4.jsonl"),
                          "--timeout", "3"], "unreachable"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o5.jsonl"), "--limit=-1"],
     "--limit"),
    ("stream", lambda f: ["--source", "a=synth:tiny", "--source", "a=synth:tiny?n=2", "--out", str(f["root"] / "m")],
     "would both write"),
    ("stream", lambda f: ["--source", "synth:tiny", "--source", "b=synth:tiny", "--out", str(f["file"])], "is a file"),
    ("stream", lambda f: ["--url", _dead(), "--url", _dead(), "--source", "synth:tiny", "--source", "b=synth:tiny",
                          "--out", str(f["root"] / "m"), "--timeout", "3"], "no server answers"),
    ("stream", lambda f: ["--source", "synth:tiny", "--out", str(f["root"] / "m.jsonl"), "--metrics-url", "h:8002"],
     "give --dashboard too"),
    ("build", lambda f: ["--run", str(f["run"]), "--out", str(f["root"] / "r"), "--k8s", str(f["root"] / "k"),
                         "--replicas", "0"], "--replicas"),
    # deploy
    ("deploy", lambda f: ["--run", str(f["run"]), "--repository", str(f["empty"]), "--url", _dead()],
     "build_report.json not found"),
    ("stream", lambda f: ["--source", str(f["root"]), "--out", str(f["root"] / "o6.jsonl"),
                          "--dashboard", "no-port"], "--dashboard"),
    # serve (checks before any server starts)
    ("serve", lambda f: ["--repository", str(f["root"] / "nothing")], "does not exist"),
    ("serve", lambda f: ["--repository", str(f["file"])], "is a file"),
    ("serve", lambda f: ["--repository", str(f["empty"])], "no models"),
    ("serve", lambda f: ["--repository", str(f["run"])], "training run"),
    ("serve", lambda f: ["--repository", str(f["empty"]), "--timeout", "0"], "> 0"),
    # demo
    ("demo", lambda f: ["--workdir", str(f["file"])], "is a file"),
    # bench
    ("bench", lambda f: ["sweep", "--run", str(f["root"] / "nothing"), "--out", str(f["root"] / "b")],
     "run folder not found"),
    ("bench", lambda f: ["sweep", "--run", str(f["run"]), "--out", str(f["file"])], "is a file"),
    ("bench", lambda f: ["sweep", "--run", str(f["empty"]), "--out", str(f["root"] / "b")], "has no checkpoint.pt"),
    ("bench", lambda f: ["soak", "--run", str(f["empty"]), "--out", str(f["root"] / "b"), "--minutes", "1"],
     "has no checkpoint.pt"),
    ("bench", lambda f: ["servers", "--run", str(f["empty"]), "--out", str(f["root"] / "b")], "has no checkpoint.pt"),
    ("bench", lambda f: ["dashboard-cost", "--run", str(f["empty"]), "--out", str(f["root"] / "b")],
     "has no checkpoint.pt"),
    ("bench", lambda f: ["dashboard-cost", "--run", str(f["run"]), "--out", str(f["root"] / "b"), "--frames", "1"],
     "at least 32"),
    ("bench", lambda f: ["sweep", "--run", str(f["run"]), "--out", str(f["root"] / "b"), "--modes", ""], "names no mode"),
    ("bench", lambda f: ["soak", "--run", str(f["run"]), "--out", str(f["root"] / "b"), "--minutes", "0"], "> 0"),
    ("bench", lambda f: ["soak", "--run", str(f["run"]), "--out", str(f["root"] / "b"), "--minutes", "nan"], "finite"),
    ("bench", lambda f: ["sweep", "--run", str(f["run"]), "--out", str(f["root"] / "b"), "--batch", "0"], "positive"),
    ("bench", lambda f: ["soak", "--run", str(f["run"]), "--out", str(f["root"] / "b"), "--minutes", "1",
                         "--load", "1.5"], "share of capacity"),
    # the torch verbs
    ("eval", lambda f: ["--run", str(f["root"] / "nothing")], "run folder not found"),
    ("export", lambda f: ["--run", str(f["root"] / "nothing")], "run folder not found"),
    ("build", lambda f: ["--run", str(f["root"] / "nothing"), "--out", str(f["root"] / "r")], "does not exist"),
    ("build", lambda f: ["--run", str(f["run"]), "--out", str(f["root"] / "r"), "--cpu-threads", "-1"], ">= 0"),
    ("build", lambda f: ["--run", str(f["run"]), "--out", str(f["root"] / "r"), "--target", "onnxruntime",
                         "--kind", "gpu", "--cpu-threads", "3"],
     "--cpu-threads goes with --target cpu or onnxruntime --kind cpu"),  # had been ignored
    ("build", lambda f: ["--run", str(f["run"]), "--out", str(f["root"] / "r"), "--replicas", "5"],
     "--replicas/--max-replicas go with --k8s DIR"),
    ("build", lambda f: ["--run", str(f["run"]), "--out", str(f["run"])], "training run or export folder"),
    ("serve", lambda f: ["--repository", str(f["root"]), "--grpc-port", "99999"], "1..65535"),
    ("serve", lambda f: ["--repository", str(f["root"]), "--http-port=-1"], "1..65535"),
    ("build", lambda f: ["--run", str(f["run"]), "--out", str(f["root"] / "r"), "--max-batch", "0"], ">= 1"),
    ("data", lambda f: ["synth", "--out", str(f["root"] / "d"), "--preset", "huge"], "huge"),
    ("captions", lambda f: ["--data", str(f["root"] / "nothing")], "not found"),
    ("captions", lambda f: ["--data", str(f["file"])], "is a file"),
    ("captions", lambda f: ["--data", str(f["empty"])], "missing folder"),
    ("captions", lambda f: ["--data", str(f["empty"]), "--seq-len", "2"], ">= 5"),
    ("captions", lambda f: ["--data", str(f["empty"]), "--weights", str(f["root"] / "coca.pt")],
     "missing folder"),
    ("train", lambda f: ["--config", "nosuchconfig", "--data", str(f["root"]), "--out", str(f["root"] / "t")],
     "config 'nosuchconfig' not found (shipped:"),
    ("train", lambda f: ["--config", str(f["root"] / "x.yaml"), "--data", str(f["root"]), "--out",
                         str(f["root"] / "t")], "config file not found"),
]


@pytest.mark.parametrize(("verb", "build", "needle"), CASES,
                         ids=[f"{v}-{i}-{n.replace(' ', '_')}" for i, (v, _, n) in enumerate(CASES)])
def test_bad_input_one_line_exit_2(verb, build, needle, files, capsys):
    rc, _, err = run_cli([verb, *build(files)], capsys)
    assert_one_line_exit_2(verb, rc, err, needle)


def test_cmg_debug_keeps_the_traceback(files, monkeypatch, capsys):
    monkeypatch.setenv("CMG_DEBUG", "1")
    with pytest.raises(CMGError, match="is a file"):
        main(["infer", "--overlays", str(files["file"]), str(files["img"])])


def test_a_bug_is_one_line_and_exit_1(files, monkeypatch, capsys):
    """An unexpected exception (a bug, not bad input) is still one line, exit 1."""
    from cmg_clients import infer

    def broken(_args):
        raise KeyError("oops")

    monkeypatch.setattr(infer, "run", broken)
    rc, _, err = run_cli(["infer", str(files["img"])], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("cmg infer: internal error: KeyError")


def test_console_script_exit_status(files):
    """The real process: exit status 2, one stderr line."""
    res = subprocess.run([sys.executable, "-m", "cmg_app.cli", "stream", "--source", str(files["root"]),
                          "--out", str(files["folder"]), "--overwrite"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0, res.stderr
    assert "is a folder" in res.stderr


# -- cmg train: every problem of the data folder, before any training ----------------------
@pytest.fixture(scope="module")
def good_data(tmp_path_factory) -> Path:
    from cmg_data.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("train_data") / "hex", "tiny", seed=2, n_train=30, n_test_good=2,
                      n_test_per_anomaly=1, progress=False)


def _rewrite_captions(root: Path, fn) -> None:
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fn(rows)))


BREAKS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing folder": (lambda d: d / "nothing", "dataset folder not found"),
    "a file": (lambda d: (d / "synth.json"), "is a file"),
    "no train/good": (lambda d: (shutil.rmtree(d / "train"), d)[1], "missing folder"),
    # 9 images: the folder minimum follows the held-out split (8 to train on + 2 held out)
    "too few images": (lambda d: ([p.unlink() for p in sorted((d / "train" / "good").glob("*.png"))[9:]], d)[1],
                       "has 9 images"),
    "unreadable image": (lambda d: ((d / "train" / "good" / "004.png").write_bytes(b"\x89PNG broken"), d)[1],
                         "004.png"),
    "truncated image": (lambda d: ((d / "train" / "good" / "005.png").write_bytes(
        (d / "train" / "good" / "005.png").read_bytes()[:60]), d)[1], "005.png"),
    "no captions.jsonl": (lambda d: ((d / "captions.jsonl").unlink(), d)[1], "no captions.jsonl"),
    "caption missing": (lambda d: (_rewrite_captions(d, lambda rows: [r for r in rows
                                                                      if r["file"] != "train/good/007.png"]), d)[1],
                        "have no caption"),
    # names written relative to train/good: said, and --force (which replaces every caption) not offered
    "captions named from train/good": (lambda d: (_rewrite_captions(d, lambda rows: [
        {**r, "file": r["file"].removeprefix("train/good/")} for r in rows]), d)[1],
        "30 lines name files that do not exist (first: '000.png', which is train/good/000.png: name the "
        "files relative to"),
    "empty caption": (lambda d: (_rewrite_captions(d, lambda rows: [{**r, "caption": " "} if
                                                                    r["file"] == "train/good/001.png" else r
                                                                    for r in rows]), d)[1], "empty caption"),
    "few unique captions": (lambda d: (_rewrite_captions(d, lambda rows: [{**r, "caption": f"part {i % 3}"}
                                                                          for i, r in enumerate(rows)]), d)[1],
                            "only 3 distinct captions"),
    "malformed captions": (lambda d: ((d / "captions.jsonl").write_text("{not json\n"), d)[1], "malformed"),
}


def test_good_data_passes_the_check(good_data):
    """The baseline the breaks start from: without it every failure below proves nothing."""
    from cmg.dataset import check_training_folder

    summary = check_training_folder(good_data, 64, min_unique_captions=20)
    assert summary["images"] == 30 and summary["unique_captions"] >= 20


@pytest.mark.parametrize("name", list(BREAKS))
def test_train_checks_the_data_folder_first(name, good_data, tmp_path, capsys):
    data = Path(shutil.copytree(good_data, tmp_path / "data"))
    broken, needle = BREAKS[name]
    target = broken(data)
    out = tmp_path / "run"
    rc, _, err = run_cli(["train", "--config", "tiny", "--data", str(target), "--out", str(out),
                          "--no-progress"], capsys)
    assert_one_line_exit_2("train", rc, err, needle)
    assert not out.exists(), "training started before the data folder was checked"


def test_cmle_off_needs_no_captions(good_data, tmp_path):
    from cmg.dataset import check_training_folder

    data = Path(shutil.copytree(good_data, tmp_path / "data"))
    (data / "captions.jsonl").unlink()
    assert check_training_folder(data, 64, need_captions=False)["images"] == 30


# -- cases that need the real server or the trained run -------------------------------------
@pytest.mark.slow
def test_infer_http_against_the_grpc_port(triton, files, capsys):
    rc, _, err = run_cli(["infer", "--http", "--url", triton.grpc_url, "--timeout", "5", str(files["img"])], capsys)
    assert_one_line_exit_2("infer", rc, err, "HTTP port")


@pytest.mark.slow
def test_infer_client_deadline_is_a_deadline(files, capsys):
    """A port that accepts and never answers: the client's deadline, not 'unreachable'."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"127.0.0.1:{silent.getsockname()[1]}"
        for extra in ([], ["--http"]):
            rc, _, err = run_cli(["infer", "--url", url, "--timeout", "1", *extra, str(files["img"])], capsys)
            assert_one_line_exit_2("infer", rc, err, "within the 1 s deadline")
            assert "unreachable" not in err


@pytest.mark.slow
def test_bench_against_nothing_listening(tiny_run, tiny_onnx, tmp_path, capsys):
    rc, _, err = run_cli(["bench", "sweep", "--quick", "--run", str(tiny_run), "--out", str(tmp_path / "b"),
                          "--url", _dead(), "--modes", "served_cmg"], capsys)
    assert_one_line_exit_2("bench", rc, err, "unreachable")


@pytest.mark.slow
def test_bench_soak_against_nothing_listening(tiny_run, tiny_onnx, tmp_path, capsys):
    rc, _, err = run_cli(["bench", "soak", "--minutes", "0.1", "--run", str(tiny_run), "--out", str(tmp_path / "b"),
                          "--url", _dead()], capsys)
    assert_one_line_exit_2("bench", rc, err, "unreachable")


def test_train_counts_the_scorer_images_after_the_held_out_split(good_data, tmp_path):
    """10 normals are enough at the default val_fraction (8 train the CMER scorer, 2 held
    out), but 0.3 holds out 3: refused by the folder check, before any training, naming the
    minimum, what it is made of and the setting."""
    import dataclasses

    from cmg.config import load_config, resolve_config
    from cmg_train.train import train_run

    data = Path(shutil.copytree(good_data, tmp_path / "data"))
    (data / "captions.jsonl").unlink()
    (data / "meta.jsonl").unlink()  # part masks are optional
    for path in sorted((data / "train" / "good").iterdir())[10:]:
        path.unlink()
    cfg = load_config(resolve_config("tiny"))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_fraction=0.3),
                              cmle=dataclasses.replace(cfg.cmle, enabled=False))
    out = tmp_path / "run"
    with pytest.raises(CMGError, match=r"has 10 images .*at least 11 \(8 to train the CMER scorer on, "
                                       r"the rest held out by data.val_fraction 0.3\)"):
        train_run(cfg, data, out, progress=False)
    assert not out.exists()


def test_a_partial_captions_file_is_never_answered_with_force(good_data, tmp_path, capsys):
    """`cmg captions --force` replaces every caption: it was the hint for a file missing some,
    and following it lost 370 hand-written captions; now --force keeps the old file."""
    from cmg.dataset import check_training_folder
    from cmg_train.captions import write_captions

    data = Path(shutil.copytree(good_data, tmp_path / "data"))
    _rewrite_captions(data, lambda rows: [r for r in rows if r["file"] != "train/good/007.png"])
    with pytest.raises(CMGError) as info:
        check_training_folder(data, 64)
    assert "--force" not in str(info.value) and '{"file": "train/good/007.png", "caption": ...}' in str(info.value)
    mine = (data / "captions.jsonl").read_text()
    write_captions(data, {"train/good/000.png": "generated"}, force=True)
    backups = list(data.glob("captions.jsonl.bak-*"))
    assert len(backups) == 1 and backups[0].read_text() == mine
    assert "the old file is kept as captions.jsonl.bak-" in capsys.readouterr().err

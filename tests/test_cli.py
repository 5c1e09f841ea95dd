"""The `cmg` console script: every verb has --help, bad input is one line and exit 2.

In-process through `cmg_app.cli.main` (torch is imported once, not once per verb); the real
console process is exercised by test_bad_input.test_console_script_exit_status and the
`cmg serve` tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cmg_app.cli import VERBS, main


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0, capsys.readouterr().err
    assert "usage: cmg" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/data", "--out", "/tmp/x"], "/nonexistent/data"),
        (["train", "--config", "nosuchconfig", "--data", ".", "--out", "/tmp/x"],
         "config 'nosuchconfig' not found (shipped: "),
        (["train", "--config", "/nonexistent/x.yaml", "--data", ".", "--out", "/tmp/x"],
         "config file not found: /nonexistent/x.yaml"),
        (["eval", "--run", "/nonexistent/run"], "run folder not found"),
        (["build", "--run", "/nonexistent/run", "--target", "cpu", "--out", "/tmp/x"], "/nonexistent/run"),
        (["data", "synth", "--out", "/tmp/x", "--preset", "huge"], "huge"),
        (["infer", "--url", "127.0.0.1:1", "/nonexistent.png"], "127.0.0.1:1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"cmg {args[0]}") and message in last, err
    assert "Traceback" not in err


def test_train_defaults_to_the_config_the_docs_call_the_default():
    """`cmg train --data D --out R` trains `small` (what README's accuracy figures are), as
    `cmg bench shots` and `peer` do; `tiny` is asked for by name (CI, the demo)."""
    from cmg_app.cli import build_parser

    args = build_parser("train").parse_args(["train", "--data", "d", "--out", "r"])
    assert args.config == "small"


def test_a_verb_whose_dependency_is_missing_says_so_whatever_its_options():
    """On a host without a verb's dependency (a client machine without torch, a GPU machine
    without tritonclient) the one line names the missing module, not the options given."""
    import subprocess
    import sys

    code = ("import sys\nsys.modules['tritonclient'] = None\nfrom cmg_app.cli import main\n"
            "sys.exit(main(['build', '--run', 'RUN', '--target', 'cpu']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("cmg build: error:") and "tritonclient" in last and "needs it installed" in last, last


def test_a_path_option_starting_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--run=~/runs/x` or a quoted `~/...`: the shell leaves the tilde; it had been a folder named `~`."""
    from cmg_app.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["eval", "--run=~/runs/none"]) == 2
    assert f"run folder not found: {tmp_path / 'runs' / 'none'}" in capsys.readouterr().err


def test_a_ctrl_c_while_a_verbs_module_loads_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """The verb's module is imported before the verb runs (torch: seconds); a Ctrl-C then had
    printed 25 frames of import machinery instead of "interrupted"."""
    (tmp_path / "cmg_slow_verb_fake.py").write_text("raise KeyboardInterrupt\n")  # Ctrl-C mid-import
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(VERBS, "train", ("cmg_slow_verb_fake", VERBS["train"][1]))
    try:
        code = main(["train", "--out", "x"])
    except KeyboardInterrupt:
        code = "a traceback"
    assert code == 130
    assert capsys.readouterr().err == "cmg train: interrupted\n"


def test_an_error_is_one_line_whatever_home_is(tmp_path):
    """Where HOME could not be written (a container's non-root user, HOME=/), ONNX Runtime's
    telemetry printed a coloured warning before the one-line error (CI=true had hidden it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "ORT_DISABLE_TELEMETRY")}
    env["HOME"] = "/sys/nohome"
    done = subprocess.run([sys.executable, "-m", "cmg_app.cli", "build", "--run", str(tmp_path / "norun"),
                           "--target", "cpu", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"cmg build: error: run folder {tmp_path / 'norun'} does not exist"], done.stderr

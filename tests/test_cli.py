"""The `cmg` console script: every verb has --help, bad input is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cmg.cli import VERBS


def cmg(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cmg.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_verb_has_help(verb):
    res = cmg(verb, "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: cmg" in res.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--data", "/nonexistent/data", "--out", "/tmp/x"], "/nonexistent/data"),
        (["train", "--config", "nosuchconfig", "--data", ".", "--out", "/tmp/x"], "config file not found"),
        (["eval", "--run", "/nonexistent/run"], "run folder not found"),
        (["build", "--run", "/nonexistent/run", "--target", "cpu", "--out", "/tmp/x"], "/nonexistent/run"),
        (["data", "synth", "--out", "/tmp/x", "--preset", "huge"], "huge"),
        (["infer", "--url", "127.0.0.1:1", "/nonexistent.png"], "127.0.0.1:1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message):
    res = cmg(*args)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"cmg {args[0]}") and message in last, res.stderr
    assert "Traceback" not in res.stderr

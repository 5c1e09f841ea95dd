"""A plain (non-editable) install works away from the source tree.

`cmg build` needs the Python-backend model.py and `cmg train` the shipped configs: both
travel as package data. This test installs the project with pip (not editable) into a
temporary venv that borrows only the dependencies of the development venv, then runs
`cmg demo` from an unrelated directory. It fails if anything reaches back into the
checkout (a path computed from __file__ of the source tree, a config read from ./configs).
The demo starts from the session's tiny data and run (what a second `cmg demo` in the same
folder does): synthesis and training are covered elsewhere, and the shipped configs are
checked here by loading every one from the plain install.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Not part of a source distribution: environments, caches, run outputs, setuptools' leftovers.
SKIP = {".git", ".venv", "runs", "out", "data", "__pycache__", ".pytest_cache", ".ruff_cache"}


def _source_copy(dest: Path) -> Path:
    """The checkout's sources in a fresh folder. pip builds a local project in place, and
    setuptools' default build folder `build/` is this project's cmg_build package: building
    the checkout itself would leave build/lib (copies of every module) inside it."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        out = {n for n in names if n in SKIP or n.endswith(".egg-info")}
        if Path(folder) == ROOT / "build":
            out |= {n for n in names if n == "lib" or n.startswith("bdist.")}
        return out

    shutil.copytree(ROOT, dest, ignore=ignore, symlinks=True)
    return dest


@pytest.mark.slow
def test_plain_install_runs_the_demo_from_another_directory(tmp_path, tiny_data, tiny_run):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    # Dependencies only: a .pth line adds the dev venv's site-packages to sys.path, but the
    # .pth files inside it (the editable install's finder) are not processed from there.
    deps = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "cmg_test_deps.pth").write_text("\n".join(dict.fromkeys(deps)) + "\n")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    src = _source_copy(tmp_path / "src")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                   check=True, env=env, cwd=tmp_path)
    shutil.rmtree(src)  # nothing may reach back into the sources either
    where = subprocess.run([str(py), "-c", "import cmg, cmg_build, cmg_configs; print(cmg.__file__)"],
                           check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(venv), f"cmg imported from {where}, not from the plain install"
    shipped = subprocess.run(
        [str(py), "-c", "from cmg.config import load_config, resolve_config\n"
         "for name in ('tiny', 'small'): print(resolve_config(name)); load_config(resolve_config(name))"],
        check=True, capture_output=True, text=True, env=env, cwd=tmp_path).stdout.split()
    assert len(shipped) == 2 and all(Path(p).is_relative_to(venv) for p in shipped), shipped
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_data, elsewhere / "demo" / "data")
    shutil.copytree(tiny_run, elsewhere / "demo" / "run", ignore=shutil.ignore_patterns("onnx", "eval"))
    proc = subprocess.run([str(py), "-m", "cmg_app.cli", "demo", "--workdir", "demo", "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=elsewhere, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reusing demo/run (--fresh trains again)" in proc.stdout, proc.stdout  # same config and seed: not retrained
    report = json.loads((elsewhere / "demo" / "demo_report.json").read_text())
    assert report["frames"] > 0 and report["errors"] == 0
    assert (elsewhere / "demo" / "repo" / "cmle_encoder" / "1" / "model.py").is_file()

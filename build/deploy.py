"""`cmg deploy`: a retrained run becomes the next version of a live repository, without downtime.

The server must run with `--model-control-mode explicit` (POLL mode unloads before it
loads: triton-inference-server/server#5711). Loading an ensemble in explicit mode also
re-reads its composing models from the repository, so every step goes through the files:

  1. stage: the run is built (same target and serving settings) into a temporary folder
     and its version folders are copied in as version NEW; the composing models' configs
     keep {OLD, NEW} loaded (`version_policy: specific`) and the ensembles pin their steps
     to OLD; loading the ensembles loads NEW beside OLD, which keeps serving;
  2. check: a real inference on every composing model at version NEW;
  3. switch: the ensembles get version NEW with their steps pinned to NEW and are loaded
     (Triton swaps a reloaded model only once the new one is ready); one inference must
     be answered by ensemble version NEW;
  4. retire: the configs as built (latest version only, steps on the latest) are written
     back and the ensembles loaded once more: OLD versions unload. Then the version folders
     below OLD are removed, best effort (each deploy had added a full model set for good).

The cpu target's fused `cmg` (one Python-backend model, build/fuse.py) is an entry like an
ensemble: at stage it is pinned to OLD while the graphs it fuses (cmer_scorer, cmle_encoder)
are loaded at NEW and checked; at switch it is reloaded at NEW. Those two are unloaded again
at the end (as after a rollback) unless they were loaded before the deploy.

A load that fails at stage or switch restores the configs, removes version NEW and loads
again, so OLD keeps serving; the command exits 2 with the server's reason.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import json
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import triton_to_np_dtype

from cmg import model_config as mcfg
from cmg.contract import CMG, ENSEMBLES
from cmg.errors import CMGError
from cmg.files import write_atomic
from cmg.locks import OutputLock
from cmg_build.repository import (
    DEPLOY_RECORD,
    build,
    drop_other_versions,
    file_checksums,
    int8_on_cuda,
)
from cmg_build.server import ADMIN_KEY_FILE, admin_headers
from cmg_clients import core
from cmg_clients.client import CMGClient


class _AdminClient:
    """A gRPC client that sends the repository's admin key (cmg_build.server) with every
    model-repository call: a server in explicit mode refuses load, unload and index without it."""

    RESTRICTED = ("load_model", "unload_model", "get_model_repository_index")

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self._client = grpcclient.InferenceServerClient(core.normalize_url(url, "grpc"))
        self._headers = headers

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        return functools.partial(attr, headers=self._headers) if name in self.RESTRICTED else attr


def _client(url: str, repo: Path) -> _AdminClient:
    return _AdminClient(url, admin_headers(repo))


def _reason(exc: Exception) -> str:
    message = getattr(exc, "message", None)
    return str(message() if callable(message) else exc)


def _index(client) -> list:
    return list(client.get_model_repository_index().models)


def _versions(repo: Path, name: str) -> list[int]:
    folder = repo / name
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()) if folder.is_dir() else []


def _without_threshold(text: str) -> str:
    """A config's text without the ensemble's calibrated-threshold parameter (compared apart)."""
    cfg = mcfg.parse(text)
    mcfg.set_default_threshold(cfg, None)
    return str(cfg)


def first_difference(served: str, wanted: str) -> str:
    """The first lines where two config texts differ, for the refusal to name (dims, a
    dtype, the batch size): a user otherwise has to diff two config.pbtxt files by hand."""
    lines = [line for line in difflib.unified_diff(served.splitlines(), wanted.splitlines(), lineterm="", n=0)
             if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    old = next((line[1:].strip() for line in lines if line.startswith("-")), "(nothing)")
    new = next((line[1:].strip() for line in lines if line.startswith("+")), "(nothing)")
    return f"served {old!r}, this run {new!r}"


def _infer(client, name: str, version: int, cfg, frame: np.ndarray) -> str:
    """One real request to `name` at `version` with a frame of the contract; the answering version."""
    if cfg.platform == "ensemble":  # GPU targets require THRESHOLD: their config's default
        inputs = core.build_inputs(grpcclient, frame, mcfg.default_threshold(cfg))
        outputs = core.requested_outputs(grpcclient)
    else:  # a step: zeros of each required input's shape (what matters is that it answers)
        inputs = []
        for t in cfg.input:
            if t.optional:
                continue
            dtype = mcfg.mc.DataType.Name(t.data_type)[len("TYPE_"):]
            data = np.zeros((1, *t.dims), dtype=triton_to_np_dtype(dtype))
            inp = grpcclient.InferInput(t.name, list(data.shape), dtype)
            inp.set_data_from_numpy(data)
            inputs.append(inp)
        outputs = None
    result = client.infer(name, inputs, model_version=str(version), outputs=outputs)
    return str(result.get_response().model_version)


RECOVERY = DEPLOY_RECORD  # in the repository while a deploy has it staged: what undoes it (a build refuses it)


def _with_served_settings(served_text: str, staged_text: str) -> str:
    """The staged config with the served one's settings of the repository and its machine,
    not of the run: the ONNX Runtime thread counts (`--cpu-threads`, the cores at build time)
    and the GPU warmup samples, as served (also where a build of an older version wrote none)."""
    served, staged = mcfg.parse(served_text), mcfg.parse(staged_text)
    for key in mcfg.THREAD_PARAMETERS:
        if key in served.parameters:
            staged.parameters[key].string_value = served.parameters[key].string_value
        elif key in staged.parameters:
            del staged.parameters[key]
    del staged.model_warmup[:]
    staged.model_warmup.extend(served.model_warmup)
    return mcfg.text(staged)


class RolledBack(CMGError):
    """A deploy undone: the repository is as it was and version OLD serves."""


def undo_interrupted(repo: Path) -> dict | None:
    """A deploy stopped between stage and retire (Ctrl-C, SIGTERM, a crash) left its version
    folders and pinned configs, which refuse every later deploy: put the repository's files
    back as they were before it. Returns that deploy's record, or None when there was nothing
    to undo. The record stays until the server holds the same (`_forget`): undoing twice is
    harmless, and the record's list of what was loaded is still there for the next try."""
    path = repo / RECOVERY
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CMGError(f"{path}: the record of an interrupted deploy cannot be read ({exc}): put back "
                       f"{repo}'s config.pbtxt files and remove the version folders it added, or build the "
                       "repository again") from exc
    names = [d.name for d in repo.iterdir() if (d / "config.pbtxt").is_file()]
    originals = record.get("originals") if isinstance(record, dict) else None
    live = record.get("live", []) if isinstance(record, dict) else None
    if (not isinstance(originals, dict) or not set(originals) <= set(names)
            or not all(isinstance(t, str) for t in originals.values())
            or type(record.get("new")) is not int or record["new"] < 1
            or not isinstance(record.get("report", ""), str)
            or not (isinstance(live, list) and all(isinstance(n, str) for n in live))):
        raise CMGError(f"{path} is not a record this program writes (its models must be {repo}'s and its "
                       "version a number): nothing was undone; remove it, then check the repository or "
                       "build it again")
    for name, text in originals.items():
        (repo / name / "config.pbtxt").write_text(text)
    for name in record["originals"]:
        shutil.rmtree(repo / name / str(record["new"]), ignore_errors=True)
    if "report" in record:
        (repo / "build_report.json").write_text(record["report"])
    return record


def _forget(repo: Path) -> None:
    (repo / RECOVERY).unlink(missing_ok=True)


def _recover(client, repo: Path) -> int | None:
    """Undo an interrupted deploy on disk, then on the server: the ensembles it serves reload
    what is on disk now, and what that deploy loaded beside them (the fused graphs it
    checked) goes. Returns the version undone, or None."""
    record = undo_interrupted(repo)
    if record is None:
        return None
    loaded = {m.name for m in _index(client) if m.state == "READY"}
    for name in (n for n in ENSEMBLES if n in loaded):
        client.load_model(name)
    for name in sorted(loaded - set(record.get("live", loaded)) - set(ENSEMBLES)):
        client.unload_model(name)
    _forget(repo)
    return int(record["new"])


def deploy(run: Path, repository: Path, url: str, data: Path | None = None) -> dict:
    """Stage, check, switch, retire (module docstring); returns what was done.
    `data`: the run's training folder when it moved (int8 repositories calibrate on it).
    One deploy per repository at a time (a lock beside it): a second one would take the
    first's staged versions for an interrupted deploy's and undo them."""

    repo = Path(repository)
    if not (repo / "build_report.json").is_file():
        raise CMGError(f"{repo / 'build_report.json'} not found: --repository must be a folder written by `cmg build`")
    # resolved: `--repository .` or a link to it is the same repository, with the same lock
    lock = OutputLock(repo.resolve(), folder=True, refusal=f"{repo} is being written by another `cmg deploy` or "
                      "`cmg build` (pid {pid}), or a server is loading it (lock {lock}): one at a time; wait for "
                      "it to end")
    with lock:
        return _deploy(run, repo, url, data)


def _deploy(run: Path, repo: Path, url: str, data: Path | None) -> dict:
    report_path = repo / "build_report.json"
    client = _client(url, repo)
    try:
        _index(client)
    except Exception as exc:  # noqa: BLE001 - any transport failure: say which server
        if "restricted" in _reason(exc):
            held = (f"refused {repo}'s admin key ({ADMIN_KEY_FILE})" if (repo / ADMIN_KEY_FILE).is_file()
                    else f"restricts its model-repository API, and {repo} holds no {ADMIN_KEY_FILE}")
            raise CMGError(f"server {url} {held}: it serves another repository, or was not started with "
                           "`cmg serve --model-control-mode explicit` on this one") from exc
        raise CMGError(f"server {url} does not answer: {_reason(exc)}") from exc
    try:
        undone = _recover(client, repo)
    except CMGError:
        raise
    except Exception as exc:  # noqa: BLE001 - the files are back; the server did not take them
        raise CMGError(f"server {url}: reloading {repo} after undoing an interrupted deploy failed: "
                       f"{_reason(exc)}") from exc
    if undone is not None:
        print(f"cmg deploy: an interrupted deploy of version {undone} was undone first", file=sys.stderr)
    index = _index(client)  # what serves, and every version the server remembers (below)
    live = {m.name: m for m in index if m.state == "READY"}
    built = json.loads(report_path.read_text())  # after the undo: the report of what serves
    configs = {name: mcfg.read(repo / name / "config.pbtxt")
               for name in built["models"] if (repo / name / "config.pbtxt").is_file()}
    # The models clients call: ensembles, and the cpu target's fused cmg (a plain model).
    ensembles = [n for n in ENSEMBLES if n in configs and n in live]
    if not ensembles:
        raise CMGError(f"no ensemble of {repo} is loaded on {url}: start it with "
                       f"`cmg serve --repository {shlex.quote(str(repo))} --model-control-mode explicit --load-model cmg`")
    fused_steps = sorted({m for e in ensembles for m in built["models"][e].get("fused", ())})
    steps = sorted({s.model_name for e in ensembles for s in configs[e].ensemble_scheduling.step} | set(fused_steps))
    old = max(int(live[e].version) for e in ensembles)
    # Above every version on disk and every one the server remembers: an undone deploy's number,
    # reused, met the server's record of it ("unloaded") and every later deploy was refused.
    known = [int(m.version) for m in index if m.name in configs and str(m.version).isdigit()]
    new = max([v for name in configs for v in _versions(repo, name)] + known) + 1

    originals = {name: (repo / name / "config.pbtxt").read_text() for name in configs}

    def write(name: str, cfg) -> None:
        mcfg.write(cfg, repo / name)

    def pinned(ensemble: str, version: int, text: str | None = None):
        """The ensemble's config (on disk, or `text`) serving only `version`, every step pinned to it."""
        cfg = mcfg.parse(text) if text is not None else mcfg.read(repo / ensemble / "config.pbtxt")
        cfg.version_policy.specific.versions[:] = [version]
        for step in cfg.ensemble_scheduling.step:
            step.model_version = version
        return cfg

    def load_all() -> None:
        # Ensembles first: loading a step makes Triton reload the ensembles that use it with the
        # config it last loaded them with, not the one on disk; an ensemble still at "latest"
        # then ran a new step beside an old one (cmg_exact mixed two runs' outputs).
        for e in ensembles:
            client.load_model(e)
        for name in fused_steps:  # no ensemble loads them: loaded by name to be checked at NEW
            client.load_model(name)

    def pin_ensembles(version: int, texts: dict[str, str] | None = None) -> None:
        """Every ensemble loaded pinned to `version` (its steps too) before any step changes:
        whatever Triton reloads with its last config from then on stays at one version."""
        for e in ensembles:
            write(e, pinned(e, version, (texts or {}).get(e)))
        for e in ensembles:
            client.load_model(e)

    def failed_versions() -> list[str]:
        return [f"{m.name} version {m.version}: {m.reason}" for m in _index(client)
                if m.name in steps + ensembles and m.version == str(new) and m.state != "READY"]

    def release() -> None:
        """Fused graphs loaded only to be checked go again: the server keeps what it served."""
        for name in fused_steps:
            if name not in live:
                client.unload_model(name)

    def roll_back(reason: str) -> CMGError:
        with contextlib.suppress(Exception):  # (a lost server: the files are undone all the same)
            pin_ensembles(old, originals)  # while the steps still hold OLD and NEW (OLD's threshold too)
        undo_interrupted(repo)
        try:
            load_all()
            release()
            _forget(repo)  # files and server agree again; kept otherwise, for the next deploy to finish
        except Exception as exc:  # noqa: BLE001 - the old version's own state decides
            reason += f" (reload of version {old} after it: {_reason(exc)})"
        return RolledBack(f"deploy of {run} as version {new} failed, version {old} still serves: {reason}")

    serving = built.get("serving", {})
    with tempfile.TemporaryDirectory(prefix="cmg-deploy-") as tmp:
        staged = Path(tmp) / "repo"
        cpu_cmg = "fused" if built["models"].get(CMG, {}).get("fused") else "ensemble"
        kind = "cpu" if built["target"] == "cpu" else built.get("kind", "cpu")  # a cpu repository is CPU-only
        precision = built.get("precision", {}).get("precision", "fp32")  # an int8 repository stays int8
        refuse_unbuildable(repo, built["target"], kind, precision)
        staged_report = build(run, built["target"], staged, kind, serving.get("max_batch"),
              serving.get("opt_batch"), serving.get("instances"), version=new, cpu_cmg=cpu_cmg,
              precision=precision, data=data)
        staged_texts = {name: _with_served_settings(originals[name], (staged / name / "config.pbtxt").read_text())
                        for name in configs}
        for name in configs:
            # The calibrated threshold (GPU targets' ensembles) belongs to the run: it may differ.
            served, wanted = _without_threshold(originals[name]), _without_threshold(staged_texts[name])
            if wanted != served:
                raise CMGError(f"run {run}: model {name} needs another config.pbtxt than {repo} serves "
                               f"({first_difference(served, wanted)}): build a new repository for it")
        # From here until retire, the record beside the models says how to undo this deploy
        write_atomic(repo / RECOVERY, json.dumps({"run": str(run), "new": new, "old": old, "originals": originals,
                                                   "report": report_path.read_text(), "live": sorted(live)}))
        try:
            # The ensembles pinned to OLD before NEW exists on disk: reloaded now, their steps
            # reload at OLD alone, and every reload Triton makes with their last config from here
            # on (when a step they use is loaded) keeps them at one version.
            pin_ensembles(old)
            for name in configs:
                shutil.copytree(staged / name / str(new), repo / name / str(new))
        except BaseException as exc:
            err = roll_back(f"{type(exc).__name__}: {_reason(exc)}" if isinstance(exc, Exception) else "interrupted")
            if isinstance(exc, Exception):
                raise err from exc
            print(f"cmg deploy: {err}", file=sys.stderr)
            raise

    def _stage_check_switch() -> None:
        """Steps 1-3 of the module docstring; a failure the server names raises roll_back's error."""
        # 1. stage (the ensembles serve OLD, pinned, since before NEW was copied in)
        for name in steps:
            cfg = mcfg.read(repo / name / "config.pbtxt")
            cfg.version_policy.specific.versions[:] = [old, new]
            write(name, cfg)
        try:
            load_all()
        except Exception as exc:  # noqa: BLE001 - the server's reason is the message
            raise roll_back(_explained(_reason(exc))) from exc
        if failed_versions():
            raise roll_back("; ".join(failed_versions()))
        # 2. check every step at NEW
        with CMGClient(url, "grpc", model=ensembles[0], timeout_s=30) as probe:
            frame = np.zeros((1, *probe.size, 3), dtype=np.uint8)
        for name in steps:
            try:
                _infer(client, name, new, configs[name], frame)
            except Exception as exc:  # noqa: BLE001
                raise roll_back(f"{name} version {new} does not answer: {_reason(exc)}") from exc
        # 3. switch (with the new run's calibrated threshold where the ensemble carries one)
        for e in ensembles:
            cfg = pinned(e, new)
            new_thr = mcfg.default_threshold(mcfg.parse(staged_texts[e]))
            if new_thr is not None:
                mcfg.set_default_threshold(cfg, new_thr)
            write(e, cfg)
        try:
            load_all()
            answered = [_infer(client, e, new, configs[e], frame) for e in ensembles]
        except Exception as exc:  # noqa: BLE001
            raise roll_back(_reason(exc)) from exc
        if failed_versions() or any(v != str(new) for v in answered):
            raise roll_back("; ".join(failed_versions()) or f"answered by versions {answered}")

    try:
        _stage_check_switch()
    except RolledBack:
        raise  # the repository is as it was and OLD serves
    except BaseException as exc:  # Ctrl-C, SIGTERM, a lost server: undo first, then let it go on
        err = roll_back(f"{type(exc).__name__}: {_reason(exc)}" if isinstance(exc, Exception) else "interrupted")
        if isinstance(exc, Exception):
            raise err from exc
        print(f"cmg deploy: {err}", file=sys.stderr)
        raise
    # 4. retire (the new run's configs: the same as the old but for the threshold)
    for name, text in staged_texts.items():
        (repo / name / "config.pbtxt").write_text(text)
    # The report says what the repository serves now (the engine runner and the bench read its
    # version and threshold): the new build's, with the deploys so far
    history = [*built.get("deployed", []), {"version": new, "run": str(run), "replaced_version": old}]
    report = staged_report | {"deployed": history}
    files = file_checksums(repo)
    write_atomic(report_path, json.dumps(report | {"files": files}, indent=2))
    _forget(repo)  # the repository now holds the new run as built: nothing to undo
    # Then, done deploying, the older versions' folders go: NEW and the version it replaced
    # stay (NEW is the highest on disk, so the next number is still above every one taken).
    # Best effort: a failure here must not make a deploy that switched look interrupted.
    try:
        dropped = drop_other_versions(repo, list(configs), {old, new})
    except OSError as exc:
        dropped = None
        print(f"cmg deploy: version {new} serves; removing older version folders failed ({exc}): the next "
              "deploy tries again", file=sys.stderr)
    if dropped:
        print(f"cmg deploy: removed version folder(s) {', '.join(dropped)} (the repository keeps version {new} "
              f"and version {old}, which it replaced)", file=sys.stderr)
    if dropped != []:  # the report lists the files the repository holds: those left, not hashed again
        files = file_checksums(repo) if dropped is None else {
            f: digest for f, digest in files.items() if "/".join(Path(f).parts[:2]) not in dropped}
        write_atomic(report_path, json.dumps(report | {"files": files}, indent=2))
    try:
        load_all()
        release()
        state = {(m.name, m.version): m.state for m in _index(client)}
    except Exception as exc:  # noqa: BLE001 - version NEW answered; only unloading OLD is left undone
        raise CMGError(f"version {new} of {run} serves and {repo} holds it, but unloading version {old} "
                       f"failed: {_reason(exc)}; a restart of the server serves version {new} alone") from exc
    finally:
        client.close()
    return {"run": str(run), "repository": str(repo), "url": url, "old_version": old, "new_version": new,
            "ensembles": ensembles, "steps": steps,
            "old_state": {n: state.get((n, str(old)), "") for n in steps + ensembles}}


def refuse_unbuildable(repo: Path, target: str, kind: str, precision: str) -> None:
    """A repository `cmg build` no longer makes takes no new version: said before anything moves."""
    if int8_on_cuda(target, kind, precision):
        raise CMGError(f"{repo} is an int8 onnxruntime repository on GPU instances, which `cmg build` no longer "
                       "makes (ONNX Runtime's CUDA provider runs those graphs without int8 kernels): build a new "
                       "repository (fp32, or --target tensorrt --precision int8) and serve it")


def _explained(reason: str) -> str:
    """The server's reason, with the fix where Triton's words do not name it."""
    if "not allowed if polling is enabled" in reason:
        return (f"{reason} (the server does not take explicit loads: start it with "
                "`cmg serve --repository REPO --model-control-mode explicit --load-model cmg`)")
    return reason


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="retrained run (with onnx/ from `cmg export`)")
    parser.add_argument("--repository", type=Path, required=True, help="the repository the live server serves")
    parser.add_argument("--url", required=True, help="gRPC HOST:PORT of that server (explicit model control)")
    parser.add_argument("--data", type=Path, default=None,
                        help="the run's training folder, when it moved since `cmg train` (an int8 repository "
                             "calibrates the new version on its normal images)")


def run(args: argparse.Namespace) -> int:
    result = deploy(args.run, args.repository, args.url, args.data)
    print(f"deployed {args.run} as version {result['new_version']} of {', '.join(result['ensembles'])}; "
          f"version {result['old_version']} retired", file=sys.stderr)
    print(json.dumps(result))
    return 0

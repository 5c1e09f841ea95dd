"""cmg bench: the FLOP counter on hand-made graphs, the CLI's errors, and the written files'
structure from a real (smoke-sized) run. Never the speed: the machine is shared."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cmg_app.cli import main
from cmg_bench import flops
from cmg_bench.modes import MODES, batches


def _toy_model(dynamic_reshape: bool = False) -> onnx.ModelProto:
    """[N,3,10,10] -Conv(5x3x3x3)-> [N,5,8,8] -Reshape-> [N,5,64] -MatMul(64x16)-> [N,5,16]
    -Flatten-> [N,80] -Gemm(80x3, transB)-> [N,3]. Known FLOPs at batch 1:
    Conv 2*5*8*8*(3*3*3) = 17280, MatMul 2*5*64*16 = 10240, Gemm 2*80*3 = 480."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((64, 16)).astype(np.float32), "M"),
        numpy_helper.from_array(rng.standard_normal((3, 80)).astype(np.float32), "G"),
    ]
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["r"])]
    if dynamic_reshape:
        # Shape computed in-graph from a runtime value: static inference cannot always follow it.
        inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero"))
        inits.append(numpy_helper.from_array(np.array([5, 64], np.int64), "tail"))
        nodes += [helper.make_node("Shape", ["r"], ["s"]),
                  helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
                  helper.make_node("Concat", ["n", "tail"], ["shape"], axis=0)]
    else:
        inits.append(numpy_helper.from_array(np.array([-1, 5, 64], np.int64), "shape"))
    nodes += [helper.make_node("Reshape", ["r", "shape"], ["f"]),
              helper.make_node("MatMul", ["f", "M"], ["m"], name="matmul"),
              helper.make_node("Flatten", ["m"], ["fl"], axis=1),
              helper.make_node("Gemm", ["fl", "G"], ["y"], transB=1, name="gemm")]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 10, 10])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("dynamic_reshape", [False, True])
def test_flop_counter_known_graph(dynamic_reshape):
    res = flops.count_model(_toy_model(dynamic_reshape))
    assert res["by_op"] == {"Conv": 17280, "MatMul": 10240, "Gemm": 480}
    assert res["flops"] == 17280 + 10240 + 480
    assert res["nodes"] == 3 and res["unresolved"] == []
    assert flops.count_model(_toy_model(dynamic_reshape), batch=4)["flops"] == 4 * res["flops"]


def test_flop_counter_runtime_fallback(monkeypatch):
    """Values static inference leaves symbolic get their shapes from one ONNX Runtime pass."""
    real = flops._shapes

    def forget(model):
        shapes = real(model)
        shapes.update(f=None, m=None)
        return shapes

    monkeypatch.setattr(flops, "_shapes", forget)
    res = flops.count_model(_toy_model())
    assert res["runtime_shapes"] == 2
    assert res["by_op"] == {"Conv": 17280, "MatMul": 10240, "Gemm": 480}


def test_flop_counter_file(tmp_path):
    path = tmp_path / "toy.onnx"
    onnx.save(_toy_model(), str(path))
    assert flops.count_file(path)["flops"] == 28000
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        flops.count_file(tmp_path / "missing.onnx")


def test_batches_wrap_over_frames():
    frames = np.arange(5)[:, None, None, None].repeat(2, 1).astype(np.uint8)
    pool = batches(frames, 3)
    assert [b[:, 0, 0, 0].tolist() for b in pool] == [[0, 1, 2], [3, 4, 0]]
    assert all(b.flags["C_CONTIGUOUS"] for b in pool)


def test_bench_cli_errors(tmp_path, capsys):
    assert main(["bench", "sweep", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    assert main(["bench", "sweep", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "o"), "--batch", "0"]) == 2
    assert "positive integers" in capsys.readouterr().err


def test_bench_sub_verbs_take_only_their_own_options(tmp_path, capsys):
    """`--soak 5 --servers` once ran only the soak, silently: each sub-verb now refuses another's options."""
    assert main(["bench", "soak", "--run", str(tmp_path), "--out", str(tmp_path / "o"), "--minutes", "5",
                 "--servers"]) == 2
    assert "cmg bench: error: unrecognized arguments: --servers" in capsys.readouterr().err


def test_bench_lists_its_sub_verbs(capsys):
    from cmg_bench.bench import SUBVERBS

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = capsys.readouterr().out
    assert all(name in out for name in SUBVERBS)


@pytest.fixture
def private_tmp(tmp_path, monkeypatch) -> Path:
    """tempfile's folder for this test only: what a started server leaves behind shows."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith("cmg-triton-")]


@pytest.mark.slow
def test_bench_smoke_structure(tiny_run, tmp_path, private_tmp):
    """The CLI path (build a cpu repository, start tritonserver, measure all modes) on a
    smoke-sized sweep; checks what is written, not how fast anything was."""
    out = tmp_path / "bench"
    rc = main(["bench", "sweep", "--run", str(tiny_run), "--out", str(out), "--quick", "--concurrency", "1,2",
               "--batch", "1,2", "--window", "0.2", "--warmup", "0.05", "--repeats", "3"])
    assert rc == 0
    assert not _leftovers(private_tmp), "the server's temporary folder was left behind"
    data = json.loads((out / "bench.json").read_text())
    assert {"machine", "modes", "ratios", "flops", "accuracy", "settings"} <= set(data)
    assert data["machine"]["cpu_count"] >= 1 and data["machine"]["peak_gflops"] > 0
    assert [m["name"] for m in data["modes"]] == list(MODES)
    for mode in data["modes"]:
        assert 0.0 <= mode["auroc"] <= 1.0
        assert {(p["concurrency"], p["batch"]) for p in mode["points"]} == {(1, 1), (2, 1), (1, 2), (2, 2)}
        for p in mode["points"]:
            assert {"concurrency", "batch", "throughput", "p50_ms", "p90_ms", "p95_ms", "p99_ms"} <= set(p)
            assert p["requests"] >= 1 and p["p50_ms"] <= p["p90_ms"] <= p["p95_ms"] <= p["p99_ms"]
        assert mode["flops_per_frame"] > 0
    exact = next(m for m in data["modes"] if m["name"] == "served_cmg_exact")
    onepass = next(m for m in data["modes"] if m["name"] == "served_cmg")
    assert exact["flops_per_frame"] > onepass["flops_per_frame"]  # P+1 teacher passes
    for name in ("onepass_vs_exact_throughput", "served_vs_torch_eager_throughput",
                 "served_vs_ort_inprocess_throughput", "onepass_vs_exact_p50_latency",
                 "served_vs_ort_inprocess_p50_latency"):
        ratio = data["ratios"][name]
        assert len(ratio["pairs"]) == 3
        assert ratio["median"] == pytest.approx(float(np.median([p["ratio"] for p in ratio["pairs"]])))
    assert data["ratios"]["served_vs_ort_inprocess_throughput"]["a"]["concurrency"] == 8
    # One source of threads: every mode runs the repository's intra-op count (issue 13).
    repo_threads = data["settings"]["repository_intra_op_threads"]
    assert set(data["threads"]) == set(MODES) and data["threads"].pop("served_cmg_exact") == repo_threads["cmer_teacher"]
    assert set(data["threads"].values()) == {repo_threads["cmg"]}  # the graph(s) `cmg` is served with
    # A peak that bounds: stated method, theoretical figure, measured GEMM next to it, shares <= 1.
    peak = data["machine"]["peak"]
    assert data["machine"]["peak_method"] and peak["measured_gemm"]["gflops"] <= data["machine"]["peak_gflops"]
    assert all(0 < m["fraction_of_peak"] <= 1.0 for m in data["modes"])
    # int8: its ratio and its AUROC delta (fp32 minus int8) are recorded.
    int8 = data["ratios"]["int8_vs_fp32_throughput"]
    assert int8["a"]["mode"] == "ort_int8" and int8["b"]["mode"] == "ort_inprocess" and int8["goal"] == ">= 1.5"
    aurocs = {m["name"]: m["auroc"] for m in data["modes"]}
    assert data["accuracy"]["int8_auroc_delta"] == pytest.approx(aurocs["ort_inprocess"] - aurocs["ort_int8"])
    # Same weights, same frames: the served one-pass scores equal in-process ONNX Runtime's.
    assert data["parity_max_abs_score_diff"]["modes"]["served_cmg"] < 1e-4
    md = (out / "bench.md").read_text()
    assert "| Concurrency | Batch | Inferences/Second |" in md and "onepass_vs_exact_throughput" in md
    for name in (*(f"latency_throughput_{m}.png" for m in MODES), "ratios.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


@pytest.mark.slow
def test_soak_short(tiny_run, tmp_path, capsys, private_tmp):
    """`cmg bench soak --minutes 0.2`: 12 s at 80% of measured capacity through the stream client;
    what is written, not how fast (the machine is shared)."""
    out = tmp_path / "soak"
    rc = main(["bench", "soak", "--minutes", "0.2", "--run", str(tiny_run), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert not _leftovers(private_tmp), "the server's temporary folder was left behind"
    data = json.loads((out / "soak.json").read_text())
    assert data["load"] == 0.8 and data["target_fps"] == pytest.approx(0.8 * data["capacity"]["throughput"])
    assert data["frames"] == data["planned_frames"] == round(data["target_fps"] * 12) > 0
    assert data["errors"] == 0 and data["aborted"] is None
    lines = (out / "soak.jsonl").read_text().splitlines()
    assert len(lines) == data["frames"]
    assert sum(m["frames"] for m in data["per_minute"]) == data["frames"]
    assert all(m["p50_ms"] <= m["p99_ms"] for m in data["per_minute"])
    procs = set(data["rss_start_mib"])
    assert {"tritonserver", "cmer_scorer stub", "cmle_encoder stub"} <= procs, procs
    assert set(data["rss_end_mib"]) == procs and all(v > 1 for v in data["rss_end_mib"].values())
    assert len(data["rss_samples"]) >= 3
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "soak.md").read_text()
    assert "| tritonserver |" in md and "| minute | frames | errors | p50 ms | p99 ms |" in md


@pytest.mark.slow
def test_an_interrupted_soak_still_writes_what_it_measured(tiny_run, triton, tmp_path, monkeypatch):
    """Ctrl-C mid-stream (the interrupt raised from the 10th line's callback): soak.json,
    .md and .png hold the frames so far, marked interrupted, and the interrupt goes on."""
    from cmg_bench import soak as soak_mod

    real = soak_mod.run_stream

    def cut_short(opts, summary):
        counted, inner = [], opts.on_line

        def on_line(line):
            inner(line)
            counted.append(line)
            if len(counted) == 10:
                raise KeyboardInterrupt

        opts.on_line = on_line
        return real(opts, summary)

    monkeypatch.setattr(soak_mod, "run_stream", cut_short)
    out = tmp_path / "soak"
    with pytest.raises(KeyboardInterrupt):
        soak_mod.soak(tiny_run, out, minutes=5, url=triton.grpc_url, progress=False)
    data = json.loads((out / "soak.json").read_text())
    assert data["aborted"] == "interrupted" and data["frames"] == 10 < data["planned_frames"]
    assert sum(m["frames"] for m in data["per_minute"]) == 10 and data["p50_ms"] > 0
    assert "ABORTED: interrupted" in (out / "soak.md").read_text()
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_keeps_client_batches_within_the_served_models_limit(capsys):
    """`small` serves at most 8 frames per request; the full sweep's batch 32 is dropped with
    a note instead of failing mid-run, and a served mode refuses a larger batch by name."""
    from cmg.errors import CMGError
    from cmg_bench.modes import Served
    from cmg_bench.sweep import Settings, fit_served_batches

    served = Served.__new__(Served)  # the limit is all this needs; no server
    served.model, served.max_batch = "cmg", 8
    full = Settings((1, 4), (1, 8, 32), None)
    fitted = fit_served_batches(full, {"served_cmg": served})
    assert fitted.batch == (1, 8) and fitted.exact_key[1] <= 8
    assert "max_batch_size 8" in capsys.readouterr().out
    assert fit_served_batches(full, {}) is full  # in-process modes only: nothing to fit
    with pytest.raises(CMGError, match=r"client batch 32 is above model 'cmg''s max_batch_size 8"):
        served.measure(1, 32, None)


def test_call_peak_bytes_sees_memory_freed_inside_the_call():
    from cmg_bench.memory import available_bytes, call_peak_bytes

    def hold(mb: int) -> None:
        block = np.ones(mb * 2**20 // 8)  # pages touched: resident while the call runs
        time.sleep(0.05)
        del block

    small, large = call_peak_bytes(lambda: hold(16)), call_peak_bytes(lambda: hold(256))
    assert small is not None and large is not None and available_bytes() > 0
    assert 200 * 2**20 < large < 400 * 2**20 and small < 64 * 2**20


def test_in_process_points_that_would_not_fit_in_memory_are_skipped(monkeypatch):
    """A real in-process mode that holds 256 MB per call, on a machine said to have 1 GB
    free: 2 concurrent calls run, 8 (2 GB) are named and skipped, concurrency 1 always runs.
    (The full sweep on `small` was OOM-killed at 32 concurrent calls: about 30 GB.)"""
    from cmg_bench import common
    from cmg_bench.loadgen import Window
    from cmg_bench.modes import InProcessMode
    from cmg_bench.sweep import Settings

    class Holder(InProcessMode):
        name = "holder"

        def infer(self, frames: np.ndarray) -> np.ndarray:
            block = np.ones(256 * 2**20 // 8)
            time.sleep(0.02)
            return np.full(len(frames), block[0], np.float32)

    class Bar:
        def __init__(self):
            self.lines = []

        def set_postfix_str(self, text):
            pass

        def update(self, n):
            pass

        def write(self, line):
            self.lines.append(line)

    monkeypatch.setattr(common, "available_bytes", lambda: 2**30)
    mode, bar = Holder(np.zeros((4, 8, 8, 3), np.uint8)), Bar()
    window = Window(warmup_s=0.0, window_s=0.1, min_requests=1, max_window_s=5.0)
    points = common.measure_grid("holder", mode, Settings((1, 2, 8), (1,), window), bar)
    assert [p["concurrency"] for p in points] == [1, 2]
    assert [(s["concurrency"], s["batch"]) for s in mode.skipped] == [(8, 1)]
    assert "8 concurrent calls need about 2." in mode.skipped[0]["reason"]
    assert bar.lines and "holder c8 b1 not measured" in bar.lines[0]

    # The ratio pairs obey the same guard: a point the grid skipped, or a key point outside
    # the grid that would not fit, is not measured there either; the pair says why.
    from cmg_bench.modes import ORT_INPROCESS, ORT_INT8
    from cmg_bench.sweep import measure_ratios

    twin = Holder(np.zeros((4, 8, 8, 3), np.uint8))
    common.measure_grid("twin", twin, Settings((1, 2, 8), (1,), window), bar)
    for key in ((8, 1), (16, 1)):  # skipped in the grid; outside it
        settings = Settings((1, 2, 8), (1,), window, repeats=1, exact_key=key)
        ratios, refused = measure_ratios({ORT_INT8: twin, ORT_INPROCESS: mode}, settings, {}, bar)
        assert ratios == {} and set(refused) == {"int8_vs_fp32"}
        assert f"c{key[0]} b1: {key[0]} concurrent calls need about" in refused["int8_vs_fp32"]
    ratios, refused = measure_ratios({ORT_INT8: twin, ORT_INPROCESS: mode},
                                     Settings((1, 2, 8), (1,), window, repeats=1, exact_key=(2, 1)), {}, bar)
    assert refused == {} and ratios["int8_vs_fp32_throughput"]["a"]["concurrency"] == 2


def test_a_signal_mid_point_ends_the_async_workers_before_it_propagates():
    """SIGTERM (cmg_app raises it as an exception) or Ctrl-C while an async point runs: the
    exception reaches the caller and no worker task is left pending on the loop (asyncio
    printed "Task was destroyed but it is pending" for each at exit before)."""
    import asyncio

    from cmg_bench.loadgen import Window, run_async

    async def call(i: int) -> None:
        await asyncio.sleep(0.01)

    def interrupt() -> None:
        raise KeyboardInterrupt

    loop = asyncio.new_event_loop()
    try:
        loop.call_later(0.2, interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_async(call, 4, 1, Window(warmup_s=0.0, window_s=30.0, min_requests=1, max_window_s=60.0), loop)
        assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
    finally:
        loop.close()


def test_a_sweep_stopped_early_leaves_no_earlier_results_looking_current(tmp_path, monkeypatch):
    """An earlier sweep's bench.json, bench.md, readme_performance.md and PNGs stay while the
    inputs are checked (a mistyped --data costs nothing) and go before anything is built or
    measured: a sweep interrupted after that leaves none of them behind."""
    from cmg_bench import sweep

    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").touch()
    out = tmp_path / "bench"
    out.mkdir()
    earlier = ["bench.json", "bench.md", "readme_performance.md", "ratios.png", "latency_throughput_served_cmg.png"]
    for name in earlier:
        (out / name).write_text("an earlier sweep's")
    (out / "notes.txt").write_text("the user's")
    contract = {"height": 64, "width": 64, "grid": 8, "embed_dim": 32, "map_size": 16}
    monkeypatch.setattr(sweep, "ensure_export", lambda _run: (run / "onnx", {"contract": contract}))
    with pytest.raises(FileNotFoundError, match="typo"):
        sweep.bench(run, out, sweep.Settings.quick(), data=tmp_path / "typo")
    assert sorted(p.name for p in out.iterdir()) == sorted([*earlier, "notes.txt"])

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "resolve_data", lambda _run, data: data)
    monkeypatch.setattr(sweep, "load_test_frames", lambda *_a: (np.zeros((2, 64, 64, 3), np.uint8), np.array([0, 1])))
    monkeypatch.setattr(sweep, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep.bench(run, out, sweep.Settings.quick(), data=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_a_served_modes_accuracy_pass_keeps_the_modes_long_deadline(monkeypatch):
    """The untimed accuracy pass of a served mode uses the mode's deadline (120 s), not the
    line client's 10 s default: the exact teacher's chunks outlasted 10 s on a busy CI host.
    (The client is a stand-in that records what it is given: a deadline cannot be shown to
    be long enough by a server fast enough to answer in time.)"""
    from cmg import contract as C
    from cmg_bench import modes

    seen = {}

    class Recorder:
        def __init__(self, url, protocol, model, timeout_s):
            seen["timeout_s"] = timeout_s

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def infer_arrays(self, frames, threshold):
            return {C.ANOMALY_SCORE: np.zeros(len(frames), np.float32)}

    monkeypatch.setattr(modes, "CMGClient", Recorder)
    served = object.__new__(modes.Served)
    served.url, served.model, served.threshold, served.timeout_s = "127.0.0.1:1", C.CMG, None, modes.ACCURACY_TIMEOUT_S
    assert served.scores(np.zeros((3, 8, 8, 3), np.uint8)).shape == (3,)
    assert seen["timeout_s"] == modes.ACCURACY_TIMEOUT_S >= 60


def _pairs(metric: str, a: list[float], b: list[float]) -> list[tuple[dict, dict]]:
    return [({metric: x}, {metric: y}) for x, y in zip(a, b, strict=True)]


def test_ratio_entry_is_a_over_b_and_met_follows_the_goal():
    """Guards the sweep's ratio direction (A / B, not B / A) and its `met` against the goal."""
    from cmg_bench.sweep import GOALS, _ratio_entry

    a, b = {"mode": "ort_int8"}, {"mode": "ort_inprocess"}
    fast = _ratio_entry("int8_vs_fp32_throughput", a, b, "throughput", _pairs("throughput", [30, 20, 45], [10, 10, 10]))
    assert fast["median"] == pytest.approx(3.0) and [p["ratio"] for p in fast["pairs"]] == pytest.approx([3, 2, 4.5])
    assert fast["met"] is True and fast["goal"] == f">= {GOALS['int8_vs_fp32_throughput'][1]}"
    slow = _ratio_entry("int8_vs_fp32_throughput", a, b, "throughput", _pairs("throughput", [10, 10, 10], [30, 20, 45]))
    assert slow["median"] == pytest.approx(1 / 3) and slow["met"] is False
    assert "met" not in _ratio_entry("x_p50_latency", a, b, "p50_ms", _pairs("p50_ms", [2], [1]))


def _bench_result(ratios: dict) -> dict:
    """The least of a bench.json that report.write_markdown / write_readme_section read."""
    peak = {"measured_gemm": {"gflops": 50.0, "method": "gemm"}, "int8_gops": 200.0, "int8_method": "vnni"}
    return {"machine": {"cpus_usable": 2, "cpu_count": 2, "cpu_model": "", "platform": "linux", "python": "3",
                        "gpu": False, "peak_gflops": 100.0, "peak_method": "fma", "peak": peak},
            "threads": {"ort": 2}, "run": "r", "data": "d", "accuracy": {"test_images": 4, "anomalous": 2},
            "settings": {"window": {"warmup_s": 1, "window_s": 3, "min_requests": 20}, "repeats": 3,
                         "ort_key": [4, 1]},
            "ratios": ratios, "modes": [], "parity_max_abs_score_diff": {"reference": "x", "modes": {}},
            "flops": {"note": "n", "per_model": {}}, "seconds": 1.0}


def test_bench_tables_say_which_ratio_goals_were_not_met(tmp_path):
    """Guards bench.md's (and the results section's) "met" column: a missed goal reads NO, not yes."""
    from cmg_bench import report
    from cmg_bench.sweep import _ratio_entry

    a, b = {"mode": "a", "concurrency": 1, "batch": 1}, {"mode": "b", "concurrency": 1, "batch": 1}
    ratios = {"int8_vs_fp32_throughput": _ratio_entry("int8_vs_fp32_throughput", a, b, "throughput",
                                                      _pairs("throughput", [30], [10])),
              "served_vs_ort_inprocess_throughput": _ratio_entry("served_vs_ort_inprocess_throughput", a, b,
                                                                 "throughput", _pairs("throughput", [5], [10]))}
    report.write_markdown(_bench_result(ratios), tmp_path / "bench.md")
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "bench.md").read_text().splitlines()
            if line.startswith("| ") and "_vs_" in line}
    assert rows["int8_vs_fp32_throughput"].endswith("| >= 1.5 | yes |")
    assert rows["served_vs_ort_inprocess_throughput"].endswith("| >= 0.85 | NO |")
    report.write_readme_section(_bench_result(ratios), tmp_path / "results.md")
    text = (tmp_path / "results.md").read_text()
    assert "| >= 0.85 | **no** |" in text and "| >= 1.5 | yes |" in text


def test_a_slow_points_rate_is_not_rounded_to_its_few_requests_and_skips_cold_requests():
    """A slow point (few requests per window): its rate is each request's share of the window,
    not whole answers over a window that opens after one answer and closes on another, which
    read such points up to a third too fast (+24 to +33% measured at 0.5-2 s per request). And
    the warm-up lasts until every worker has had an answer: a cold first request (4 times the
    others here) set p99 before."""
    from cmg_bench.loadgen import Window, run_threads

    latencies: list[float] = []

    def call(i: int) -> None:
        t = time.perf_counter()
        time.sleep(0.6 if i == 0 else 0.15)
        latencies.append(time.perf_counter() - t)

    point = run_threads(call, 1, 8, Window(warmup_s=0.0, window_s=0.2, min_requests=3, max_window_s=10.0))
    true = 8 / float(np.median(latencies[1:]))  # one worker, back to back: batch / latency
    assert abs(point.throughput / true - 1) < 0.1, (point.throughput, true)
    assert point.p99_ms < 500 and point.requests >= 3


@pytest.mark.parametrize(("verb", "option", "value"), [
    ("sweep", "--window", "inf"), ("sweep", "--window", "nan"), ("sweep", "--warmup", "inf"),
    ("sweep", "--repeats", "0"), ("peer", "--warmup", "nan"), ("tradeoff", "--window", "inf")])
def test_bench_windows_are_finite_on_the_command_line(verb, option, value, tmp_path, capsys):
    """`--window inf` was accepted and never closed (the cap on a window is past the window),
    `--window nan` measured 10 ms; `bench tradeoff` reached the hang only after every training."""
    with pytest.raises(SystemExit) as info:
        main(["bench", verb, "--run" if verb == "sweep" else "--data", str(tmp_path), "--out", str(tmp_path / "o"),
              option, value])
    assert info.value.code == 2 and f"argument {option}" in capsys.readouterr().err


def test_a_zero_warm_up_is_allowed_in_peer_as_in_sweep():
    from cmg_bench import peer

    parser = argparse.ArgumentParser()
    peer.add_arguments(parser)
    assert parser.parse_args(["--data", "d", "--out", "o", "--warmup", "0"]).warmup == 0.0


def test_a_window_that_opens_mid_request_counts_that_request_by_its_share():
    """The warm-up ends mid-request (1.5 requests long) and the window closes on the answer
    that reaches `min_requests`: whole answers over that window read +33% (2 answers in 1.5
    requests' time); each request's share inside it reads the true rate."""
    from cmg_bench.loadgen import Window, run_threads

    latencies: list[float] = []

    def call(i: int) -> None:
        t = time.perf_counter()
        time.sleep(0.2)
        latencies.append(time.perf_counter() - t)

    point = run_threads(call, 1, 8, Window(warmup_s=0.3, window_s=0.05, min_requests=2, max_window_s=10.0))
    true = 8 / float(np.median(latencies))
    assert abs(point.throughput / true - 1) < 0.15, (point.throughput, true)

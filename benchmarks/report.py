"""bench.md (tables a person reads) and the PNGs (latency vs throughput per mode, ratio bars)."""

from __future__ import annotations

from pathlib import Path


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def write_markdown(result: dict, path: Path) -> None:
    m = result["machine"]
    gemm = m["peak"]["measured_gemm"]
    lines = [
        "# cmg bench",
        "",
        f"Machine: {m['cpus_usable']} usable of {m['cpu_count']} CPU cores ({m['cpu_model'] or 'unknown CPU'}), "
        f"{m['platform']}, Python {m['python']}; GPU: {'yes' if m['gpu'] else 'no'}.",
        f"Peak (the bound every share below is taken of): {m['peak_gflops']:.1f} GFLOP/s, {m['peak_method']}.",
        f"Measured next to it: {gemm['gflops']:.1f} GFLOP/s, {gemm['method']}"
        + (f" ({m['peak']['gemm_of_theoretical'] * 100:.0f}% of the theoretical figure)."
           if m['peak'].get('gemm_of_theoretical') else "."),
        f"ort_int8's share is of the int8 bound, {m['peak']['int8_gops']:.1f} GOP/s: {m['peak']['int8_method']}.",
        "Threads (ONNX Runtime intra-op per session, from the built repository's config.pbtxt; torch "
        "intra-op): " + ", ".join(f"{k} {v}" for k, v in result.get("threads", {}).items()) + ".",
        f"Run: `{result['run']}`; test split of `{result['data']}` ({result['accuracy']['test_images']} images, "
        f"{result['accuracy']['anomalous']} anomalous).",
        f"Windows: warm-up {result['settings']['window']['warmup_s']} s, measurement "
        f"{result['settings']['window']['window_s']} s (extended to >= {result['settings']['window']['min_requests']}"
        f" requests; the warm-up lasts until every worker has had an answer); ratio pairs repeated "
        f"{result['settings']['repeats']}x, interleaved; medians reported.",
        "Throughput is inferences (frames) per second, each request counted by the share of its cycle "
        "inside the window; latency is per request (all frames of the batch), as in Triton's perf_analyzer.",
        "",
        "## Ratios (A / B, medians over interleaved repeats)",
        "",
        "| ratio | A | B | median | pairs | goal | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result["ratios"].items():
        a, b = r["a"], r["b"]
        pairs = ", ".join(f"{p['ratio']:.3g}" for p in r["pairs"])
        lines.append(f"| {name} | {a['mode']} c{a['concurrency']} b{a['batch']} | {b['mode']} c{b['concurrency']} "
                     f"b{b['batch']} | {r['median']:.3g} | {pairs} | {r.get('goal', '')} | "
                     f"{'' if 'met' not in r else ('yes' if r['met'] else 'NO')} |")
    for pair, why in result.get("ratio_pairs_not_measured", {}).items():
        lines.append(f"| {pair} | not measured: {why} | | | | | |")
    acc = result["accuracy"]
    if "int8_auroc_delta" in acc:
        lines += ["", f"int8 image AUROC delta (fp32 minus int8, ONNX Runtime in-process): "
                      f"{acc['int8_auroc_delta']:+.4f} (goal |delta| <= {acc['int8_max_delta']}; "
                      f"{'met' if acc['int8_met'] else 'NOT met'})."]
    if "onepass_auroc_loss_vs_exact" in acc:
        lines += ["", f"One-pass AUROC loss vs exact: {acc['onepass_auroc_loss_vs_exact'] * 100:.2f} points "
                      f"(goal < {acc['max_loss'] * 100:.0f}; {'met' if acc['met'] else 'NOT met'})."]
    lines += ["", "## Accuracy next to speed", "",
              "| mode | image AUROC | best throughput (infer/s) | at c, b | MFLOP/frame | achieved GFLOP/s | of peak "
              "| of measured GEMM |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in result["modes"]:
        best = mode["best"]
        lines.append(f"| {mode['name']} | {mode['auroc']:.4f} | {best['throughput']:.1f} | c{best['concurrency']} "
                     f"b{best['batch']} | {mode['flops_per_frame'] / 1e6:.1f} | {mode['achieved_gflops']:.2f} | "
                     f"{mode['fraction_of_peak'] * 100:.1f}% | {mode['fraction_of_measured_gemm'] * 100:.1f}% |")
    par = result["parity_max_abs_score_diff"]
    lines += ["", f"Score parity (max |score - {par['reference']}|): "
              + ", ".join(f"{k} {v:.2g}" for k, v in par["modes"].items()) + "."]
    for mode in result["modes"]:
        lines += ["", f"## {mode['name']}", "",
                  "| Concurrency | Batch | Inferences/Second | p50 latency (ms) | p90 latency (ms) | "
                  "p95 latency (ms) | p99 latency (ms) | Avg latency (ms) | requests |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for p in mode["points"]:
            lines.append(f"| {p['concurrency']} | {p['batch']} | {_f(p['throughput'])} | {_f(p['p50_ms'], 2)} | "
                         f"{_f(p['p90_ms'], 2)} | {_f(p['p95_ms'], 2)} | {_f(p['p99_ms'], 2)} | "
                         f"{_f(p['avg_ms'], 2)} | {p['requests']} |")
        for p in mode.get("skipped", []):
            lines.append(f"| {p['concurrency']} | {p['batch']} | not measured: {p['reason']} | | | | | | |")
    fl = result["flops"]
    lines += ["", "## FLOPs per frame", "", f"{fl['note']}.", "", "| model | MFLOP | MatMul | Gemm | Conv |",
              "| --- | --- | --- | --- | --- |"]
    for name, c in fl["per_model"].items():
        ops = c["by_op"]
        lines.append(f"| {name} | {c['flops'] / 1e6:.2f} | {ops['MatMul'] / 1e6:.2f} | {ops['Gemm'] / 1e6:.2f} | "
                     f"{ops['Conv'] / 1e6:.2f} |")
    lines += ["", f"Total time {result['seconds']:.0f} s.", ""]
    path.write_text("\n".join(lines))


def write_plots(result: dict, out: Path) -> list[Path]:
    """latency_throughput_<mode>.png (p50 solid, p99 dashed, one colour per batch, points
    labelled with the concurrency) and ratios.png (medians as bars, each pair as a dot)."""
    import matplotlib  # heavy: only the plot needs it, not the measurement

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): pyplot starts on the file-only backend

    written: list[Path] = []
    for mode in result["modes"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for batch in sorted({p["batch"] for p in mode["points"]}):
            pts = sorted((p for p in mode["points"] if p["batch"] == batch), key=lambda p: p["concurrency"])
            x = [p["throughput"] for p in pts]
            (line,) = ax.plot(x, [p["p50_ms"] for p in pts], "o-", label=f"batch {batch} p50")
            ax.plot(x, [p["p99_ms"] for p in pts], "--", color=line.get_color(), alpha=0.6,
                    label=f"batch {batch} p99")
            for p in pts:
                ax.annotate(f"c{p['concurrency']}", (p["throughput"], p["p50_ms"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("throughput (inferences/s)")
        ax.set_ylabel("latency per request (ms)")
        ax.set_yscale("log")
        ax.set_title(f"{mode['name']} (AUROC {mode['auroc']:.3f})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"latency_throughput_{mode['name']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    ratios = result["ratios"]
    fig, ax = plt.subplots(figsize=(8, 0.5 * max(3, len(ratios)) + 1))
    names = list(ratios)
    ax.barh(range(len(names)), [ratios[n]["median"] for n in names], color="tab:blue", alpha=0.6)
    for i, n in enumerate(names):
        ax.plot([p["ratio"] for p in ratios[n]["pairs"]], [i] * len(ratios[n]["pairs"]), "k.", ms=4)
        if "goal" in ratios[n]:
            goal = float(ratios[n]["goal"].split()[-1])
            ax.plot([goal, goal], [i - 0.4, i + 0.4], "r-", lw=2)
    ax.axvline(1.0, color="grey", lw=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("A / B (median bar, pairs as dots, goal in red)")
    fig.tight_layout()
    path = out / "ratios.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def _point(mode: dict, conc: int, batch: int) -> dict | None:
    return next((p for p in mode["points"] if p["concurrency"] == conc and p["batch"] == batch), None)


def write_readme_section(result: dict, path: Path) -> None:
    """docs/results.md's Performance tables, generated from bench.json fields only (paste as
    is), so the record always says what a bench run measured."""
    m = result["machine"]
    peak = m["peak"]
    ort_c = result["settings"]["ort_key"]
    lines = [
        f"Machine: {m['cpus_usable']} of {m['cpu_count']} CPU cores ({m['cpu_model'] or 'unknown CPU'}); "
        f"ONNX Runtime intra-op threads per session (from the built repository's config.pbtxt, every mode): "
        + ", ".join(f"{k} {v}" for k, v in result["threads"].items()) + ".",
        f"Peak (the bound of every share): {m['peak_gflops']:.1f} GFLOP/s float32, {m['peak_method']}; "
        f"measured ONNX Runtime GEMM {peak['measured_gemm']['gflops']:.1f} GFLOP/s "
        f"({peak['measured_gemm']['method']}); int8 bound {peak['int8_gops']:.1f} GOP/s ({peak['int8_method']}).",
        "",
        f"| mode | image AUROC | c1 b1: infer/s, p50 / p99 ms | c{ort_c[0]} b{ort_c[1]}: infer/s, p50 / p99 ms "
        "| best infer/s (at c, b) | MFLOP/frame | share of peak (of measured GEMM) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(p: dict | None) -> str:
        return "-" if p is None else f"{p['throughput']:.0f}, {p['p50_ms']:.1f} / {p['p99_ms']:.1f}"

    for mode in result["modes"]:
        best = mode["best"]
        lines.append(f"| `{mode['name']}` | {mode['auroc']:.3f} | {cell(_point(mode, 1, 1))} | "
                     f"{cell(_point(mode, *ort_c))} | {best['throughput']:.0f} (c{best['concurrency']} "
                     f"b{best['batch']}) | {mode['flops_per_frame'] / 1e6:.1f} | {mode['fraction_of_peak'] * 100:.0f}% "
                     f"({mode['fraction_of_measured_gemm'] * 100:.0f}%) |")
    lines += ["", "| ratio (A / B) | A | B | median (pairs) | goal | met |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result["ratios"].items():
        if "goal" not in r:
            continue
        a, b = r["a"], r["b"]
        pairs = ", ".join(f"{p['ratio']:.2f}" for p in r["pairs"])
        lines.append(f"| {name} | {a['mode']} c{a['concurrency']} b{a['batch']} | {b['mode']} c{b['concurrency']} "
                     f"b{b['batch']} | {r['median']:.2f} ({pairs}) | {r['goal']} | {'yes' if r['met'] else '**no**'} |")
    acc = result["accuracy"]
    if "onepass_auroc_loss_vs_exact" in acc:
        lines.append(f"| onepass_auroc_loss_vs_exact | | | {acc['onepass_auroc_loss_vs_exact']:.4f} | "
                     f"< {acc['max_loss']} | {'yes' if acc['met'] else '**no**'} |")
    if "int8_auroc_delta" in acc:
        lines.append(f"| int8_auroc_delta (fp32 minus int8) | | | {acc['int8_auroc_delta']:+.4f} | "
                     f"abs <= {acc['int8_max_delta']} | {'yes' if acc['int8_met'] else '**no**'} |")
    par = result["parity_max_abs_score_diff"]
    lines += ["", f"Score parity, max |score - {par['reference']}|: "
              + ", ".join(f"{k} {v:.2g}" for k, v in par["modes"].items()) + ".", ""]
    path.write_text("\n".join(lines))

"""The cpu target's fused `cmg`: scorer and encoder as ONE ONNX graph in one Python-backend model.

On the cpu target each ensemble step is a Python-backend stub process, so the two-step
`cmg` ensemble moves every frame through Triton -> scorer stub -> Triton -> encoder stub
-> Triton (tensors through shared memory, two stub round trips). The fused graph computes
the same outputs in one ONNX Runtime call (one stub round trip), with the same nodes and
weights: the scorer's PATCH_SCORES feeds the encoder's PATCH_SCORES inside the graph. The
two-step ensemble stays the design on the GPU targets (C++ backends, no stub hops) and for
`cmg_exact`; cmer_scorer and cmle_encoder stay in the cpu repository for direct calls.
It is the cpu target's default because it serves more frames/s at lower latency than the
ensemble: `cmg bench fused-vs-ensemble` measures both (figures in docs/results.md).
"""

from __future__ import annotations

from pathlib import Path

from cmg import contract as C
from cmg.errors import CMGError


def _prefixed(graph, prefix: str, keep: set[str]):
    """A copy of `graph` with every name prefixed except the names in `keep` (its interface)."""
    from onnx import compose  # heavy: only fusing needs onnx, not importing cmg_build

    g = compose.add_prefix_graph(graph, prefix, rename_inputs=False, rename_outputs=False)
    back = {prefix + k: k for k in keep}

    def fix(sub) -> None:
        for node in sub.node:
            node.input[:] = [back.get(n, n) for n in node.input]
            node.output[:] = [back.get(n, n) for n in node.output]
            for a in node.attribute:
                if a.HasField("g"):
                    fix(a.g)
                for s in a.graphs:
                    fix(s)

    fix(g)
    for init in g.initializer:
        init.name = back.get(init.name, init.name)
    for vi in (*g.value_info, *g.input, *g.output):  # an initializer's input was renamed with it
        vi.name = back.get(vi.name, vi.name)
    return g


def fuse(scorer_path: Path, encoder_path: Path, spec: C.ModelSpec):
    """ONNX model: IMAGE (+ THRESHOLD with the encoder's default) -> the outputs of `spec` (the
    `cmg` ensemble's), by chaining the scorer graph into the encoder graph."""
    # heavy: only fusing needs onnx, not importing cmg_build
    import onnx
    from onnx import helper

    scorer, encoder = onnx.load(str(scorer_path)), onnx.load(str(encoder_path))
    interface = {t.name for t in (*spec.inputs, *spec.outputs)} | {C.PATCH_SCORES}
    gs = _prefixed(scorer.graph, "scorer/", interface)
    ge = _prefixed(encoder.graph, "encoder/", interface)
    wanted = [t.name for t in spec.outputs]
    produced = {o.name: o for o in (*gs.output, *ge.output)}
    missing = [n for n in wanted if n not in produced]
    if missing:
        raise CMGError(f"cannot fuse {scorer_path.name} and {encoder_path.name}: outputs {missing} not produced")
    inputs = [i for i in gs.input] + [i for i in ge.input if i.name not in {C.IMAGE, C.PATCH_SCORES}]
    graph = helper.make_graph([*gs.node, *ge.node], spec.name, inputs, [produced[n] for n in wanted],
                              [*gs.initializer, *ge.initializer], value_info=[*gs.value_info, *ge.value_info])
    opsets = {}
    for m in (scorer, encoder):
        for o in m.opset_import:
            opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                              ir_version=max(scorer.ir_version, encoder.ir_version))
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        names = " and ".join(p.parent.parent.name for p in (scorer_path, encoder_path))
        raise CMGError(f"cannot fuse {names} into one graph (onnx checker): {exc}") from exc
    return model

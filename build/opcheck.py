"""TensorRT readiness check for ONNX graphs; runs anywhere (needs only `onnx`).

Why: the tensorrt target is built on GPU hosts, but a graph TensorRT's ONNX parser
cannot take should fail in CI on any machine, naming the node, not hours later on
the GPU box. The operator table (build/onnx_ops_trt10.tsv) is data copied from
onnx-tensorrt's operators.md with its version and source line; the restrictions
listed there are checked here node by node.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

TOPK_MAX_K = 3840
UINT8 = 2
DEQUANTIZABLE = {3, 17, 22}  # INT8, FP8 (E4M3FN, TensorRT's one FP8), INT4 (onnx.TensorProto)
STANDARD_DOMAINS = ("", "ai.onnx")
TABLE_PATH = Path(__file__).with_name("onnx_ops_trt10.tsv")


@dataclass
class OpTable:
    """op -> supported, plus the table's header lines (version and source)."""

    supported: dict[str, bool]
    header: list[str] = field(default_factory=list)

    @property
    def source(self) -> str:
        return self.header[0].lstrip("# ").strip() if self.header else "unknown"


def load_table(path: Path | None = None) -> OpTable:
    # Next to this module (package data); importlib.resources trips over the editable
    # install's package-dir mapping, a plain path does not.
    text = Path(path or TABLE_PATH).read_text()
    supported: dict[str, bool] = {}
    header: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if line.startswith("#"):
            header.append(line)
            continue
        op, flag = line.split("\t")[:2]
        supported[op.strip()] = flag.strip().upper() == "Y"
    return OpTable(supported, header)


def _const_values(graph) -> dict:
    """name -> numpy value for initializers and Constant node outputs."""
    from onnx import numpy_helper  # heavy: only checking a graph needs it, not importing cmg_build

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute:
            attr = node.attribute[0]
            if attr.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _attr(node, name: str, default=None):
    from onnx import helper  # heavy: only checking a graph needs it, not importing cmg_build

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _rank(value_info) -> int | None:
    """A tensor's declared rank, None where its shape is not declared."""
    t = value_info.type.tensor_type
    return len(t.shape.dim) if t.HasField("shape") else None


def _node_label(node) -> str:
    return f"node '{node.name or '(unnamed)'}' ({node.op_type})"


def check_model(model, table: OpTable | None = None, name: str = "graph") -> list[str]:
    """Problems that would stop TensorRT 10 (empty list: ready). Each names the node or tensor."""
    import onnx  # heavy: only checking a graph needs it, not importing cmg_build

    table = table or load_table()
    problems: list[str] = []
    graph = model.graph
    initializers = {t.name for t in graph.initializer}

    # Only the batch dimension may be dynamic, on every graph input and output.
    for kind, tensors in (("input", graph.input), ("output", graph.output)):
        for t in tensors:
            if t.name in initializers and kind == "input":
                continue
            dims = t.type.tensor_type.shape.dim
            for axis, d in enumerate(dims):
                static = d.HasField("dim_value") and d.dim_value > 0
                if axis > 0 and not static:
                    shown = d.dim_param or "?"
                    problems.append(f"{name}: {kind} '{t.name}' has dynamic dim {axis} ({shown}); "
                                    "only the batch dim (0) may be dynamic")

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - fall back to declared types only
        inferred = model
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(graph.input) + list(graph.output)}
    graph_outputs = {t.name for t in graph.output}
    initializer_types = {t.name: t.data_type for t in graph.initializer}
    consts = _const_values(graph)

    def walk(g, prefix: str) -> None:
        for node in g.node:
            label = f"{prefix}{_node_label(node)}"
            if node.domain not in STANDARD_DOMAINS:
                problems.append(f"{name}: {label}: custom domain '{node.domain}' has no TensorRT parser support")
                continue
            ok = table.supported.get(node.op_type)
            if ok is None:
                problems.append(f"{name}: {label}: op not in the TensorRT 10 operator table")
            elif not ok:
                problems.append(f"{name}: {label}: op not supported by TensorRT 10's ONNX parser")
            _restrictions(node, label)
            for a in node.attribute:  # If/Loop/Scan bodies
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, f"{label} > ")
                for sub in a.graphs:
                    walk(sub, f"{label} > ")

    def _restrictions(node, label: str) -> None:
        op = node.op_type
        # UINT8 only at the network boundary: consumed by Cast, produced only as a graph output.
        for inp in node.input:
            if types.get(inp) == UINT8 and op != "Cast":
                problems.append(f"{name}: {label}: consumes UINT8 tensor '{inp}'; TensorRT allows UINT8 "
                                "only as a network input/output (Cast it first)")
        for out in node.output:
            if types.get(out) == UINT8 and out not in graph_outputs:
                problems.append(f"{name}: {label}: produces intermediate UINT8 tensor '{out}'; TensorRT allows "
                                "UINT8 only as a network input/output")
        if op == "TopK":
            if _attr(node, "sorted", 1) != 1:
                problems.append(f"{name}: {label}: TopK needs sorted=1 in TensorRT")
            k = consts.get(node.input[1]) if len(node.input) > 1 else _attr(node, "k")
            if k is None:
                problems.append(f"{name}: {label}: TopK K '{node.input[1]}' must be a constant")
            elif int(k.max() if hasattr(k, "max") else k) >= TOPK_MAX_K:
                problems.append(f"{name}: {label}: TopK K={int(k.max() if hasattr(k, 'max') else k)} >= {TOPK_MAX_K}")
        elif op == "Resize":
            if _attr(node, "antialias", 0):
                problems.append(f"{name}: {label}: Resize with antialias is not supported by TensorRT")
            mode = _attr(node, "mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("nearest", "linear", "cubic"):
                problems.append(f"{name}: {label}: Resize mode {mode!r}")
        elif op == "ReduceMean" and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in consts:
                problems.append(f"{name}: {label}: ReduceMean axes '{node.input[1]}' must be an initializer")
        elif op == "NonZero":
            problems.append(f"{name}: {label}: NonZero has a data-dependent output shape (not engine-friendly)")
        elif op == "DequantizeLinear":
            kind = types.get(node.input[0]) or initializer_types.get(node.input[0])
            if kind is not None and kind not in DEQUANTIZABLE:
                problems.append(f"{name}: {label}: DequantizeLinear of a {onnx.TensorProto.DataType.Name(kind)} tensor "
                                f"'{node.input[0]}'; TensorRT's parser dequantizes INT8 (FP8, INT4) only")
        elif op == "If":  # both branches are required attributes, with one output per If output
            then, other = ([_rank(o) for o in _attr(node, b).output] for b in ("then_branch", "else_branch"))
            if any(a is not None and b is not None and a != b for a, b in zip(then, other, strict=False)):
                problems.append(f"{name}: {label}: If whose branches return different ranks {then} / "
                                f"{other}; TensorRT needs the same rank from both")

    walk(graph, "")
    return problems


def check_file(path: Path, table: OpTable | None = None) -> list[str]:
    import onnx  # heavy: only checking a graph needs it, not importing cmg_build

    path = Path(path)
    return check_model(onnx.load(str(path), load_external_data=False), table, name=path.name)

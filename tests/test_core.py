"""The client core (clients/core.py): names from the contract, request building with the real
tritonclient modules, the retry rules on real InferenceServerExceptions, and the rule that
no tensor name is spelled out anywhere but cmg/contract.py."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from cmg import contract as C
from cmg import model_config as mcfg
from cmg.contract import Contract
from cmg.errors import CMGError
from cmg_clients import core

ROOT = Path(__file__).resolve().parent.parent


def test_names_come_from_the_contract():
    spec = Contract(64, 64, 8, 16).models
    assert tuple(t.name for t in spec[C.CMG].outputs) == core.OUTPUTS
    for model in C.ENSEMBLES:  # both ensembles share one interface, so one core serves both
        assert [(t.name, t.dtype) for t in spec[model].inputs] == [(core.IMAGE.name, core.IMAGE.dtype),
                                                                   (core.THRESHOLD.name, core.THRESHOLD.dtype)]
        assert tuple(t.name for t in spec[model].outputs) == core.OUTPUTS
    assert core.THRESHOLD.optional


def _metadata(c: Contract) -> dict:
    """Triton's model metadata for the `cmg` ensemble of contract `c` (batch as -1)."""
    spec = c.models[C.CMG]
    entry = lambda t: {"name": t.name, "datatype": t.dtype, "shape": [-1, *t.dims]}  # noqa: E731
    return {"inputs": [entry(t) for t in spec.inputs], "outputs": [entry(t) for t in spec.outputs]}


@pytest.mark.parametrize("map_size", [8, 16, 32])
def test_contract_from_metadata_reads_grid_and_map_size_apart(map_size):
    """ANOMALY_MAP is [M, M] and KEEP_MASK [G, G]: a client that took G from the map would
    upsample the keep-mask wrongly whenever M != G (tiny: M = 16, G = 8)."""
    served = Contract(64, 48, 8, 16, map_size)
    got = core.contract_from_metadata(_metadata(served), C.CMG)
    assert (got.height, got.width, got.grid, got.map_size, got.embed_dim) == (64, 48, 8, map_size, 0)
    bad = _metadata(served)
    bad["outputs"] = [o for o in bad["outputs"] if o["name"] != C.KEEP_MASK]
    with pytest.raises(CMGError, match=C.KEEP_MASK):
        core.contract_from_metadata(bad, C.CMG)


@pytest.mark.parametrize("mod", [grpcclient, httpclient], ids=["grpc", "http"])
@pytest.mark.parametrize("threshold", [None, 0.25])
def test_build_inputs_and_outputs(mod, threshold):
    frames = np.zeros((3, 16, 16, 3), np.uint8)
    inputs = core.build_inputs(mod, frames, threshold)
    assert [i.name() for i in inputs] == ([C.IMAGE] if threshold is None else [C.IMAGE, C.THRESHOLD])
    assert inputs[0].datatype() == core.IMAGE.dtype and inputs[0].shape() == [3, 16, 16, 3]
    if threshold is not None:
        assert inputs[1].datatype() == core.THRESHOLD.dtype and inputs[1].shape() == [3, 1]
    # Every ensemble output, always: Triton 2.51 deadlocks on a subset (server#7482).
    assert [o.name() for o in core.requested_outputs(mod)] == list(core.OUTPUTS)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), "x", 1e39, -1e39, "4e38", True])
def test_non_finite_threshold_never_leaves_the_client(bad):
    """Not finite in FP32 (1e39 is finite as float64, inf on the wire): refused before sending."""
    with pytest.raises(CMGError, match="threshold"):
        core.build_inputs(grpcclient, np.zeros((1, 8, 8, 3), np.uint8), bad)
    with pytest.raises(CMGError, match="threshold"):
        _threshold_to_send({"name": "cmg", "input": [{"name": C.THRESHOLD}],
                                "parameters": {"default_threshold": {"string_value": str(bad)}}})


def test_fp32_limits_of_the_threshold_check():
    big = float(np.finfo(np.float32).max)
    assert core.finite_threshold(big) == big and core.finite_threshold(-big) == -big
    assert core.finite_threshold("0.25") == 0.25 and core.finite_threshold(np.float32(2)) == 2.0


def _threshold_to_send(config_json: dict) -> float | None:
    """What a client sends for a config as Triton's JSON form gives it."""
    return mcfg.threshold_to_send(mcfg.from_json(config_json))


def test_threshold_to_send_follows_the_ensemble_config():
    """cpu target: THRESHOLD optional, nothing to send; GPU targets: required, the config's default."""
    optional = {"name": "cmg", "input": [{"name": C.THRESHOLD, "optional": True}],
                "parameters": {"default_threshold": {"string_value": "0.45"}}}
    assert _threshold_to_send(optional) is None
    required = {**optional, "input": [{"name": C.THRESHOLD}]}
    assert _threshold_to_send(required) == pytest.approx(0.45)
    with pytest.raises(CMGError, match="no default_threshold"):
        _threshold_to_send({**required, "parameters": {}})
    with pytest.raises(CMGError, match="not a finite number"):
        _threshold_to_send({**required, "parameters": {"default_threshold": {"string_value": "nan"}}})


def test_calibrated_threshold_is_kept_per_version():
    """What a deploy does to a GPU target's ensemble: pinned to version 2 with another threshold.
    A frame answered by a version is sent again only when that version's threshold differs."""
    def config(value: str, pinned: list[int] | None = None) -> mcfg.ModelConfig:
        cfg = mcfg.from_json({"name": "cmg", "input": [{"name": C.THRESHOLD}],
                              "parameters": {"default_threshold": {"string_value": value}}})
        if pinned is not None:
            cfg.version_policy.specific.versions[:] = pinned
        return cfg

    cal = mcfg.CalibratedThreshold(config("0.4"), ready=["1"])  # as built: latest, one version ready
    assert cal.value == pytest.approx(0.4) and cal.known("1") and not cal.known("2") and cal.known(None)
    assert cal.resend_with("1", cal.value) is None
    cal.learn(config("0.7", pinned=[2]), ready=["1", "2"])  # switched: the pin names the version
    assert cal.known("2") and cal.value == pytest.approx(0.7)
    assert cal.resend_with("3", 0.7) is None  # unknown, and already the served config's
    assert cal.resend_with("2", 0.4) == pytest.approx(0.7)  # version 2 answered at 0.4: again at 0.7
    assert cal.resend_with("1", 0.7) == pytest.approx(0.4)  # version 1 again (a deploy undone): its own,
    assert cal.value == pytest.approx(0.4)  # and the next frames are sent with it
    cal.learn(config("0.9"), ready=["2", "3"])  # two versions ready, no pin: none is named
    assert not cal.known("3") and cal.value == pytest.approx(0.9)
    optional = mcfg.from_json({"name": "cmg", "input": [{"name": C.THRESHOLD, "optional": True}]})
    cpu = mcfg.CalibratedThreshold(optional, ready=["1"])  # the cpu target: nothing is ever sent
    assert cpu.value is None and cpu.resend_with("2", 0.5) is None


@pytest.mark.parametrize(("host", "local"), [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("LOCALHOST", True), ("::1", True),
    ("[::1]", True), ("0.0.0.0", False), ("", False), ("10.0.0.5", False), ("127.example.com", False),
    ("::", False), ("camera-host", False)])
def test_one_loopback_rule(host, local):
    """The server's restrictions and the page's Host check read one rule (cmg.endpoints)."""
    from cmg.endpoints import is_loopback

    assert is_loopback(host) is local


def test_frames_must_be_uint8():
    with pytest.raises(CMGError, match="UINT8"):
        core.build_inputs(grpcclient, np.zeros((1, 8, 8, 3), np.float32))


@pytest.mark.parametrize("value", [0, -1, float("nan"), float("inf")])
def test_timeouts_must_be_positive(value):
    with pytest.raises(CMGError, match="> 0"):
        core.positive_seconds(value)


def test_urls():
    assert core.normalize_url("grpc://127.0.0.1:9001/") == "127.0.0.1:9001"
    assert core.normalize_url("localhost", "http") == f"localhost:{core.DEFAULT_PORTS['http']}"
    assert core.default_url("grpc").endswith(f":{core.DEFAULT_PORTS['grpc']}")
    for bad in ("", "host:port", "host:0", "host:70000", ":8001"):
        with pytest.raises(CMGError):
            core.normalize_url(bad)


# What Triton 2.51 answered in this project's fault runs (graceful stop, SIGINT, unload,
# reload, kill), and what a bad request gets. `kind` is what the stream does with it.
ANSWERS = [
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'cmg' has no available versions", core.TRANSIENT),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'cmg' is not found", core.TRANSIENT),
    ("StatusCode.UNAVAILABLE", "in ensemble 'cmg', Server is stopping, scheduler for model has stopped "
                               "accepting new inference requests", core.TRANSIENT),
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN", core.TRANSIENT),
    ("StatusCode.RESOURCE_EXHAUSTED", "Exceeds maximum queue size", core.TRANSIENT),
    ("StatusCode.INTERNAL", "Failed to process the request(s) for model instance 'cmle_encoder_0_0', "
                            "message: Stub process 'cmle_encoder_0_0' is not healthy.", core.TRANSIENT),
    ("StatusCode.CANCELLED", "Locally cancelled by application!", core.TRANSIENT),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", core.DEADLINE),
    ("503", "Server is stopping", core.TRANSIENT),
    ("429", "Exceeds maximum queue size", core.TRANSIENT),
    ("StatusCode.INVALID_ARGUMENT", "in ensemble 'cmg', cmle_encoder: input 'THRESHOLD' must be finite, got nan",
     core.PERMANENT),
    ("StatusCode.INVALID_ARGUMENT", "unexpected shape for input 'IMAGE' for model 'cmg'", core.PERMANENT),
    ("StatusCode.INTERNAL", "cmle_encoder: ONNX Runtime failed: bad input", core.PERMANENT),
    ("400", "in ensemble 'cmg', cmle_encoder: input 'THRESHOLD' must be finite, got nan", core.PERMANENT),
]


@pytest.mark.parametrize(("status", "message", "kind"), ANSWERS, ids=[f"{s}-{k}-{i}" for i, (s, _, k) in
                                                                      enumerate(ANSWERS)])
def test_retry_rules(status, message, kind):
    failure = core.classify(InferenceServerException(msg=message, status=status))
    assert failure.kind == kind and failure.status == status and failure.message == message


@pytest.mark.parametrize(("exc", "kind"), [(ConnectionRefusedError("refused"), core.TRANSIENT),
                                           (TimeoutError("timed out"), core.DEADLINE),
                                           (KeyError("bug"), core.PERMANENT)])
def test_retry_rules_for_transport_errors(exc, kind):
    assert core.classify(exc).kind == kind


def test_retry_policy():
    policy = core.RetryPolicy(max_retries=3, backoff_s=0.1, backoff_max_s=0.5)
    assert not policy.exhausted(3) and policy.exhausted(4)
    assert not core.RetryPolicy(max_retries=-1).exhausted(10**6)
    for attempt in range(1, 10):
        assert 0.05 / 2 <= policy.delay(attempt) <= 0.5
    assert policy.delay(1) <= 0.1 and policy.delay(9) >= 0.25
    waits = [policy.delay(3) for _ in range(50)]  # jittered: clients that failed together do not retry together
    assert len(set(waits)) > 1 and all(0.2 <= w <= 0.4 for w in waits)


TENSOR_NAMES = {v for k, v in vars(C).items() if k.isupper() and isinstance(v, str) and k not in
                ("CMER_SCORER", "CMLE_ENCODER", "CMER_TEACHER", "CMG", "CMG_EXACT")}


def test_no_tensor_name_literals_outside_the_contract():
    """Tensor names are spelled once (cmg/contract.py); everything else imports them."""
    assert {"IMAGE", "THRESHOLD", "ANOMALY_SCORE", "PATCH_SCORES"} <= TENSOR_NAMES
    found = []
    for folder in ("cmg", "clients", "benchmarks", "build", "model_repository", "cmg_train"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "cmg" / "contract.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in TENSOR_NAMES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value!r}")
    assert not found, found


def test_no_triton_dtype_literals_in_clients():
    pattern = re.compile(r"[\"'](UINT8|FP32|BOOL)[\"']")
    found = [f"{p.relative_to(ROOT)}" for folder in ("clients", "benchmarks") for p in (ROOT / folder).rglob("*.py")
             if pattern.search(p.read_text())]
    assert not found, found


def test_url_schemes_ignore_case_and_the_http_hint_goes_to_grpc_clients_only():
    assert core.normalize_url("GRPC://h:1") == "h:1"
    with pytest.raises(CMGError) as info:
        core.normalize_url("grpc://h:8001", "http")
    assert "--http speaks HTTP" not in str(info.value)
    with pytest.raises(CMGError, match="--http speaks HTTP"):
        core.normalize_url("http://h:8000", "grpc")

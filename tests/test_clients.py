"""Client library and `cmg infer` against the real tritonserver (fixtures `triton`, `cpu_repo`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmg import contract as C
from cmg.errors import CMGError
from cmg_app.cli import main
from cmg_build.server import free_port
from cmg_clients.client import CMGClient, InferError, normalize_url


def _frames(client: CMGClient, n: int, seed: int = 0) -> np.ndarray:
    h, w = client.size
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _assert_same(a, b, atol: float = 1e-5) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert ra.score == pytest.approx(rb.score, abs=atol)
        assert ra.is_anomaly == rb.is_anomaly
        np.testing.assert_allclose(ra.anomaly_map, rb.anomaly_map, atol=atol)
        np.testing.assert_allclose(ra.patch_scores, rb.patch_scores, atol=atol)
        np.testing.assert_array_equal(ra.keep_mask, rb.keep_mask)


# -- no server needed -------------------------------------------------------------------
def test_client_modules_import_no_torch():
    code = (
        "import sys, cmg_clients.client, cmg_clients.infer, cmg_clients.stream, cmg_clients.overlay\n"
        "bad = [m for m in ('torch', 'torchvision', 'open_clip') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_normalize_url():
    assert normalize_url("grpc://127.0.0.1:9001/") == "127.0.0.1:9001"
    assert normalize_url("localhost", "http") == "localhost:8000"
    assert normalize_url("localhost") == "localhost:8001"
    with pytest.raises(CMGError):
        normalize_url("")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_names_url(protocol):
    url = f"127.0.0.1:{free_port()}"
    with pytest.raises(CMGError, match=url.replace(".", r"\.")) as info:
        CMGClient(url, protocol, timeout_s=3)
    assert "unreachable" in str(info.value)


def test_infer_cli_unreachable_exits_2(capsys, tmp_path):
    img = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    rc = main(["infer", "--url", f"127.0.0.1:{free_port()}", "--timeout", "3", str(img)])
    assert rc == 2
    assert "unreachable" in capsys.readouterr().err


# -- real server --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpc_client(triton):
    with CMGClient(triton.grpc_url) as client:
        yield client


def test_client_learns_contract_from_server(grpc_client, cpu_repo):
    """G from KEEP_MASK, M from ANOMALY_MAP: the tiny run serves a [16, 16] map on an 8 x 8 grid."""
    c = grpc_client.contract
    served = C.Contract.from_dict(json.loads((cpu_repo / "build_report.json").read_text())["contract"])
    assert (c.height, c.width, c.grid, c.map_size) == (served.height, served.width, served.grid, served.map_size)
    assert c.map_size != c.grid
    assert grpc_client.max_batch >= 1
    res = grpc_client.infer(_frames(grpc_client, 1))[0]
    assert res.anomaly_map.shape == (c.map_size, c.map_size) and res.anomaly_map.dtype == np.float32
    assert res.keep_mask.shape == (c.grid, c.grid) and res.keep_mask.dtype == np.uint8
    assert res.patch_scores.shape == (c.grid, c.grid)
    assert np.isfinite(res.score)
    # The anomaly map is zero wherever the keep-mask discarded the patch.
    r = c.map_size // c.grid
    keep = res.keep_mask.repeat(r, axis=0).repeat(r, axis=1)
    assert np.all(res.anomaly_map[keep == 0] == 0)


def test_model_not_ready_is_named(triton):
    with pytest.raises(CMGError, match="no_such_model"):
        CMGClient(triton.grpc_url, model="no_such_model")


def test_http_and_grpc_agree(triton, grpc_client):
    frames = _frames(grpc_client, 5, seed=1)
    with CMGClient(triton.http_url, "http") as http:
        _assert_same(grpc_client.infer(frames), http.infer(frames))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_agrees_and_cleans_up(triton, grpc_client, protocol):
    n = grpc_client.max_batch + 3  # two requests: a full batch reuses the region, then a short one
    frames = _frames(grpc_client, n, seed=2)
    plain = grpc_client.infer(frames, threshold=0.0)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    client = CMGClient(url, protocol, shm=True)
    names = [name for name, _ in client._shm_regions]
    assert len(names) == 2 and all(os.path.exists(f"/dev/shm/{n}") for n in names)
    try:
        _assert_same(plain, client.infer(frames, threshold=0.0))
    finally:
        client.close()
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in names)
    status = grpc_client._client.get_system_shared_memory_status(as_json=True)
    assert not set(names) & set(status.get("regions", {})), "regions still registered with the server"


def test_batching_matches_single_requests(grpc_client):
    frames = _frames(grpc_client, 6, seed=3)
    batched = grpc_client.infer(frames, batch_size=4)
    single = [grpc_client.infer(f[None])[0] for f in frames]
    _assert_same(batched, single)


def test_threshold_overrides_calibration(grpc_client):
    frames = _frames(grpc_client, 4, seed=4)
    low = grpc_client.infer(frames, threshold=-1e9)
    high = grpc_client.infer(frames, threshold=1e9)
    assert all(r.is_anomaly for r in low) and not any(r.is_anomaly for r in high)
    assert [r.score for r in low] == pytest.approx([r.score for r in high], abs=1e-6)


def test_images_go_through_the_contract_frame(grpc_client, tmp_path):
    """A file of another size is resized by cmg.frames exactly as an in-memory image is."""
    from cmg.frames import to_frame

    h, w = grpc_client.size
    big = np.random.default_rng(5).integers(0, 256, (h * 2 + 3, w + 5, 3), dtype=np.uint8)
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    from_file = grpc_client.infer([path])
    from_frame = grpc_client.infer(to_frame(big, (h, w))[None])
    _assert_same(from_file, from_frame, atol=0)


@pytest.mark.parametrize(
    ("dtype", "shape_fn", "needle"),
    [
        ("FP32", lambda h, w: [1, h, w, 3], "data-type"),
        ("UINT8", lambda h, w: [1, h + 1, w, 3], "shape"),
        ("UINT8", lambda h, w: [1, h, w], "shape"),
    ],
)
def test_malformed_requests_get_invalid_arg_naming_tensor(triton, grpc_client, dtype, shape_fn, needle):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException, triton_to_np_dtype

    h, w = grpc_client.size
    shape = shape_fn(h, w)
    data = np.zeros(shape, dtype=triton_to_np_dtype(dtype))
    raw = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        inp = grpcclient.InferInput(C.IMAGE, shape, dtype)
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as info:
            raw.infer(C.CMG, [inp])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert "'IMAGE'" in info.value.message() and needle in info.value.message()
    finally:
        raw.close()
    hraw = httpclient.InferenceServerClient(triton.http_url)
    try:
        inp = httpclient.InferInput(C.IMAGE, shape, dtype)
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as info:
            hraw.infer(C.CMG, [inp])
        assert info.value.status() == "400" and "'IMAGE'" in info.value.message()
    finally:
        hraw.close()
    # ...and the server is still serving.
    assert np.isfinite(grpc_client.infer(_frames(grpc_client, 1))[0].score)


def test_client_reports_triton_message_with_tensor(grpc_client):
    h, w = grpc_client.size
    bad = np.zeros((1, h + 1, w, 3), np.uint8)
    with pytest.raises(InferError, match="IMAGE") as info:
        grpc_client.infer_arrays(bad)
    assert info.value.status == "StatusCode.INVALID_ARGUMENT"


def _success_count(metrics_url: str, model: str) -> float:
    url = metrics_url if metrics_url.startswith("http") else f"http://{metrics_url}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("nv_inference_request_success{") and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_prometheus_metrics_count_requests(triton, grpc_client):
    before = _success_count(triton.metrics_url, C.CMG)
    for _ in range(3):
        grpc_client.infer(_frames(grpc_client, 1))
    deadline = time.monotonic() + 10
    while _success_count(triton.metrics_url, C.CMG) < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _success_count(triton.metrics_url, C.CMG) == before + 3


def test_cmg_infer_cli(triton, grpc_client, tmp_path, capsys):
    h, w = grpc_client.size
    rng = np.random.default_rng(6)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (h + 7, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    overlays = tmp_path / "overlays"
    rc = main([
        "infer", "--url", triton.grpc_url, "--batch", "2", "--threshold=-1e9",
        "--overlays", str(overlays), str(folder), str(tmp_path / "missing.png"),
    ])
    lines = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 1  # two bad inputs, the rest answered
    assert [Path(r["file"]).name for r in lines] == ["broken.png", "img0.png", "img1.png", "img2.png", "missing.png"]
    errors = {Path(r["file"]).name: r["error"] for r in lines if "error" in r}
    assert set(errors) == {"broken.png", "missing.png"}
    assert "broken.png" in errors["broken.png"] and "missing.png" in errors["missing.png"]
    good = [r for r in lines if "error" not in r]
    expected = grpc_client.infer([folder / f"img{i}.png" for i in range(3)], threshold=-1e9)
    for rec, res in zip(good, expected, strict=True):
        assert rec["score"] == pytest.approx(res.score, abs=1e-5)
        assert rec["is_anomaly"] is True and rec["latency_ms"] > 0
        with Image.open(rec["overlay"]) as im:
            assert im.format == "PNG" and im.size[0] >= w

    # HTTP + shared memory gives the same scores.
    rc = main(["infer", "--http", "--url", triton.http_url, "--shm", str(folder / "img0.png")])
    (rec,) = [json.loads(s) for s in capsys.readouterr().out.splitlines()]
    assert rc == 0 and rec["score"] == pytest.approx(good[0]["score"], abs=1e-5)

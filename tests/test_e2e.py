"""The real chain: tiny run -> ONNX -> cpu repository -> real tritonserver -> gRPC.
Served ensemble scores equal the in-process PyTorch scores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient

from cmg import contract as C
from cmg.dataset import MVTecFolder
from cmg_clients import core
from cmg_train.checkpoint import load_run


@pytest.fixture(scope="module")
def frames(tiny_data):
    ds = MVTecFolder(tiny_data)
    return ds.frames(ds.samples("test")[::7], (64, 64))


@pytest.mark.parametrize("model", [C.CMG, C.CMG_EXACT])
def test_served_scores_equal_pytorch(triton, tiny_run, frames, model):
    run = load_run(tiny_run)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    res = client.infer(model, core.build_inputs(grpcclient, frames), outputs=core.requested_outputs(grpcclient))
    ft = torch.from_numpy(frames)
    with torch.no_grad():
        ps = run.scorer_graph()(ft) if model == C.CMG else run.exact_graph()(ft)
        th = torch.full((len(ft), 1), float(run.detector.threshold))
        score, flag, amap, keep, _ = run.detector(ft, ps, th)
    np.testing.assert_allclose(res.as_numpy(C.ANOMALY_SCORE), score.numpy(), atol=1e-4)
    np.testing.assert_allclose(res.as_numpy(C.PATCH_SCORES), ps.numpy(), atol=1e-4)
    # The map is patch distances of about 25 from |a|^2 + |b|^2 - 2ab in FP32, summed in another
    # order by ONNX Runtime than by PyTorch: a relative tolerance (one cell once differed by 1.03e-4).
    np.testing.assert_allclose(res.as_numpy(C.ANOMALY_MAP), amap.numpy(), rtol=1e-5, atol=1e-4)
    assert (res.as_numpy(C.KEEP_MASK) != keep.numpy()).sum() == 0
    assert (res.as_numpy(C.IS_ANOMALY) == flag.numpy()).all()


def test_threshold_override_through_the_ensemble(triton, frames):
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    flags = {}
    for value in (-1e9, 1e9):
        res = client.infer(C.CMG, core.build_inputs(grpcclient, frames, value),
                           outputs=core.requested_outputs(grpcclient))
        flags[value] = core.decode(res)[C.IS_ANOMALY]
    assert flags[-1e9].all() and not flags[1e9].any()

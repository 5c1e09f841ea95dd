"""The tensor contract: names and shapes per DESIGN.md section 2 (ANOMALY_MAP on its own
M x M size), the encoder output order, and torch-free imports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cmg import contract as c
from cmg.contract import Contract, TensorSpec

TORCH_FREE = ("cmg.contract", "cmg.frames", "cmg.dataset", "cmg_data.synth", "cmg.config", "cmg.errors")


def test_core_modules_import_with_torch_unavailable():
    """Clients and the Triton Python backend run these on hosts without PyTorch."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "try:\n"
        "    import torch\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('torch was importable: the guard does not work')\n"
        f"for name in {TORCH_FREE!r}:\n"
        "    __import__(name)\n"
        "import cmg_data.synth, numpy as np\n"
        "next(cmg_data.synth.random_scenes(1, 64, 0))\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_models_and_tensors_match_the_design():
    k = Contract(height=64, width=64, grid=8, embed_dim=32)
    models = k.models
    assert set(models) == {c.CMER_SCORER, c.CMLE_ENCODER, c.CMER_TEACHER, c.CMG, c.CMG_EXACT}
    image = models[c.CMER_SCORER].input(c.IMAGE)
    assert (image.dtype, image.dims) == ("UINT8", (64, 64, 3))
    assert models[c.CMER_SCORER].output(c.PATCH_SCORES).dims == (8, 8)
    enc = models[c.CMLE_ENCODER]
    assert [t.name for t in enc.inputs] == [c.IMAGE, c.PATCH_SCORES, c.THRESHOLD]
    assert enc.input(c.THRESHOLD).optional and enc.input(c.THRESHOLD).dims == (1,)
    assert {t.name: (t.dtype, t.dims) for t in enc.outputs} == {
        c.ANOMALY_SCORE: ("FP32", (1,)),
        c.IS_ANOMALY: ("BOOL", (1,)),
        c.ANOMALY_MAP: ("FP32", (8, 8)),
        c.KEEP_MASK: ("UINT8", (8, 8)),
        c.EMBEDDING: ("FP32", (32,)),
    }
    assert models[c.CMG].steps == (c.CMER_SCORER, c.CMLE_ENCODER)
    assert models[c.CMG_EXACT].steps == (c.CMER_TEACHER, c.CMLE_ENCODER)
    assert {t.name for t in models[c.CMG].outputs} == {
        c.ANOMALY_SCORE, c.IS_ANOMALY, c.ANOMALY_MAP, c.PATCH_SCORES, c.KEEP_MASK}
    assert all(m.is_ensemble == (name in c.ENSEMBLES) for name, m in models.items())
    assert Contract.from_dict(k.to_dict()) == k


def test_tensor_check_names_the_tensor():
    spec = TensorSpec(c.IMAGE, "UINT8", (4, 4, 3))
    spec.check(np.zeros((2, 4, 4, 3), np.uint8))
    spec.check(np.zeros((4, 4, 3), np.uint8), batched=False)
    with pytest.raises(ValueError, match=r"IMAGE: dtype float32"):
        spec.check(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"IMAGE: shape \[2, 4, 5, 3\], expected \[batch, 4, 4, 3\]"):
        spec.check(np.zeros((2, 4, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="IMAGE: shape"):
        spec.check(np.zeros((4, 4, 3), np.uint8))
    assert {k: v.name for k, v in c.NUMPY_DTYPES.items()} == {"UINT8": "uint8", "FP32": "float32", "BOOL": "bool"}


def test_anomaly_map_has_its_own_size():
    """ANOMALY_MAP is [M, M]; KEEP_MASK and PATCH_SCORES stay on the CMER grid [G, G]."""
    k = Contract(64, 64, grid=8, embed_dim=32, map_size=16)
    for model in (c.CMLE_ENCODER, c.CMG, c.CMG_EXACT):
        spec = k.models[model]
        assert spec.output(c.ANOMALY_MAP).dims == (16, 16)
        assert spec.output(c.KEEP_MASK).dims == (8, 8)
    assert k.models[c.CMG].output(c.PATCH_SCORES).dims == (8, 8)
    assert k.models[c.CMLE_ENCODER].input(c.PATCH_SCORES).dims == (8, 8)
    assert Contract.from_dict(k.to_dict()) == k and k.to_dict()["map_size"] == 16


def test_map_size_defaults_to_the_grid():
    """Older export.json files have no map_size: their maps were [G, G]."""
    assert Contract(64, 64, 8, 32).map_size == 8
    old = {"height": 64, "width": 64, "grid": 4, "embed_dim": 32}
    assert Contract.from_dict(old) == Contract(64, 64, 4, 32, 4)


def test_encoder_output_order_is_the_contract_order():
    """The ONNX export names the detector's outputs positionally with this order."""
    k = Contract(64, 64, 8, 32, 16)
    assert tuple(t.name for t in k.models[c.CMLE_ENCODER].outputs) == c.ENCODER_OUTPUTS
    assert len(set(c.ENCODER_OUTPUTS)) == 5

"""Kubernetes manifests checked against the Kubernetes API schemas, offline
(kubernetes-validate bundles them; no cluster runs here)."""

from __future__ import annotations

import kubernetes_validate as kv
import pytest
import yaml

from cmg_build import k8s

K8S_VERSION = "1.30"


def _docs(folder) -> list[dict]:
    paths = k8s.write(folder, k8s.K8sOptions(replicas=3, gpus=1))
    return [d for p in paths for d in yaml.safe_load_all(p.read_text())]


def test_manifests_validate_against_the_api_schemas(tmp_path):
    docs = _docs(tmp_path)
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"]
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)
    deployment, service, hpa, _ = docs
    spec = deployment["spec"]["template"]["spec"]["containers"][0]
    assert deployment["spec"]["replicas"] == 3 and spec["image"].startswith("nvcr.io/nvidia/tritonserver:")
    assert spec["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {p["port"] for p in service["spec"]["ports"]} == {8000, 8001, 8002}
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["metrics"][0]["type"] == "Pods"
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == k8s.QUEUE_METRIC


def test_the_validator_refuses_a_broken_manifest(tmp_path):
    """The check above can fail: a wrong field or a bad enum value is caught."""
    hpa = _docs(tmp_path)[2]
    hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"] = {"not": "a quantity"}
    with pytest.raises(kv.ValidationError):
        kv.validate(hpa, K8S_VERSION, strict=True)
    deployment = _docs(tmp_path)[0]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)

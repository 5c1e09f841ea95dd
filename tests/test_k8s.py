"""Kubernetes manifests checked against the Kubernetes API schemas, offline
(kubernetes-validate bundles them; no cluster runs here)."""

from __future__ import annotations

import kubernetes_validate as kv
import pytest
import yaml

from cmg_build import k8s

K8S_VERSION = "1.30"


def _docs(folder) -> list[dict]:
    paths = k8s.write(folder, k8s.K8sOptions(replicas=3, gpus=1, sub_path="repo_v7", build_id="0123abcd"))
    return [d for p in paths for d in yaml.safe_load_all(p.read_text())]


def test_manifests_validate_against_the_api_schemas(tmp_path):
    docs = _docs(tmp_path)
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"]
    for doc in docs:
        kv.validate(doc, K8S_VERSION, strict=True)
    deployment, service, hpa, _ = docs
    spec = deployment["spec"]["template"]["spec"]["containers"][0]
    assert spec["image"].startswith("nvcr.io/nvidia/tritonserver:")
    # The autoscaler owns the count (a re-apply of `replicas` would reset it under load), from 3 up.
    assert "replicas" not in deployment["spec"] and hpa["spec"]["minReplicas"] == 3
    # The repository's own folder, not the volume's root (ext4's lost+found there stops Triton in
    # mode none), and the build's id in the pod template (a new build rolls every pod).
    assert {"name": "models", "mountPath": "/models", "subPath": "repo_v7", "readOnly": True} in spec["volumeMounts"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["cmg-triton/build"] == "0123abcd"
    assert spec["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert spec["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    # memory bounded (twice the request), a GPU where asked, /dev/shm larger than Kubernetes' 64 MiB
    assert spec["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": 1}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in spec["volumeMounts"]
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "1Gi"}
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
    deployment["spec"]["minReadySeconds"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_VERSION, strict=True)


def test_the_manifests_folder_is_checked_and_only_our_files_are_rewritten(tmp_path):
    """A file as DIR, DIR = the run or the repository, and a user's own triton.yaml are refused
    (the first after a whole build, the last overwritten silently, before)."""
    from cmg.errors import CMGError

    (tmp_path / "afile").write_text("")
    with pytest.raises(CMGError, match="is a file, not a folder"):
        k8s.check_out(tmp_path / "afile", [])
    for inside in (tmp_path / "repo", tmp_path / "repo" / "k8s"):
        with pytest.raises(CMGError, match=r"is \(inside\) --run or --out"):
            k8s.check_out(inside, [tmp_path / "run", tmp_path / "repo"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "triton.yaml").write_text("kind: Deployment\n")
    with pytest.raises(CMGError, match="is not a `cmg build --k8s` manifest"):
        k8s.write(mine, k8s.K8sOptions())
    assert (mine / "triton.yaml").read_text() == "kind: Deployment\n"
    ours = tmp_path / "ours"
    k8s.write(ours, k8s.K8sOptions(replicas=2))
    k8s.write(ours, k8s.K8sOptions(replicas=12, max_replicas=20))  # ours: written again
    hpa = list(yaml.safe_load_all((ours / "triton.yaml").read_text()))[2]
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (12, 20)
    assert "replaces them" in (ours / "prometheus-adapter-rules.yaml").read_text()
    older = tmp_path / "older"  # written before the header existed: still ours
    k8s.write(older, k8s.K8sOptions())
    for name in k8s.FILES:
        (older / name).write_text((older / name).read_text().removeprefix(k8s.MARK))
    k8s.write(older, k8s.K8sOptions(replicas=3))


def test_the_queue_metric_counts_each_frame_once():
    """Triton counts a success for the ensemble and for each step it runs: the adapter's
    denominator is the `cmg` requests alone (frames), the numerator every model's queue time
    (the ensemble's own is nearly nil), so the HPA reads the wait per frame, not a third of it."""
    import yaml

    from cmg_build.k8s import adapter_rules

    query = yaml.safe_load(adapter_rules()["data"]["config.yaml"])["rules"][0]["metricsQuery"]
    numerator, denominator = query.split(" / ", 1)
    assert "nv_inference_queue_duration_us{<<.LabelMatchers>>}" in numerator and "model=" not in numerator
    # both ensembles clients call (`--model cmg_exact` too): traffic to either has a denominator
    assert 'nv_inference_request_success{<<.LabelMatchers>>,model=~"cmg|cmg_exact"}' in denominator


def test_the_adapter_rate_window_holds_two_scrapes_and_the_build_id_follows_the_files():
    """rate() over one scrape interval (Prometheus' default 1m) returns nothing: the HPA's metric
    never appears. Two builds with one file changed get two ids."""
    rules = k8s.adapter_rules()["data"]["config.yaml"]
    assert rules.count(f"[{k8s.RATE_WINDOW}]") == 2 and k8s.RATE_WINDOW == "4m" and "[1m]" not in rules
    files = {"cmg/config.pbtxt": "a" * 64, "cmle_encoder/1/model.onnx": "b" * 64}
    assert k8s.build_id(files) == k8s.build_id(dict(reversed(files.items())))
    assert k8s.build_id(files) != k8s.build_id({**files, "cmle_encoder/1/model.onnx": "c" * 64})

"""Kubernetes manifests for N replicas of the official Triton image on a built repository.

`cmg build ... --k8s DIR` writes `DIR/triton.yaml` (Deployment, Service, HorizontalPodAutoscaler)
and `DIR/prometheus-adapter-rules.yaml` (the rule that turns Triton's queue-time counters
into the per-pod metric the autoscaler reads). The repository comes from a volume: a
PersistentVolumeClaim that every node can mount (ReadOnlyMany or ReadWriteMany: a
ReadWriteOnce volume attaches to one node, and replicas elsewhere never start), holding the
folder `cmg build` wrote, mounted by its name (`subPath`: the volume's root may hold ext4's
`lost+found`, which Triton in mode none tries to load as a model and then exits). The build's
id in the pod template makes a new build roll every pod; Triton in mode none never reads the
repository again, so without it old pods keep serving the old run beside new pods serving
the new one. The official image already has the ONNX Runtime and TensorRT backends, so the
`onnxruntime` and `tensorrt` targets serve there as built; the `cpu` target's Python
backend would also need ONNX Runtime installed in the image.

Checked against the Kubernetes API schemas offline (`kubernetes-validate`, tests);
no cluster has run them here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from cmg.contract import ENSEMBLES
from cmg.endpoints import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT
from cmg.errors import CMGError

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver:24.10-py3"  # Triton 2.51, the version served here
QUEUE_METRIC = "triton_queue_time_us"  # per pod, from the adapter rule below
RATE_WINDOW = "4m"  # 4 scrapes at the common 1-minute interval: rate() needs 2, and one may be late or lost


@dataclass
class K8sOptions:
    name: str = "cmg-triton"
    replicas: int = 2
    max_replicas: int = 8
    image: str = TRITON_IMAGE
    claim: str = "cmg-model-repository"  # PVC holding the built repository
    gpus: int = 0
    queue_time_us: int = 20000  # scale out above this average queue time per request
    memory_limit: str = "8Gi"  # twice the request: cmg_exact's teacher grows to about 3 GB under load
    shm: str = "1Gi"  # /dev/shm (the Python backend's tensors; Kubernetes' default is 64 MiB)
    sub_path: str = "model_repository"  # the repository's folder on the claim (`cmg build --out`'s name)
    build_id: str = ""  # the repository's files' hash: a new build changes the pod template, so it rolls


def build_id(files: dict[str, str]) -> str:
    """A repository's files (the build report's path -> sha256) as one short id."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def manifests(opts: K8sOptions) -> list[dict]:
    """Deployment, Service and HorizontalPodAutoscaler (autoscaling/v2, Pods metric)."""
    labels = {"app.kubernetes.io/name": opts.name}
    ports = [("http", DEFAULT_HTTP_PORT), ("grpc", DEFAULT_GRPC_PORT), ("metrics", DEFAULT_METRICS_PORT)]
    resources: dict = {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": opts.memory_limit}}
    if opts.gpus:
        resources["limits"]["nvidia.com/gpu"] = opts.gpus
    probe = {"periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3}
    container = {
        "name": "tritonserver",
        "image": opts.image,
        "args": ["tritonserver", "--model-repository=/models", "--model-control-mode=none",
                 f"--http-port={DEFAULT_HTTP_PORT}", f"--grpc-port={DEFAULT_GRPC_PORT}",
                 f"--metrics-port={DEFAULT_METRICS_PORT}", "--exit-timeout-secs=30"],
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, **probe},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": "http"}, **probe},
        "startupProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5,
                         "failureThreshold": 60},
        "resources": resources,
        "volumeMounts": [{"name": "models", "mountPath": "/models", "subPath": opts.sub_path, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": opts.name, "labels": labels},
        "spec": {  # no `replicas`: the autoscaler owns it (from --replicas up); a re-apply would reset it
            "selector": {"matchLabels": labels},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels, "annotations": {
                    "prometheus.io/scrape": "true", "prometheus.io/port": str(DEFAULT_METRICS_PORT),
                    "prometheus.io/path": "/metrics",
                    **({"cmg-triton/build": opts.build_id} if opts.build_id else {})}},
                "spec": {
                    "terminationGracePeriodSeconds": 40,
                    "containers": [container],
                    "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": opts.claim,
                                                                            "readOnly": True}},
                                {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": opts.shm}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": opts.name, "labels": labels},
        "spec": {"selector": labels, "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"}
                                               for n, p in ports]},
    }
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": opts.name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": opts.name},
            "minReplicas": opts.replicas, "maxReplicas": max(opts.replicas, opts.max_replicas),
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": QUEUE_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(opts.queue_time_us)}}}],
        },
    }
    return [deployment, service, hpa]


def adapter_rules(namespace: str = "monitoring") -> dict:
    """prometheus-adapter ConfigMap: the queue time a frame waits over the last RATE_WINDOW, per pod:
    every model's `nv_inference_queue_duration_us` over the requests to the ensembles clients
    call (`cmg`, `cmg_exact`) only. Triton counts a
    success for the ensemble and for each step it runs (measured: 19 `cmg`, 19 and 20 for its
    two steps), and the ensemble's own queue time is nearly nil (35 us against 29 ms in its
    steps): over every model's successes the mean came out a third of a frame's wait."""
    query = (f"sum(rate(nv_inference_queue_duration_us{{<<.LabelMatchers>>}}[{RATE_WINDOW}])) by (<<.GroupBy>>) / "
             f"clamp_min(sum(rate(nv_inference_request_success{{<<.LabelMatchers>>,model=~\"{'|'.join(ENSEMBLES)}\"}}"
             f"[{RATE_WINDOW}])) by (<<.GroupBy>>), 1e-9)")
    rules = (
        "rules:\n"
        "- seriesQuery: 'nv_inference_queue_duration_us{namespace!=\"\",pod!=\"\"}'\n"
        "  resources:\n    overrides:\n      namespace: {resource: namespace}\n      pod: {resource: pod}\n"
        f"  name:\n    matches: nv_inference_queue_duration_us\n    as: {QUEUE_METRIC}\n"
        f"  metricsQuery: '{query}'\n"
    )
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "prometheus-adapter", "namespace": namespace},
            "data": {"config.yaml": rules}}


MARK = "# Written by `cmg build --k8s` (build/k8s.py); written again by the next one.\n"
ADAPTER_NOTE = ("# This ConfigMap is prometheus-adapter's whole config.yaml: applied over an adapter that has\n"
                "# rules of its own, it replaces them. There, add the rule under `rules:` to its config instead.\n"
                "# The adapter reads it only when it starts: `kubectl -n monitoring rollout restart\n"
                "# deploy/prometheus-adapter` after applying it.\n")
FILES = ("triton.yaml", "prometheus-adapter-rules.yaml")


def check_out(out: Path, others: list[Path]) -> None:
    """`--k8s DIR` must be a folder of its own: not a file, not the run or the repository, and
    never holding manifests of the same names that this command did not write."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CMGError(f"--k8s {out} is a file, not a folder")
    for other in others:
        if out.resolve() == Path(other).resolve() or Path(other).resolve() in out.resolve().parents:
            raise CMGError(f"--k8s {out} is (inside) --run or --out {other}: give the manifests a folder of their own")
    for name in FILES:
        path = out / name
        if path.is_file() and not _ours(path.read_text(errors="replace")):
            raise CMGError(f"--k8s {out}: {path} exists and is not a `cmg build --k8s` manifest: "
                           "choose another folder")


def _ours(text: str) -> bool:
    """Written by this module: its header, or (before the header existed) its queue metric."""
    return text.startswith(MARK) or QUEUE_METRIC in text


def write(out: Path, opts: K8sOptions) -> list[Path]:
    """DIR/triton.yaml and DIR/prometheus-adapter-rules.yaml."""
    out = Path(out)
    check_out(out, [])
    out.mkdir(parents=True, exist_ok=True)
    main = out / FILES[0]
    main.write_text(MARK + yaml.safe_dump_all(manifests(opts), sort_keys=False))
    rules = out / FILES[1]
    rules.write_text(MARK + ADAPTER_NOTE + yaml.safe_dump(adapter_rules(), sort_keys=False))
    return [main, rules]

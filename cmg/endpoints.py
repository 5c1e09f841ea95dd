"""Where a Triton server listens by default: the launcher (`cmg serve`), the clients, the
dashboard and the Kubernetes manifests agree on these, so they live in the core layer."""

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
LOOPBACK = "127.0.0.1"

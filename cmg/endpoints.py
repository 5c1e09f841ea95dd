"""Where a Triton server listens by default: the launcher (`cmg serve`), the clients, the
dashboard and the Kubernetes manifests agree on these, so they live in the core layer."""

import ipaddress

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
LOOPBACK = "127.0.0.1"


def is_loopback(host: str) -> bool:
    """Whether `host` reaches only this machine: localhost, 127.0.0.0/8 or ::1 (a name is not
    resolved: 127.example.com is a name like any other). One rule for what the server and the
    live page open to loopback callers only."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

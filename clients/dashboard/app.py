"""The live line page: a Starlette app served by uvicorn in a thread beside the stream.

It serves exactly: `/` (the page), `/static/<name>` for the few assets shipped in this
package (read into memory at start, looked up by name: no request path ever reaches the
file system), `/events` (server-sent events, one JSON snapshot a second, one shared by
every open page), the overlays of the flagged frames the running stream holds
(`/frames/<id>/thumb.png|full.png`), and `POST /cameras/<index>/threshold` (the slider).
Anything else is 404. It binds 127.0.0.1 unless told otherwise; bound to loopback it also
refuses requests whose Host header is neither a loopback name nor the bound address (DNS
rebinding), and the slider takes only JSON bodies (a cross-site form post cannot send one
without a CORS preflight, which is not answered).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import socket
import sys
import threading
import time
from collections.abc import Sequence
from importlib import resources

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from cmg.endpoints import DEFAULT_METRICS_PORT, LOOPBACK, is_loopback
from cmg.errors import CMGError
from cmg_clients import core
from cmg_clients.dashboard.metrics import MetricsReader
from cmg_clients.dashboard.state import DashboardState

ASSETS = {  # name -> media type: the only files the page may load
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
}
PAGE = "index.html"
PUSH_INTERVAL_S = 1.0
METRICS_INTERVAL_S = 2.0
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def _load_assets() -> dict[str, bytes]:
    folder = resources.files("cmg_clients.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in [PAGE, *ASSETS]}


def parse_address(text: str) -> tuple[str, int]:
    """`[HOST:]PORT` -> (host, port); host defaults to loopback, port 0 lets the OS pick."""
    host, sep, port = str(text).rpartition(":")
    host = host.strip("[]") if sep else LOOPBACK
    if not port.isdigit() or not 0 <= int(port) < 65536 or (sep and not host):
        raise CMGError(f"--dashboard {text!r}: expected [HOST:]PORT with a port in 0..65535")
    return host, int(port)


def default_metrics_url(grpc_url: str) -> str:
    """Triton's metrics endpoint beside a gRPC URL: same host, the default metrics port."""
    host = core.normalize_url(grpc_url, "grpc").rpartition(":")[0]
    return f"{host}:{DEFAULT_METRICS_PORT}"


MAX_BODY = 4096  # a threshold request is a few bytes; a 300 MB body had been read whole
TOKEN_HEADER = "X-CMG-Token"


def create_app(state: DashboardState, metrics_url: str | Sequence[str] | None = None, loopback_only: bool = True,
               host: str = LOOPBACK, token: str | None = None) -> Starlette:
    """The ASGI app over `state`; with `metrics_url` it reads Triton's metrics every 2 s.
    `host`: the address it is bound to, a Host header it must accept when `loopback_only`
    (127.0.0.2 is loopback too, and the name the page was announced under). `token`: what a
    threshold change must carry (TOKEN_HEADER; the announced URL's `?token=`, which the page
    sends): the threshold decides what the line flags, and anyone who can reach the port (every
    account on the host, on loopback) could otherwise set it. Watching needs no token."""
    assets = _load_assets()
    taken_at, taken = float("-inf"), ""

    def current() -> str:
        """One snapshot a push interval for every open page, not one per page (each costs the
        stream time: the GIL and the lock's copies); at most 0.9 s old when pushed. Called on
        the event loop only, so no lock."""
        nonlocal taken_at, taken
        now = time.monotonic()
        if now - taken_at >= 0.9 * PUSH_INTERVAL_S:
            taken_at, taken = now, json.dumps(state.snapshot())
        return taken

    def _headers(media: str) -> dict[str, str]:
        return {**SECURITY_HEADERS, "Content-Type": media}

    async def page(request: Request) -> Response:
        return Response(assets[PAGE], headers=_headers("text/html; charset=utf-8"))

    async def asset(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in ASSETS:
            return PlainTextResponse("not found", status_code=404)
        return Response(assets[name], headers=_headers(ASSETS[name]))

    def frame_png(request: Request) -> Response:  # sync: Starlette runs it in a worker thread
        item = state.flagged(request.path_params["frame_no"])
        kind = request.path_params["kind"]
        if item is None or kind not in ("thumb", "full"):
            return PlainTextResponse("no such frame (only the running stream's last flagged frames)", 404)
        return Response(item.png(kind), headers=_headers("image/png"))

    async def threshold(request: Request) -> Response:
        if token is not None and not hmac.compare_digest(request.headers.get(TOKEN_HEADER, ""), token):
            return PlainTextResponse("the threshold is set from the page at the URL the stream announced "
                                     "(it carries the dashboard's token)", status_code=403)
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return PlainTextResponse("send JSON: {\"value\": number or null}", status_code=415)
        too_big = PlainTextResponse(f"a threshold request is at most {MAX_BODY} bytes", status_code=413)
        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            return too_big
        raw = b""
        async for chunk in request.stream():  # a body sent without a length is bounded as it comes
            raw += chunk
            if len(raw) > MAX_BODY:
                return too_big
        try:
            body = json.loads(raw)
            if not isinstance(body, dict) or "value" not in body:
                raise ValueError("expected {\"value\": number or null}")
            now = state.set_threshold(request.path_params["index"], body["value"])
        except KeyError:
            return PlainTextResponse("no such camera", status_code=404)
        except (ValueError, CMGError) as exc:
            return PlainTextResponse(str(exc), status_code=400)
        return JSONResponse({"index": request.path_params["index"], "threshold": now})

    async def events(request: Request) -> Response:
        async def push():
            yield "retry: 1000\n\n"
            while not state.closed.is_set():
                yield f"data: {current()}\n\n"
                for _ in range(int(PUSH_INTERVAL_S / 0.1)):
                    if state.closed.is_set():
                        break
                    await asyncio.sleep(0.1)
            yield "event: end\ndata: {}\n\n"

        return StreamingResponse(push(), headers={**SECURITY_HEADERS, "Content-Type": "text/event-stream",
                                                  "X-Accel-Buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        task = None
        if metrics_url:
            reader = MetricsReader(metrics_url)

            async def poll() -> None:
                while not state.closed.is_set():
                    state.set_metrics(await asyncio.to_thread(reader.read))
                    await asyncio.sleep(METRICS_INTERVAL_S)

            task = asyncio.create_task(poll())
        else:
            state.set_metrics({"url": None, "error": "no metrics endpoint given", "models": []})
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    routes = [
        Route("/", page),
        Route("/static/{name}", asset),
        Route("/events", events),
        Route("/frames/{frame_no:int}/{kind}.png", frame_png),
        Route("/cameras/{index:int}/threshold", threshold, methods=["POST"]),
    ]
    # The middleware compares the Host header's host part (port dropped; IPv6 in brackets).
    bound = [host, f"[{host}]"] if ":" in host else [host]
    allowed = list(dict.fromkeys(["127.0.0.1", "localhost", "[::1]", "::1", *bound]))
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=allowed)] if loopback_only else []
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)


class Dashboard:
    """The page served by uvicorn in a daemon thread while the caller streams (a context manager)."""

    def __init__(self, state: DashboardState, host: str = LOOPBACK, port: int = 0,
                 metrics_url: str | Sequence[str] | None = None, announce: bool = True) -> None:
        self.state, self.host, self.port, self.metrics_url = state, host, port, metrics_url
        self.announce = announce
        self.token = secrets.token_urlsafe(16)  # in the announced URL: who has the page may set thresholds
        self._server = None
        self._thread: threading.Thread | None = None

    @classmethod
    def for_stream(cls, opts, names: list[str] | None = None, urls: Sequence[str] | None = None) -> Dashboard:
        """From `cmg stream`'s options: `--dashboard [HOST:]PORT`, `--metrics-url` (default: one
        beside each of `urls`, the servers the stream uses, else beside opts.url); `names`: every
        camera of a multi-source stream (default: this one)."""
        host, port = parse_address(opts.dashboard)
        given = [opts.metrics_url] if isinstance(opts.metrics_url, str) else list(opts.metrics_url or [])
        metrics = given or [default_metrics_url(u) for u in (urls or [opts.url])]
        if not given and len(set(metrics)) < len(metrics):  # servers on one host: one default port for all
            print(f"dashboard: several --url share the metrics endpoint {', '.join(sorted(set(metrics)))}: it is "
                  "read once; give --metrics-url once per server to see each", file=sys.stderr)
        return cls(DashboardState(names or [opts.source_name]), host, port, metrics)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    def start(self, timeout_s: float = 10.0) -> Dashboard:
        import uvicorn  # heavy: only serving needs it; create_app() works without it

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise CMGError(f"--dashboard {self.host}:{self.port}: cannot listen there ({exc.strerror or exc})") from exc
        sock.listen(64)
        self.port = sock.getsockname()[1]
        app = create_app(self.state, self.metrics_url, loopback_only=is_loopback(self.host), host=self.host,
                         token=self.token)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=3)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="cmg-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise CMGError(f"the dashboard did not start on {self.url}")
            time.sleep(0.02)
        if self.announce:
            print(f"cmg stream: dashboard on {self.url}", file=sys.stderr, flush=True)
        return self

    def stop(self) -> None:
        self.state.closed.set()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


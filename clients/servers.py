"""Several Triton servers behind one `cmg stream`: least-in-flight choice, failover, probing.

Each server has its own gRPC aio channel (`Channel` of clients/channel.py: a fresh channel
once per failure, not once per frame). A frame goes to the server with the fewest frames in
flight among those believed up. When a call fails for a reason outside the frame
(`core.classify`: transient or deadline) and another server is up, the failed server is
marked down and the frame is sent again at once to another one; the other frames in flight
on it fail the same way and follow. A down server is probed (model ready over its own,
fresh channel) every `probe_s` until it answers, then takes frames again. With one server
nothing is ever marked down: the frame waits with the retry policy's backoff on a fresh
channel, exactly as the one-server stream always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import dataclass, field

from cmg import model_config as mcfg
from cmg.errors import CMGError
from cmg_clients import core
from cmg_clients.channel import Channel
from cmg_clients.client import CMGClient

# Frames of one stream (all its sources) decoded at once: a decode of a 9000 x 9000 float TIFF
# held ~1.9 GB, and the window (16 a source) with the thread pool (up to 32) had let 4 and more
# run at once (7 GB). Half the cores, 2 to 8: decoding (outside the GIL) keeps up with several
# cameras of large frames and a fast config, and at most 8 of the largest frames are in memory.
DECODES = max(2, min(8, len(os.sched_getaffinity(0)) // 2))  # the cores this process may use (a container's)


@dataclass(eq=False)
class Server:
    """One server as the pool sees it."""

    url: str
    channel: Channel
    in_flight: int = 0
    up: bool = True
    frames: int = 0  # answers received from it
    calibrated: mcfg.CalibratedThreshold | None = None  # its ensemble's threshold per version (GPU targets)
    failures: int = 0  # times it was marked down
    probe: asyncio.Task | None = field(default=None, repr=False)


class ServerPool:
    """The servers of one stream (shared by all its sources)."""

    def __init__(self, urls: list[str], model: str, timeout_s: float, probe_s: float = 0.5) -> None:
        if not urls:
            raise CMGError("no server URL given")
        normalized = [core.normalize_url(u, "grpc") for u in urls]
        if len(set(normalized)) != len(normalized):
            raise CMGError(f"--url given twice: {', '.join(normalized)}")
        self.model, self.timeout_s, self.probe_s = model, timeout_s, probe_s
        self.servers = [Server(u, Channel(u, timeout_s)) for u in normalized]
        self.decodes = asyncio.Semaphore(DECODES)  # shared by the stream's sources, as the pool is

    @property
    def multi(self) -> bool:
        return len(self.servers) > 1

    @property
    def reconnects(self) -> int:
        return sum(s.channel.reconnects for s in self.servers)

    def pick(self, avoid: Server | None = None) -> Server:
        """The up server with the fewest frames in flight (ties: the first given); when none
        is up, the least busy of all (its failure then counts against the retry budget)."""
        up = [s for s in self.servers if s.up and s is not avoid] or [s for s in self.servers if s.up]
        return min(up or self.servers, key=lambda s: s.in_flight)

    def threshold(self, server: Server) -> float | None:
        """THRESHOLD to send to `server` when the caller gives none: its ensemble's calibrated
        one (GPU targets), another server's until it has answered; None on the cpu target."""
        known = server.calibrated or next((s.calibrated for s in self.servers if s.calibrated), None)
        return None if known is None else known.value

    async def resend_with(self, server: Server, version: str | None, sent: float) -> float | None:
        """The threshold to score a frame again with, when `version` of `server` answered it
        sent with `sent` and calibrated otherwise (a deploy switched runs); None: the answer
        stands (also when the config cannot be read now: it was flagged at `sent`)."""
        cal = server.calibrated
        if cal is None or not cal.known(version):
            channel = server.channel  # its client read at each call: a replaced one is closed after a deadline
            try:
                cfg = (await channel.client.get_model_config(self.model, client_timeout=self.timeout_s)).config
                ready = (await channel.client.get_model_metadata(self.model, client_timeout=self.timeout_s)).versions
                if cal is None:
                    server.calibrated = cal = mcfg.CalibratedThreshold(cfg, ready)
                else:
                    cal.learn(cfg, ready)
            except Exception:  # noqa: BLE001 - a failed read keeps the answer: it was flagged at `sent`
                return None
        return cal.resend_with(version, sent)

    def another_up(self, server: Server) -> bool:
        return any(s.up and s is not server for s in self.servers)

    async def failed(self, server: Server, generation: int, reconnect: bool) -> None:
        """A call to `server` failed for a reason outside the frame."""
        if not self.multi:
            if reconnect:
                await server.channel.reset(generation)
            return
        if server.up:
            server.up = False
            server.failures += 1
            await server.channel.reset(generation)
            server.probe = asyncio.get_running_loop().create_task(self._probe(server), name=f"probe {server.url}")

    async def _probe(self, server: Server) -> None:
        """Until `server` says the model is ready again (then it takes frames again)."""
        while True:
            await asyncio.sleep(self.probe_s)
            try:
                ready = await server.channel.client.is_model_ready(self.model, client_timeout=self.timeout_s)
            except Exception:  # noqa: BLE001 - any failure just means "not yet"
                ready = False
                await server.channel.reset(server.channel.generation)
            if ready:
                server.up = True
                server.probe = None
                return

    async def close(self) -> None:
        for server in self.servers:
            if server.probe is not None:
                server.probe.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await server.probe
            await server.channel.close()

    def handshake(self) -> tuple[int, int]:
        """Frame size (H, W) from the first server that answers; the others start down and are
        probed. None answering is an error naming each one's reason."""

        size, reasons = None, []
        for server in self.servers:
            try:
                with CMGClient(server.url, "grpc", model=self.model, timeout_s=self.timeout_s) as probe:
                    got = probe.size
                    server.calibrated = probe.calibrated
            except CMGError as exc:
                if not self.multi:
                    raise
                reasons.append(f"{server.url}: {exc}")
                server.up = False
                server.failures += 1
                continue
            if size is not None and got != size:
                raise CMGError(f"{server.url} serves frames of {got}, {self.servers[0].url} of {size}: "
                               "every server must serve the same models")
            size = size or got
        if size is None:
            raise CMGError("no server answers: " + "; ".join(reasons))
        for reason in reasons:  # the others carry the frames; said now, not only in the summary
            print(f"cmg stream: {reason} (not answering at the start: streaming to the others, probing it "
                  f"every {self.probe_s:g} s)", file=sys.stderr)
        return size

    def start_probes(self) -> None:
        """Probe the servers that were down at the handshake (call inside the event loop)."""
        for server in self.servers:
            if not server.up and server.probe is None:
                server.probe = asyncio.get_running_loop().create_task(self._probe(server), name=f"probe {server.url}")

    def stats(self) -> dict[str, dict]:
        return {s.url: {"frames": s.frames, "failures": s.failures, "reconnects": s.channel.reconnects}
                for s in self.servers}

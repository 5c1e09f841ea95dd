"""One server's gRPC aio channel, replaced by a fresh one once per failure (not once per
frame): the stream's scorer and the server pool share it."""

from __future__ import annotations

import asyncio
import contextlib
import time

import tritonclient.grpc.aio as aio

from cmg_clients import core


class Channel:
    """The current aio client; `reset` swaps in a fresh channel once per failure, not once per frame."""

    CALLS_END_S = 1.0  # past a call's deadline, for it to end as a deadline (not a cancellation)

    def __init__(self, url: str, timeout_s: float):
        self.url = url
        self.timeout_s = timeout_s
        self.generation = 0
        self.reconnects = 0
        self._lock = asyncio.Lock()
        self._old: list[tuple[float, object]] = []  # (when replaced, client) not closed yet
        self._last_reset = float("-inf")
        self.min_interval_s = 0.25
        self.client = self._make()

    def _make(self):
        # Short reconnect backoff inside gRPC too: its default grows to 2 minutes.
        return aio.InferenceServerClient(self.url, channel_args=core.grpc_channel_args(aio))

    async def reset(self, generation: int) -> None:
        # The old channel is not closed at once: closing cancels the calls still on it, and
        # each of those frames would then need telling apart from a real cancellation.
        # They fail or finish on their own, within their deadline (timeout_s); the channel is
        # closed at a reset after that (a call given a longer deadline is then cancelled, which
        # the scorer retries as any failure of the channel). Kept to the end, a down server's probe (a reset every
        # 0.5 s, for ever) had kept 2 channels a second, ~5 GB a day.
        async with self._lock:
            now = time.monotonic()
            if generation != self.generation or now - self._last_reset < self.min_interval_s:
                return  # another frame already reconnected, or did so a moment ago
            self._last_reset = now
            self._old.append((now, self.client))
            self.client = self._make()
            self.generation += 1
            self.reconnects += 1
            done = [client for since, client in self._old if now - since > self.timeout_s + self.CALLS_END_S]
            self._old = self._old[len(done):]  # oldest first
            for client in done:
                with contextlib.suppress(Exception):
                    await client.close()

    async def close(self) -> None:
        for client in [*(client for _, client in self._old), self.client]:
            with contextlib.suppress(Exception):
                await client.close()
        self._old = []



"""The client's connection pool: a few small httpx clients, each request through the least busy.

One scale set client sends every API call of the scale sets it serves except their queue polls
(those have pools of their own, ``_transport.SessionPool``): registration and admin tokens, JIT
configs, runner removals. When many runners start or end together, hundreds of these are out at
once. httpcore (1.0) pairs waiting requests with connections by scanning every queued request
against every connection of its pool, on each request and each response, so the CPU a request
costs grows with the pool: measured on the reference machine, 100 requests at a time cost 4.1 ms
of CPU each in one pool of 100 connections, 1.2 ms each spread over 25 pools of 4 (1.0 ms alone).

So the pool is a list of httpx clients (*shards*) of :data:`SHARD_CONNECTIONS` connections each,
opened as load needs them up to :data:`MAX_SHARDS`. A request goes to the shard with the fewest
requests in flight, the first on a tie, so a quiet client keeps reusing the first shard's warm
connections; a shard other than the first that has been idle for ``idle_after`` seconds is closed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from outrunner.scaleset._http11 import send_direct
from outrunner.scaleset._request import build_request

__all__ = ["MAX_SHARDS", "SHARD_CONNECTIONS", "ClientPool"]

SHARD_CONNECTIONS = 4
"""Connections one shard opens at most."""
MAX_SHARDS = 25
"""Shards at most: 100 connections in all, httpx's default cap for one client."""


@dataclass(eq=False)
class _Shard:
    http: httpx.AsyncClient
    in_flight: int = 0
    used_at: float = 0.0


class ClientPool:
    """Sends requests through the least busy of up to ``max_shards`` httpx clients.

    ``open_client`` makes one shard (every shard is configured alike, so any of them can build a
    request). It has the two methods :func:`outrunner.scaleset.retry.send` needs of a client.
    """

    def __init__(
        self,
        open_client: Callable[[], httpx.AsyncClient],
        *,
        max_shards: int = MAX_SHARDS,
        shard_connections: int = SHARD_CONNECTIONS,
        idle_after: float = 90.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_shards < 1 or shard_connections < 1:
            raise ValueError("a client pool needs at least one shard of one connection")
        self._open_client = open_client
        self._max_shards = max_shards
        self._shard_connections = shard_connections
        self._idle_after = idle_after
        self._clock = clock
        self._shards = [_Shard(open_client(), used_at=clock())]
        self._trimmed_at = clock()
        self._closed = False

    @property
    def shards(self) -> int:
        """How many shards are open."""
        return len(self._shards)

    @property
    def is_closed(self) -> bool:
        return self._closed

    def build_request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        content: bytes | None = None,
    ) -> httpx.Request:
        return build_request(self._shards[0].http, method, url, headers=headers, content=content)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` (its body read) through the least busy shard."""
        now = self._clock()
        if now - self._trimmed_at >= self._idle_after:
            await self._trim(now)
        shard = self._pick()
        shard.in_flight += 1
        try:
            return await send_direct(shard.http, request)
        finally:
            shard.in_flight -= 1
            shard.used_at = self._clock()

    async def aclose(self) -> None:
        """Close every shard; idempotent."""
        self._closed = True
        shards, self._shards = self._shards, self._shards[:1]
        for shard in shards:
            await shard.http.aclose()

    def _pick(self) -> _Shard:
        best = self._shards[0]
        for shard in self._shards:
            if shard.in_flight < best.in_flight:
                best = shard
        if (
            best.in_flight >= self._shard_connections
            and len(self._shards) < self._max_shards
            and not self._closed
        ):
            best = _Shard(self._open_client(), used_at=self._clock())
            self._shards.append(best)
        return best

    async def _trim(self, now: float) -> None:
        self._trimmed_at = now
        idle = [
            shard
            for shard in self._shards[1:]
            if shard.in_flight == 0 and now - shard.used_at >= self._idle_after
        ]
        if not idle:
            return
        self._shards = [shard for shard in self._shards if shard not in idle]
        for shard in idle:
            await shard.http.aclose()

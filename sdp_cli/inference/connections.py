"""Keep-alive connections to the servers, one httpx client per connection.

httpx's own pool (httpcore 1.0) assigns an idle keep-alive connection to every request that
arrives before the first one starts using it, so a burst of requests lands on a few connections
and queues behind itself, several times slower than fresh connections against vLLM
(docs/benchmarks.md). Here each in-flight request holds a client with
exactly one connection, and finished clients are reused newest-first per server, which keeps the
connections alive without that queueing.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

# vLLM's HTTP server closes a connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE); dropping
# ours earlier avoids sending a request into a connection the server is closing at that moment.
KEEPALIVE_S = 3.0


class ConnectionPool:
    def __init__(self, timeout: httpx.Timeout) -> None:
        self._timeout = timeout
        self._free: dict[str, list[httpx.AsyncClient]] = {}
        self._all: set[httpx.AsyncClient] = set()
        # Building an SSL context loads the CA bundle (milliseconds each); share one.
        self._ssl = ssl.create_default_context()

    @asynccontextmanager
    async def connection(self, address: str) -> AsyncIterator[httpx.AsyncClient]:
        """A client whose single connection this caller has to itself until it exits."""
        free = self._free.setdefault(address, [])
        client = free.pop() if free else self._new_client()
        try:
            yield client
        finally:
            if client.is_closed:
                self._all.discard(client)
            else:
                free.append(client)

    def _new_client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_S
        )
        transport = httpx.AsyncHTTPTransport(verify=self._ssl, limits=limits)
        client = httpx.AsyncClient(transport=transport, timeout=self._timeout)
        self._all.add(client)
        return client

    async def aclose(self) -> None:
        clients, self._all, self._free = self._all, set(), {}
        for client in clients:
            await client.aclose()

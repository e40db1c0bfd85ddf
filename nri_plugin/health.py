"""Readiness and liveness over HTTP: ``/readyz`` and ``/healthz`` (``health-address``).

Specification
-------------
* ``GET /healthz`` answers ``200 ok`` whenever the daemon's event loop runs: the listener is served
  by that same loop, so a blocked or dead loop does not answer at all and the probe times out.
* ``GET /readyz`` answers ``200 ready`` only while the plugin is registered with the runtime *and*
  a host driver snapshot exists (the plugin can inject GPUs now); otherwise ``503`` with one line
  saying which of the two is missing (``not registered with the runtime (reconnecting)``,
  ``no NVIDIA driver snapshot (discovery pending)`` ...). During a containerd restart the plugin is
  disconnected, so ``/readyz`` is 503 until it has registered again.
* Any other path is ``404``; any method but GET/HEAD is ``405``. Requests are read with a 2 s
  timeout and a 4 KiB header limit; the connection is closed after each answer.

This listener is separate from the metrics endpoint on purpose: probes must work with metrics off,
and a slow scrape must never fail a liveness probe.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from nri_plugin.config import parse_address

READ_TIMEOUT_S = 2.0
MAX_HEADER_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    reason: str


def _response(status: int, text: str, head: bool = False) -> bytes:
    phrase = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request"}.get(
        status, "Service Unavailable"
    )
    body = (text + "\n").encode()
    header = (
        f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n"
    ).encode()
    return header if head else header + body


def answer(request_line: str, readiness: Callable[[], Readiness]) -> bytes:
    """The full HTTP response for one request line (``GET /readyz HTTP/1.1``)."""
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response(400, "bad request")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return _response(405, f"method {method} not allowed; use GET")
    head = method == "HEAD"
    path = target.split("?", 1)[0]
    if path == "/healthz":
        return _response(200, "ok", head)
    if path == "/readyz":
        state = readiness()
        return _response(200 if state.ready else 503, state.reason, head)
    return _response(404, f"no such path {path!r}; try /readyz or /healthz", head)


class HealthServer:
    """The asyncio listener; ``start()`` binds (port 0 picks one), ``close()`` stops it."""

    def __init__(self, address: str, readiness: Callable[[], Readiness]) -> None:
        self.address = address
        self._host, self._port = parse_address(address)
        self._readiness = readiness
        self._server: asyncio.Server | None = None
        self.listening = ""

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)
        sock = self._server.sockets[0].getsockname()
        host, port = str(sock[0]), int(sock[1])
        self.listening = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.listening

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEADER_BYTES:
                raise ValueError("header too long")
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            writer.write(answer(line, self._readiness))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # a probe that hangs up or sends garbage gets no answer
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
            self.listening = ""

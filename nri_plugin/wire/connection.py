"""An asyncio NRI connection: drives the mux and ttrpc codecs over one connected unix socket.

* Mux conn 1 (plugin service): we are the ttrpc server. Each request runs in its own task, looked
  up in a handler table keyed by ``(service, method)``; a slow handler never blocks the others.
* Mux conn 2 (runtime service): we are the ttrpc client, ``await conn.call(...)``.

Each message is written in one piece under a lock, so the frames of two messages never
interleave. EOF, a socket error or a protocol violation ends the connection: pending calls fail
with :class:`ConnectionClosed`, running handlers are cancelled, and ``on_close(reason)`` is called
once. Nothing escapes the read loop as an unhandled exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

from nri_plugin.errors import NriPluginError, ProtocolError
from nri_plugin.wire.session import (
    FrameDropped,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    Role,
    Session,
)
from nri_plugin.wire.tasks import TaskScope
from nri_plugin.wire.ttrpc import Code, RpcError

Handler = Callable[[bytes], Awaitable[bytes]]
"""Takes the serialized request message, returns the serialized response message."""

READ_SIZE = 256 * 1024
CLOSE_FLUSH_TIMEOUT = 1.0  # seconds close() lets unsent bytes drain before dropping them
# Requests from the runtime being handled or waiting to be answered. containerd has a handful in
# flight at most; past this a request is answered ResourceExhausted at once, so a peer that sends
# requests and never reads the replies cannot make us buffer them without bound.
MAX_OUTSTANDING = 128
# A write that cannot drain in this time means the peer stopped reading: the connection is closed.
WRITE_TIMEOUT = 10.0
# Immediate answers (refused requests) waiting to be written: past this the peer is sending
# requests much faster than it reads the answers, and the connection is closed.
MAX_IMMEDIATE_BYTES = 4 << 20


class _LogLimiter:
    """At most ``burst`` log lines per ``interval`` seconds for one kind of peer misbehaviour; the
    next line allowed says how many were suppressed."""

    __slots__ = ("_burst", "_interval", "_left", "_since", "suppressed")

    def __init__(self, burst: int = 5, interval: float = 10.0) -> None:
        self._burst = burst
        self._interval = interval
        self._left = burst
        self._since = 0.0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now - self._since >= self._interval:
            self._since = now
            self._left = self._burst
        if self._left > 0:
            self._left -= 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        n, self.suppressed = self.suppressed, 0
        return n


class ConnectionClosed(NriPluginError):
    """The NRI connection ended (EOF, socket error or protocol violation) before a call finished."""


class Connection:
    def __init__(
        self,
        sock: socket.socket,
        handlers: Mapping[tuple[str, str], Handler],
        *,
        logger: logging.Logger | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self._sock = sock
        self._handlers = dict(handlers)
        self._services = {service for service, _ in self._handlers}
        self._log = logger or logging.getLogger(__name__)
        self._on_close = on_close
        self._session = Session(Role.PLUGIN)
        self._calls: dict[int, asyncio.Future[ResponseReceived]] = {}
        self._tasks = TaskScope("nri connection", self._log)
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closed = asyncio.Event()
        self.close_reason: str | None = None
        self._noisy = _LogLimiter()
        self._immediate = bytearray()  # answers that need no handler, written by one flusher task
        self._flushing = False

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def wait_closed(self) -> str:
        await self._closed.wait()
        assert self.close_reason is not None
        return self.close_reason

    async def open(self) -> None:
        """Attach the socket to the running loop (call before ``serve``/``call``)."""
        self._sock.setblocking(False)
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock, limit=READ_SIZE)

    async def serve(self) -> str:
        """Read and dispatch until the connection ends; returns why it ended. Never raises."""
        if self._reader is None:
            await self.open()
        assert self._reader is not None
        reason: str
        try:
            while not self.closed:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    reason = "peer closed the connection (EOF)"
                    if self._session.buffered:
                        reason = (
                            f"peer closed the connection (EOF) {self._session.buffered} bytes into a frame"
                        )
                    break
                self._receive(data)
            else:
                reason = self.close_reason or "closed"
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
        except (ConnectionError, OSError) as exc:
            reason = f"socket error: {exc!r}"
        except asyncio.CancelledError:
            await self.close("connection task cancelled")
            raise
        except Exception as exc:  # a bug in our own code must not escape the loop
            self._log.exception("nri connection: unexpected error in the read loop")
            reason = f"internal error: {type(exc).__name__}: {exc}"
        await self.close(reason)
        return self.close_reason or reason

    def _receive(self, data: bytes) -> None:
        session = self._session
        immediate = self._immediate
        for event in session.receive_data(data):
            if isinstance(event, RequestReceived):
                if len(self._tasks) < MAX_OUTSTANDING:
                    self._spawn(self._dispatch(event))
                    continue
                self._warn("too many outstanding requests; refusing %s", event.method)
                text = f"more than {MAX_OUTSTANDING} outstanding requests"
                immediate += session.send_error(event.stream_id, Code.RESOURCE_EXHAUSTED, text)
            elif isinstance(event, RequestRejected):
                self._warn("rejected request on stream %d: %s", event.stream_id, event.message)
                immediate += session.send_error(event.stream_id, event.code, event.message)
            elif isinstance(event, ResponseReceived):
                fut = self._calls.pop(event.stream_id, None)
                if fut is not None and not fut.done():
                    fut.set_result(event)
            elif isinstance(event, FrameDropped) and self._noisy.allow(time.monotonic()):
                self._log.debug("nri connection: dropped frame for unknown mux connection %d", event.conn_id)
            # MessageIgnored: an answer to nothing we await (e.g. a call we gave up on): dropped
        if len(immediate) > MAX_IMMEDIATE_BYTES:
            raise ProtocolError(
                f"the peer sent requests much faster than it reads the answers ({len(immediate)} bytes "
                "of refusals unsent)"
            )
        if immediate and not self._flushing:
            self._flushing = True
            self._spawn(self._flush_immediate())

    async def _flush_immediate(self) -> None:
        """Write the queued immediate answers (one task, however many arrive meanwhile)."""
        try:
            while self._immediate:
                data = bytes(self._immediate)
                self._immediate.clear()
                await self._send(data)
        finally:
            self._flushing = False

    def _warn(self, fmt: str, *args: object) -> None:
        if self._noisy.allow(time.monotonic()):
            suppressed = self._noisy.take_suppressed()
            if suppressed:
                fmt += " (%d similar messages suppressed)"
                args = (*args, suppressed)
            self._log.warning("nri connection: " + fmt, *args)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if not self.closed:
            self._tasks.spawn(coro)
        else:
            coro.close()

    async def _dispatch(self, req: RequestReceived) -> None:
        session = self._session
        handler = self._handlers.get((req.service, req.method))
        if handler is None:
            what = f"method {req.method}" if req.service in self._services else f"service {req.service}"
            reply = session.send_error(req.stream_id, Code.UNIMPLEMENTED, what)
        else:
            try:
                payload = await handler(req.payload)
            except asyncio.CancelledError:
                raise
            except NriPluginError as exc:  # each carries its status; the text is for the CRI caller
                reply = session.send_error(req.stream_id, *exc.status())
            except Exception as exc:
                self._log.exception("nri connection: handler for %s/%s failed", req.service, req.method)
                text = f"internal error in {req.method}: {type(exc).__name__}: {exc}"
                reply = session.send_error(req.stream_id, Code.UNKNOWN, text)
            else:
                reply = session.send_response(req.stream_id, payload)
        await self._send(reply)

    async def _send(self, data: bytes) -> None:
        """Write bytes the session produced; a closed connection has nobody left to answer."""
        try:
            await self._write(data)
        except ConnectionClosed as exc:
            self._log.debug("nri connection: response dropped: %s", exc)

    async def _write(self, data: bytes) -> None:
        if self.closed or self._writer is None:
            raise ConnectionClosed(f"cannot send on a closed NRI connection ({self.close_reason})")
        async with self._write_lock:
            try:
                self._writer.write(data)
                async with asyncio.timeout(WRITE_TIMEOUT):
                    await self._writer.drain()
            except TimeoutError:
                unsent = self._writer.transport.get_write_buffer_size()
                reason = f"the peer read nothing for {WRITE_TIMEOUT:g} s ({unsent} bytes unsent)"
                self._spawn(self.close(reason))
                raise ConnectionClosed(f"NRI connection given up: {reason}") from None
            except (ConnectionError, OSError) as exc:
                self._spawn(self.close(f"socket error while writing: {exc!r}"))
                raise ConnectionClosed(f"NRI connection lost while writing: {exc!r}") from exc

    async def call(self, service: str, method: str, request: bytes, timeout: float | None = None) -> bytes:
        """Call ``service/method`` on the runtime (mux conn 2) and return the response payload.

        Raises RpcError for a non-OK status (DEADLINE_EXCEEDED when ``timeout`` seconds pass),
        ConnectionClosed when the connection ends first.
        """
        if self.closed:
            raise ConnectionClosed(f"cannot call {service}/{method}: connection closed ({self.close_reason})")
        timeout_nano = int(timeout * 1e9) if timeout is not None else 0
        stream_id, data = self._session.send_request(service, method, request, timeout_nano)
        fut: asyncio.Future[ResponseReceived] = asyncio.get_running_loop().create_future()
        self._calls[stream_id] = fut
        try:
            async with asyncio.timeout(timeout):  # the write too: a runtime that reads nothing
                await self._write(data)
                response = await fut
        except TimeoutError:
            raise RpcError(
                Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response within {timeout} s"
            ) from None
        finally:
            self._calls.pop(stream_id, None)
            self._session.forget(stream_id)
        if not response.ok:
            raise RpcError(response.code, response.message)
        return response.payload

    async def close(self, reason: str = "closed locally") -> None:
        """End the connection (idempotent); the first reason given is the one reported."""
        if self.closed:
            return
        self.close_reason = reason
        self._closed.set()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(ConnectionClosed(f"NRI connection closed: {reason}"))
        self._calls.clear()
        self._tasks.cancel_all(keep=asyncio.current_task())
        if self._writer is not None:
            self._writer.close()
            try:  # flushes what is still buffered, unless the peer has stopped reading
                async with asyncio.timeout(CLOSE_FLUSH_TIMEOUT):
                    with contextlib.suppress(Exception):
                        await self._writer.wait_closed()
            except TimeoutError:
                self._writer.transport.abort()
        else:
            self._sock.close()
        if self._on_close is not None:
            try:
                self._on_close(reason)
            except Exception:
                self._log.exception("nri connection: on_close callback failed")

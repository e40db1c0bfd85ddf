"""The runtime end of an NRI trunk for tests, on the project's own sans-IO :class:`Session`.

One harness for every test that needs a runtime without containerd (h11's ``ConnectionPair``
idea: both ends in memory, the same codecs on each side). :class:`FakeRuntime` is the ttrpc
client on conn 1 (it calls the plugin) and the ttrpc server on conn 2 (the plugin calls it): the
requests the plugin sends wait in :attr:`FakeRuntime.requests`, answers to our calls resolve the
futures :meth:`FakeRuntime.start_call` returns. Subclasses pick a stricter view of what arrives
by overriding :meth:`FakeRuntime.on_event` (``tests/unit/test_fuzz_wire.py``'s ``StrictRuntime``).

:func:`listen` and :meth:`FakeRuntime.accept` are the runtime's socket for an *external* plugin:
listen where containerd does (removing a stale socket first, as containerd does at start-up) and
take the one connection the stub makes. :func:`run` runs a scenario with a time bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable
from typing import Any, Self, TypeVar

from nri_plugin.wire import mux, ttrpc
from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.session import Event, Role, Session
from nri_plugin.wire.stub import PLUGIN_SERVICE, RUNTIME_SERVICE

TIMEOUT = 5.0
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """``asyncio.run`` of ``coro``, bounded: a hung scenario fails its test instead of the suite."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


class FakeRuntime:
    """The runtime side of the trunk: ttrpc client on conn 1, ttrpc server on conn 2."""

    # The deadline each call announces to the plugin (Request.timeout_nano), as containerd's 2 s.
    call_timeout_nano = 2_000_000_000

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session = Session(Role.RUNTIME)  # we call the plugin on conn 1, serve it on conn 2
        self.requests: asyncio.Queue[ttrpc.RequestReceived] = asyncio.Queue()
        self.answers: dict[int, asyncio.Future[ttrpc.ResponseReceived]] = {}
        self.eof = asyncio.Event()  # set when the plugin's side of the connection has ended
        self.task = asyncio.create_task(self._read())

    @classmethod
    async def over(cls, sock: socket.socket) -> Self:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    @classmethod
    async def accept(cls, listener: socket.socket) -> Self:
        """The runtime for the one connection ``listener`` gets (then closed), within TIMEOUT."""
        try:
            async with asyncio.timeout(TIMEOUT):
                conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        finally:
            listener.close()
        return await cls.over(conn)

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for event in self.session.receive_data(data):
                    self.on_event(event)
        finally:
            self.eof.set()

    def on_event(self, event: Event) -> None:
        """One event from the plugin: an answer to our call, or a call to the runtime service."""
        if isinstance(event, ttrpc.ResponseReceived):
            self.answers.pop(event.stream_id).set_result(event)
        else:
            assert isinstance(event, ttrpc.RequestReceived), event
            self.requests.put_nowait(event)

    async def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def send_raw(self, conn: int, message: bytes) -> None:
        """One ttrpc message, framed for ``conn`` (also malformed ones, for the tests)."""
        await self.send_bytes(mux.encode_message(conn, message))

    async def start_call(
        self, method: str, request: Any, service: str = PLUGIN_SERVICE
    ) -> asyncio.Future[ttrpc.ResponseReceived]:
        sid, data = self.session.send_request(
            service, method, request.SerializeToString(), self.call_timeout_nano
        )
        fut: asyncio.Future[ttrpc.ResponseReceived] = asyncio.get_running_loop().create_future()
        self.answers[sid] = fut
        await self.send_bytes(data)
        return fut

    async def call(self, method: str, request: Any, service: str = PLUGIN_SERVICE) -> ttrpc.ResponseReceived:
        fut = await self.start_call(method, request, service)
        async with asyncio.timeout(TIMEOUT):
            return await fut

    async def next_request(self) -> ttrpc.RequestReceived:
        async with asyncio.timeout(TIMEOUT):
            return await self.requests.get()

    async def reply(self, stream_id: int, message: Any = None, code: int = 0, text: str = "") -> None:
        if code:
            data = self.session.send_error(stream_id, code, text)
        else:
            data = self.session.send_response(stream_id, (message or api.Empty()).SerializeToString())
        await self.send_bytes(data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
        self.task.cancel()

    async def register_and_configure(self, **configure: Any) -> api.ConfigureResponse:
        """Answer RegisterPlugin, then Configure with ``configure``; the plugin's answer."""
        req = await self.next_request()
        assert (req.service, req.method) == (RUNTIME_SERVICE, "RegisterPlugin"), req
        await self.reply(req.stream_id)
        resp = await self.call("Configure", api.ConfigureRequest(**configure))
        assert resp.ok, resp.message
        return api.ConfigureResponse.FromString(resp.payload)


def listen(path: str) -> socket.socket:
    """Listen on ``path`` the way containerd does at start-up: remove the old socket, bind anew."""
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.setblocking(False)
    return listener

"""Issue 12, wire side: a hostile or broken peer cannot make the connection grow without bound."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from nri_plugin.errors import ProtocolError
from nri_plugin.wire import connection as connection_mod
from nri_plugin.wire import mux, ttrpc
from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire._gen import ttrpc_pb2
from nri_plugin.wire.connection import Connection
from nri_plugin.wire.stub import BACKOFF_MAX, Plugin, Stub
from tests.fakeruntime import run

SERVICE = "nri.pkg.api.v1alpha1.Plugin"


def test_server_gives_up_after_a_few_violations() -> None:
    server = ttrpc.ServerConnection()
    zeros = b"\0" * ttrpc.HEADER_SIZE * (ttrpc.MAX_VIOLATIONS + 1)
    with pytest.raises(ProtocolError, match="protocol violations by the peer"):
        server.receive_data(zeros)
    server = ttrpc.ServerConnection()
    events = server.receive_data(b"\0" * ttrpc.HEADER_SIZE * ttrpc.MAX_VIOLATIONS)
    assert len(events) == ttrpc.MAX_VIOLATIONS  # each answered, as the Go server does


def _request(stream_id: int, method: str = "Slow") -> bytes:
    data = ttrpc.encode_message(
        stream_id,
        ttrpc.TYPE_REQUEST,
        ttrpc_pb2.Request(service=SERVICE, method=method).SerializeToString(),
    )
    return mux.encode_message(mux.PLUGIN_SERVICE_CONN, data)


def _read_all(sock: socket.socket, timeout: float = 2.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            out += chunk
    except TimeoutError:
        pass
    return bytes(out)


def _peak_growth_mib(fn: Callable[[], object]) -> float:
    """How much the peak RSS grows while ``fn()`` runs, measured in a forked child: a fork starts
    with its peak at its current RSS, so an earlier test's peak in this process cannot hide growth
    (``ru_maxrss`` of this process could never fail after one)."""
    if threading.active_count() > 1:  # fork() with threads alive is unsafe (and warns on 3.12+)
        pytest.skip("another thread is alive in the test process; the forked measurement needs none")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run, report, and leave without pytest's clean-up
        code = 1
        try:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            fn()
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
            os.write(write_end, str(grown).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the measured scenario failed in the child"
    return int(data) / 1024


def test_frame_of_zeros_closes_the_connection_quickly(caplog: pytest.LogCaptureFixture) -> None:
    """A 16 MiB frame of zeros is ~1.6 M bogus messages: before, a log line and a task each (3 GiB)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    async def scenario() -> str:
        conn = Connection(ours, {})
        await conn.open()
        serving = asyncio.ensure_future(conn.serve())
        payload = b"\0" * (mux.MAX_FRAME_PAYLOAD)
        await asyncio.get_running_loop().sock_sendall(
            theirs, mux.encode_frame(mux.PLUGIN_SERVICE_CONN, payload)
        )
        return await serving

    theirs.setblocking(False)
    grown_mib = _peak_growth_mib(lambda: run(scenario()))  # the same attack, in a fresh process
    ours.close()
    theirs.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    with caplog.at_level(logging.WARNING, logger="nri_plugin.wire.connection"):
        reason = run(scenario())
    assert "protocol violations" in reason, reason
    theirs.setblocking(True)
    answers = _read_all(theirs, 0.5)
    assert len(answers) < 8 * 200  # at most MAX_VIOLATIONS small error responses
    warnings = [r for r in caplog.records if "rejected request" in r.getMessage()]
    assert len(warnings) <= 5
    # The 16 MiB frame itself is buffered (a few times, while it is reassembled: ~65 MiB); nothing
    # per bogus message on top of it (before: 3 GiB; with the 1.6 M messages parsed into one list
    # before the violation limit was seen: 165 MiB).
    assert grown_mib < 100, grown_mib
    theirs.close()


def test_peer_that_never_reads_replies_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """10 000 requests, replies never read: before, all replies were buffered (616 MiB)."""
    monkeypatch.setattr(connection_mod, "WRITE_TIMEOUT", 0.5)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
    peak = {"tasks": 0}

    async def slow(_: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return b"x" * 60_000

    async def scenario() -> str:
        conn = Connection(ours, {(SERVICE, "Slow"): slow})
        await conn.open()
        serving = asyncio.ensure_future(conn.serve())
        loop = asyncio.get_running_loop()
        theirs.setblocking(False)
        burst = b"".join(_request(2 * i + 1) for i in range(10_000))
        await loop.sock_sendall(theirs, burst)
        while not serving.done():
            peak["tasks"] = max(peak["tasks"], len(conn._tasks))
            await asyncio.sleep(0.005)
        return serving.result()

    try:
        grown_mib = _peak_growth_mib(lambda: run(scenario()))  # in a fresh process first
        ours.close()
        theirs.close()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        reason = run(scenario())
    finally:
        theirs.close()
        ours.close()
    assert "read nothing" in reason, reason
    # what is buffered stays bounded: all 10 000 replies of 60 kB would be 600 MB
    assert grown_mib < 100, grown_mib
    # the request handlers, plus the one flusher of refusals and the closing task
    assert peak["tasks"] <= connection_mod.MAX_OUTSTANDING + 2, peak


class _GpuLike(Plugin):
    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        return api.CreateContainerResponse()


def test_reconnect_backoff_is_capped_low() -> None:
    assert BACKOFF_MAX <= 0.5


def test_a_recreated_socket_is_dialled_at_once(tmp_path: Path) -> None:
    """Waiting to re-dial, the stub wakes as soon as containerd listens again, not at the end of
    its backoff."""
    path = tmp_path / "nri.sock"
    stub = Stub(_GpuLike(), name="gpu", index="10", socket_path=str(path))

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        waiting = asyncio.ensure_future(stub._wait_for_socket(5.0))
        await asyncio.sleep(0.1)
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        try:
            await waiting
        finally:
            listener.close()
        return loop.time() - t0

    elapsed = run(scenario())
    assert elapsed < 1.0, elapsed

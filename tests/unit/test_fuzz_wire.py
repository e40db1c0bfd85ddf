"""Fuzzing the wire decoders and the stub with hypothesis.

Codec level: random and mutated bytes, cut into random chunks, go into the mux reader and the ttrpc
readers. The only outcomes allowed are events (frames, messages, requests, rejections, responses)
or a clean :class:`~nri_plugin.errors.ProtocolError`; any other exception is a bug. Where the
input decodes, what was decoded must re-encode to exactly the bytes consumed.

Stub level: a real :class:`~nri_plugin.wire.stub.Stub` registers with the shared fake runtime
(``tests/fakeruntime.py``, on our own sans-IO session), here strict about what it receives; then
the "runtime" sends garbage (random bytes, random frames, real method names with random payloads,
oversized frame headers). The stub must never crash, everything it sends back must be well-formed,
the connection must end cleanly (EOF both ways, ``run()`` returns for a runtime-launched stub
without raising), and an external stub must reconnect to the re-created socket, register again and
serve CreateContainer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nri_plugin.errors import ProtocolError
from nri_plugin.wire import mux, ttrpc
from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire._gen import ttrpc_pb2
from nri_plugin.wire.session import Event, FrameDropped, Role, Session
from nri_plugin.wire.stub import PLUGIN_SERVICE, RUNTIME_SERVICE, Plugin, Stub
from tests.fakeruntime import FakeRuntime, listen, run

TIMEOUT = 5.0
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PLUGIN_METHODS = (
    "Configure", "Synchronize", "Shutdown", "CreateContainer", "UpdateContainer", "StopContainer",
    "UpdatePodSandbox", "StateChange", "RunPodSandbox", "RemoveContainer", "PostCreateContainer",
    "ValidateContainerAdjustment", "NoSuchMethod",
)  # fmt: skip


# --- strategies -----------------------------------------------------------------------------------


def chunked(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    """``data`` cut at the given positions (taken modulo its length)."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        yield data[a:b]


@st.composite
def ttrpc_messages(draw: st.DrawFn) -> bytes:
    """One ttrpc message: mostly a plausible Request, sometimes any type/flags/stream id/data."""
    stream_id = draw(st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)))
    kind = draw(st.sampled_from(["request", "response", "raw"]))
    if kind == "request":
        request = ttrpc_pb2.Request(
            service=draw(st.sampled_from([PLUGIN_SERVICE, RUNTIME_SERVICE, "x.Y", ""])),
            method=draw(st.sampled_from(PLUGIN_METHODS)),
            payload=draw(st.binary(max_size=200)),
            timeout_nano=draw(st.integers(0, 2**63 - 1)),
        )
        return ttrpc.encode_message(stream_id, ttrpc.TYPE_REQUEST, request.SerializeToString())
    if kind == "response":
        status = ttrpc_pb2.Status(code=draw(st.integers(0, 20)), message=draw(st.text(max_size=30)))
        response = ttrpc_pb2.Response(status=status, payload=draw(st.binary(max_size=100)))
        return ttrpc.encode_message(stream_id, ttrpc.TYPE_RESPONSE, response.SerializeToString())
    return ttrpc.encode_message(
        stream_id, draw(st.integers(0, 255)), draw(st.binary(max_size=200)), draw(st.integers(0, 255))
    )


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with a few byte flips, insertions, deletions or a truncation."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        pos = draw(st.integers(0, max(len(buf), 1) - 1)) if buf else 0
        if op == "flip" and buf:
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and buf:
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del buf[pos:]
    return bytes(buf)


@st.composite
def mux_streams(draw: st.DrawFn) -> bytes:
    """Mux frames on conn 1/2 (sometimes another id) carrying ttrpc messages, then mutated."""
    parts = []
    for message in draw(st.lists(ttrpc_messages(), max_size=5)):
        conn = draw(st.sampled_from([1, 1, 1, 2, 0, 3, 2**32 - 1]))
        parts.append(mux.encode_message(conn, message))
    return draw(mutated(b"".join(parts)))


any_stream = st.one_of(st.binary(max_size=600), mux_streams())
cuts = st.lists(st.integers(0, 10_000), max_size=6)


# --- codec level ----------------------------------------------------------------------------------


def feed_mux(reader: mux.MuxReader, data: bytes, cut_at: list[int]) -> list[mux.Frame]:
    frames: list[mux.Frame] = []
    for chunk in chunked(data, cut_at):
        frames.extend(reader.feed(chunk))
    return frames


@FAST
@given(data=any_stream, cut_at=cuts, limit=st.sampled_from([mux.MAX_FRAME_PAYLOAD, 64, 0]))
def test_mux_reader_gives_frames_or_protocol_error(data: bytes, cut_at: list[int], limit: int) -> None:
    reader = mux.MuxReader(max_payload=limit)
    try:
        frames = feed_mux(reader, data, cut_at)
    except ProtocolError as exc:
        assert "announces" in str(exc) and str(limit) in str(exc)
        return
    consumed = len(data) - reader.buffered
    assert b"".join(mux.encode_frame(f.conn_id, f.payload) for f in frames) == data[:consumed]
    assert all(len(f.payload) <= limit for f in frames)
    rest = data[consumed:]  # what is still buffered can never be a whole frame
    if len(rest) >= mux.HEADER_SIZE:
        assert mux.HEADER.unpack_from(rest)[1] > len(rest) - mux.HEADER_SIZE


@FAST
@given(data=any_stream, cut_at=cuts, limit=st.sampled_from([ttrpc.MESSAGE_LENGTH_MAX, 32]))
def test_ttrpc_message_reader_never_fails(data: bytes, cut_at: list[int], limit: int) -> None:
    reader = ttrpc.MessageReader(max_length=limit)
    out: list[ttrpc.Message | ttrpc.OversizedMessage] = []
    for chunk in chunked(data, cut_at):
        out.extend(reader.feed(chunk))
    for m in out:
        if isinstance(m, ttrpc.Message):
            assert len(m.data) <= limit
        else:
            assert m.length > limit
    # Without oversized messages, the decoded ones re-encode to exactly the consumed prefix.
    if not any(isinstance(m, ttrpc.OversizedMessage) for m in out):
        rebuilt = b"".join(
            ttrpc.HEADER.pack(len(m.data), m.stream_id, m.type, m.flags) + m.data
            for m in out
            if isinstance(m, ttrpc.Message)
        )
        assert data.startswith(rebuilt) and len(data) - len(rebuilt) == reader.buffered


def decode_like_connection(data: bytes, cut_at: list[int]) -> list[object]:
    """What ``Connection._receive`` gets from its session for the received bytes, without a socket."""
    session = Session(Role.PLUGIN)
    for _ in range(4):
        session.send_request(RUNTIME_SERVICE, "RegisterPlugin", b"")  # stream ids 1, 3, 5, 7 pending
    events: list[object] = []
    for chunk in chunked(data, cut_at):
        events.extend(session.receive_data(chunk))
    return events


DUPLICATE_RESPONSE = b"".join(  # found by CI: stream 1 answered twice; the second is ignored
    mux.encode_message(2, ttrpc.encode_message(1, ttrpc.TYPE_RESPONSE, body)) for body in (b"\0\0", b"")
)


@FAST
@given(data=any_stream, cut_at=cuts)
@example(data=DUPLICATE_RESPONSE, cut_at=[])
def test_ttrpc_connections_give_events_or_protocol_error(data: bytes, cut_at: list[int]) -> None:
    try:
        events = decode_like_connection(data, cut_at)
    except ProtocolError:
        return
    answered: set[int] = set()  # a second response on an answered stream is rightly ignored
    for event in events:
        if isinstance(event, ttrpc.RequestReceived):
            assert event.stream_id % 2 == 1
            # Whatever arrived, our answer to it is a well-formed Response.
            reply = ttrpc.ServerConnection().send_error(event.stream_id, ttrpc.Code.UNIMPLEMENTED, "x")
            assert ttrpc.MessageReader().feed(reply)[0] == ttrpc.Message(
                event.stream_id, ttrpc.TYPE_RESPONSE, 0, reply[ttrpc.HEADER_SIZE :]
            )
        elif isinstance(event, ttrpc.RequestRejected):
            assert event.code in set(ttrpc.Code) - {ttrpc.Code.OK} and event.message
        elif isinstance(event, ttrpc.MessageIgnored):
            pending = {1, 3, 5, 7} - answered
            assert event.type != ttrpc.TYPE_RESPONSE or event.stream_id not in pending
        elif isinstance(event, FrameDropped):
            assert event.conn_id not in (mux.PLUGIN_SERVICE_CONN, mux.RUNTIME_SERVICE_CONN)
        else:
            assert isinstance(event, ttrpc.ResponseReceived), event
            assert event.stream_id in {1, 3, 5, 7} - answered
            answered.add(event.stream_id)
            assert event.ok or isinstance(event.message, str)


@FAST
@given(data=any_stream, split=cuts, other=cuts)
def test_event_sequence_does_not_depend_on_chunking(data: bytes, split: list[int], other: list[int]) -> None:
    def outcome(cut_at: list[int]) -> object:
        try:
            return decode_like_connection(data, cut_at)
        except ProtocolError as exc:
            return ("ProtocolError", str(exc))

    assert outcome(split) == outcome(other)


# --- stub level -----------------------------------------------------------------------------------


class Adjuster(Plugin):
    """CreateContainer answers with one env var naming the container; counts disconnects."""

    def __init__(self) -> None:
        self.disconnects = 0

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        adjust = api.ContainerAdjustment(env=[api.KeyValue(key="FUZZ_SEEN", value=container.id)])
        return api.CreateContainerResponse(adjust=adjust)

    async def on_disconnected(self) -> None:
        self.disconnects += 1


class StrictRuntime(FakeRuntime):
    """The shared fake runtime, recording anything the plugin sends that is not well-formed; a
    write to a plugin that already closed the connection is not an error here (garbage may end it)."""

    call_timeout_nano = 0  # the calls announce no deadline

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.violations: list[str] = []
        super().__init__(reader, writer)

    async def _read(self) -> None:
        try:
            await super()._read()
        except (ConnectionError, OSError):
            pass
        except ProtocolError as exc:
            self.violations.append(f"plugin sent a bad mux frame: {exc}")

    def on_event(self, event: Event) -> None:
        if isinstance(event, ttrpc.ResponseReceived):
            if event.code == ttrpc.Code.INTERNAL and event.message.startswith("failed to decode"):
                self.violations.append(f"conn 1: undecodable Response: {event.message}")
            fut = self.answers.pop(event.stream_id, None)
            if fut is not None:
                fut.set_result(event)
        elif isinstance(event, ttrpc.RequestReceived) and event.service == RUNTIME_SERVICE:
            self.requests.put_nowait(event)
        elif isinstance(event, ttrpc.MessageIgnored):
            # an answer to the garbage we sent is fine; anything but a Response is not
            if event.type != ttrpc.TYPE_RESPONSE:
                self.violations.append(f"conn 1: not a Response: {event!r}")
        elif isinstance(event, FrameDropped):
            self.violations.append(f"frame on unknown mux connection {event.conn_id}")
        else:
            self.violations.append(f"conn 2: bad request {event!r:.200}")

    async def send(self, data: bytes) -> bool:
        """Write raw bytes; False if the plugin already closed the connection."""
        try:
            await super().send_bytes(data)
        except (ConnectionError, OSError):
            return False
        return True

    async def send_bytes(self, data: bytes) -> None:
        await self.send(data)

    async def register(self) -> None:
        """RegisterPlugin answered, then Configure and Synchronize, as containerd does."""
        await self.register_and_configure(runtime_name="containerd", runtime_version="v1.7.24")
        sync = await self.call("Synchronize", api.SynchronizeRequest())
        assert sync.ok, sync.message

    async def garbage_then_eof(self, garbage: bytes) -> None:
        """Send ``garbage``, close our write side, and wait until the plugin has closed its side."""
        if await self.send(garbage):
            with contextlib.suppress(ConnectionError, OSError):
                self.writer.write_eof()
        async with asyncio.timeout(TIMEOUT):
            await self.eof.wait()


OVERSIZED_HEADER = mux.HEADER.pack(mux.PLUGIN_SERVICE_CONN, mux.MAX_FRAME_PAYLOAD + 1)


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """What a broken runtime might send after registration."""
    base = draw(st.one_of(st.binary(min_size=1, max_size=300), mux_streams()))
    if draw(st.booleans()):
        base += OVERSIZED_HEADER + draw(st.binary(max_size=20))
    return base


def _counts(stub: Stub, plugin: Adjuster) -> tuple[int, int, int]:
    return stub.registrations, stub.reconnects, plugin.disconnects


@SLOW
@given(garbage=hostile_streams())
def test_launched_stub_survives_garbage_and_ends_cleanly(garbage: bytes) -> None:
    plugin = Adjuster()

    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stub = Stub(plugin, name="fuzz", index="10", socket_fd=ours.detach(), logger=logging.getLogger("fz"))
        task = asyncio.create_task(stub.run())
        rt = await StrictRuntime.over(theirs)
        await rt.register()
        async with asyncio.timeout(TIMEOUT):
            await stub.registered.wait()
        await rt.garbage_then_eof(garbage)
        async with asyncio.timeout(TIMEOUT):
            await task  # returns (a launched stub does not reconnect); raising would fail here
        await rt.close()
        assert rt.violations == []
        assert _counts(stub, plugin) == (1, 0, 1)
        assert not stub.registered.is_set()

    run(scenario())


def test_oversized_frame_makes_the_stub_close_the_connection() -> None:
    """No EOF from the runtime here: the stub itself must end the connection on a ProtocolError."""
    plugin = Adjuster()

    async def scenario() -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stub = Stub(plugin, name="fuzz", index="10", socket_fd=ours.detach(), logger=logging.getLogger("fz"))
        task = asyncio.create_task(stub.run())
        rt = await StrictRuntime.over(theirs)
        await rt.register()
        await rt.send(OVERSIZED_HEADER)
        async with asyncio.timeout(TIMEOUT):
            await rt.eof.wait()
            await task
        await rt.close()
        assert rt.violations == [] and _counts(stub, plugin) == (1, 0, 1)

    run(scenario())


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    # Short and private: AF_UNIX paths are limited to 107 bytes (pytest's tmp_path can be longer).
    d = Path(tempfile.mkdtemp(prefix="nri-fuzz-"))
    yield d
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=hostile_streams())
def test_external_stub_reconnects_after_garbage(socket_dir: Path, garbage: bytes) -> None:
    plugin = Adjuster()
    path = str(socket_dir / f"{uuid.uuid4().hex[:12]}.sock")

    async def scenario() -> None:
        listener = listen(path)
        stub = Stub(plugin, name="fuzz", index="10", socket_path=path, logger=logging.getLogger("fz"))
        task = asyncio.create_task(stub.run())
        rt = await StrictRuntime.accept(listener)
        await rt.register()
        async with asyncio.timeout(TIMEOUT):
            await stub.registered.wait()
        await rt.garbage_then_eof(garbage)
        await rt.close()
        assert rt.violations == []
        # containerd restarted: a new socket at the same path.
        rt2 = await StrictRuntime.accept(listen(path))
        await rt2.register()
        async with asyncio.timeout(TIMEOUT):
            while stub.registrations < 2:
                await asyncio.sleep(0.005)
        req = api.CreateContainerRequest(
            pod=api.PodSandbox(id="p"), container=api.Container(id="c-after-garbage", pod_sandbox_id="p")
        )
        resp = await rt2.call("CreateContainer", req)
        assert resp.ok, resp.message
        adjust = api.CreateContainerResponse.FromString(resp.payload).adjust
        assert [(kv.key, kv.value) for kv in adjust.env] == [("FUZZ_SEEN", "c-after-garbage")]
        assert not task.done()
        stub.stop()
        async with asyncio.timeout(TIMEOUT):
            await task
        await rt2.close()
        assert rt2.violations == []
        assert _counts(stub, plugin) == (2, 1, 2)
        os.unlink(path)

    run(scenario())

"""The stub and connection against the shared fake runtime (``tests/fakeruntime.py``, no containerd)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from nri_plugin.errors import ConfigError, ContainerError
from nri_plugin.wire import mux, ttrpc
from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.connection import Connection, ConnectionClosed
from nri_plugin.wire.stub import PLUGIN_SERVICE, RUNTIME_SERVICE, Plugin, Stub, event_mask
from tests.fakeruntime import FakeRuntime, listen, run

TIMEOUT = 5.0


def pod(n: int) -> api.PodSandbox:
    return api.PodSandbox(id=f"pod{n}", name=f"p{n}", namespace="default")


def ctr(n: int, env: tuple[str, ...] = ()) -> api.Container:
    return api.Container(id=f"ctr{n}", pod_sandbox_id=f"pod{n}", name=f"c{n}", env=list(env))


class Recorder(Plugin):
    """A test plugin that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.release_stop = asyncio.Event()
        self.registered_calls = 0
        self.disconnected_calls = 0

    async def configure(self, config: str, runtime_name: str, runtime_version: str) -> None:
        self.calls.append(("configure", config, runtime_name, runtime_version))

    async def synchronize(
        self, pods: list[api.PodSandbox], containers: list[api.Container]
    ) -> list[api.ContainerUpdate]:
        self.calls.append(("synchronize", [p.id for p in pods], [c.id for c in containers]))
        return [api.ContainerUpdate(container_id=c.id) for c in containers]

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        self.calls.append(("create", pod.id, container.id))
        if "FAIL=container" in container.env:
            raise ContainerError(f"NVIDIA_VISIBLE_DEVICES='bogus' in container {container.name}: use 'all'")
        if "FAIL=bug" in container.env:
            raise ValueError("boom")
        adjust = api.ContainerAdjustment(env=[api.KeyValue(key="SEEN", value=container.id)])
        return api.CreateContainerResponse(adjust=adjust)

    async def stop_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.StopContainerResponse:
        self.calls.append(("stop-begin", container.id))
        await self.release_stop.wait()
        self.calls.append(("stop-end", container.id))
        return api.StopContainerResponse()

    async def start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        self.calls.append(("start", pod.id, container.id))

    async def remove_pod_sandbox(self, pod: api.PodSandbox) -> None:
        self.calls.append(("remove-pod", pod.id))

    async def on_registered(self) -> None:
        self.registered_calls += 1

    async def on_disconnected(self) -> None:
        self.disconnected_calls += 1


RECORDER_MASK = 0x8 | 0x200 | 0x20 | 0x4  # create, stop, start, remove pod


@asynccontextmanager
async def launched(plugin: Plugin) -> AsyncIterator[tuple[Stub, FakeRuntime, asyncio.Task[None]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    stub = Stub(plugin, name="gpu-injector", index="10", socket_fd=ours.detach())
    task = asyncio.create_task(stub.run())
    runtime = await FakeRuntime.over(theirs)
    try:
        yield stub, runtime, task
    finally:
        stub.stop()
        await runtime.close()
        async with asyncio.timeout(TIMEOUT):
            await task


# --- construction ----------------------------------------------------------------------------


def test_event_mask_follows_overridden_handlers() -> None:
    assert event_mask(Recorder()) == RECORDER_MASK


@pytest.mark.parametrize(
    ("name", "index"), [("gpu injector", "10"), ("", "10"), ("gpu", "1"), ("gpu", "\uff11\uff10")]
)
def test_invalid_name_or_index_is_a_config_error(name: str, index: str) -> None:
    with pytest.raises(ConfigError, match="invalid"):
        Stub(Recorder(), name=name, index=index)


def test_plugin_without_event_handlers_is_rejected() -> None:
    class Nothing(Plugin):
        async def configure(self, config: str, runtime_name: str, runtime_version: str) -> None:
            return None

    with pytest.raises(ConfigError, match="Nothing overrides no event handler"):
        Stub(Nothing(), name="x", index="10")


def test_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NRI_PLUGIN_SOCKET", raising=False)
    ext = Stub.from_environment(Recorder(), name="gpu", index="10", socket_path="/tmp/x.sock")
    assert not ext.launched and ext.socket_path == "/tmp/x.sock"
    monkeypatch.setenv("NRI_PLUGIN_SOCKET", "3")
    monkeypatch.setenv("NRI_PLUGIN_NAME", "nvidia")
    monkeypatch.setenv("NRI_PLUGIN_IDX", "05")
    lau = Stub.from_environment(Recorder(), name="gpu", index="10", socket_path="/tmp/x.sock")
    assert lau.launched and (lau.name, lau.index) == ("nvidia", "05")
    monkeypatch.setenv("NRI_PLUGIN_SOCKET", "three")
    with pytest.raises(ConfigError, match="NRI_PLUGIN_SOCKET='three'"):
        Stub.from_environment(Recorder(), name="gpu", index="10")


# --- the whole lifecycle ---------------------------------------------------------------------


def test_launched_lifecycle_against_fake_runtime() -> None:
    plugin = Recorder()

    async def scenario() -> None:
        async with launched(plugin) as (stub, rt, task):
            reg = await rt.next_request()
            assert (reg.service, reg.method, reg.stream_id) == (RUNTIME_SERVICE, "RegisterPlugin", 1)
            assert api.RegisterPluginRequest.FromString(reg.payload) == api.RegisterPluginRequest(
                plugin_name="gpu-injector", plugin_idx="10"
            )
            # Configure arrives before the RegisterPlugin reply.
            conf = await rt.call(
                "Configure",
                api.ConfigureRequest(
                    config="cfg", runtime_name="containerd", runtime_version="v1.7.26",
                    registration_timeout=5000, request_timeout=2000,
                ),
            )  # fmt: skip
            assert conf.ok, conf.message
            assert api.ConfigureResponse.FromString(conf.payload).events == RECORDER_MASK
            assert (stub.config, stub.runtime_name, stub.runtime_version) == ("cfg", "containerd", "v1.7.26")
            await rt.reply(reg.stream_id)
            assert not stub.registered.is_set()  # Synchronize still to come

            page1 = await rt.call(
                "Synchronize", api.SynchronizeRequest(pods=[pod(1)], containers=[ctr(1)], more=True)
            )
            assert api.SynchronizeResponse.FromString(page1.payload) == api.SynchronizeResponse(more=True)
            assert not [c for c in plugin.calls if c[0] == "synchronize"]
            page2 = await rt.call("Synchronize", api.SynchronizeRequest(pods=[pod(2)], containers=[ctr(2)]))
            sync = api.SynchronizeResponse.FromString(page2.payload)
            assert [u.container_id for u in sync.update] == ["ctr1", "ctr2"] and not sync.more
            assert ("synchronize", ["pod1", "pod2"], ["ctr1", "ctr2"]) in plugin.calls
            async with asyncio.timeout(TIMEOUT):
                await stub.registered.wait()
            await asyncio.sleep(0.01)
            assert (stub.registrations, plugin.registered_calls) == (1, 1)

            created = await rt.call(
                "CreateContainer", api.CreateContainerRequest(pod=pod(1), container=ctr(3))
            )
            adjust = api.CreateContainerResponse.FromString(created.payload).adjust
            assert [(kv.key, kv.value) for kv in adjust.env] == [("SEEN", "ctr3")]

            # StateChange {event 1, pod 2, container 3} and the dedicated {pod 1, container 2}.
            ev = api.StateChangeEvent(event=api.START_CONTAINER, pod=pod(4), container=ctr(4))
            assert (await rt.call("StateChange", ev)).ok
            dedicated = api.StartContainerRequest(pod=pod(5), container=ctr(5))
            answer = await rt.call("StartContainer", dedicated)
            assert answer.ok and answer.payload == b""
            ev = api.StateChangeEvent(event=api.REMOVE_POD_SANDBOX, pod=pod(6))
            assert (await rt.call("StateChange", ev)).ok
            ev = api.StateChangeEvent(event=api.POST_START_CONTAINER, pod=pod(7), container=ctr(7))
            assert (await rt.call("StateChange", ev)).ok  # not handled: ignored
            assert ("start", "pod4", "ctr4") in plugin.calls and ("start", "pod5", "ctr5") in plugin.calls
            assert ("remove-pod", "pod6") in plugin.calls
            assert not [c for c in plugin.calls if "pod7" in c]

            # Dedicated RPC of a handler we do not override, unknown method and service: 12.
            r = await rt.call(
                "PostStartContainer", api.PostStartContainerRequest(pod=pod(8), container=ctr(8))
            )
            assert (r.code, r.message) == (12, "method PostStartContainer")
            r = await rt.call("Frobnicate", api.Empty())
            assert (r.code, r.message) == (12, "method Frobnicate")
            r = await rt.call("Hello", api.Empty(), service="no.such.Service")
            assert (r.code, r.message) == (12, "service no.such.Service")
            assert (await rt.call("Shutdown", api.Empty())).ok

            # Handler errors fail only that call.
            bad = api.CreateContainerRequest(pod=pod(9), container=ctr(9, env=("FAIL=container",)))
            r = await rt.call("CreateContainer", bad)
            assert (r.code, r.message) == (2, "NVIDIA_VISIBLE_DEVICES='bogus' in container c9: use 'all'")
            bug = api.CreateContainerRequest(pod=pod(9), container=ctr(10, env=("FAIL=bug",)))
            r = await rt.call("CreateContainer", bug)
            assert (r.code, r.message) == (2, "internal error in CreateContainer: ValueError: boom")

            # A slow handler does not block others.
            slow = await rt.start_call(
                "StopContainer", api.StopContainerRequest(pod=pod(11), container=ctr(11))
            )
            fast = await rt.call(
                "CreateContainer", api.CreateContainerRequest(pod=pod(12), container=ctr(12))
            )
            assert fast.ok and not slow.done()
            plugin.release_stop.set()
            async with asyncio.timeout(TIMEOUT):
                assert (await slow).ok
            assert plugin.calls.index(("create", "pod12", "ctr12")) < plugin.calls.index(
                ("stop-end", "ctr11")
            )

            # EOF: a launched stub's run() returns.
            await rt.close()
            async with asyncio.timeout(TIMEOUT):
                await task
            assert not stub.registered.is_set() and plugin.disconnected_calls == 1

    run(scenario())


@pytest.mark.parametrize(
    ("configure", "expected"),
    [
        (dict(runtime_name="containerd", runtime_version="1.7.24"), 0x7FF),
        (dict(runtime_name="containerd", runtime_version="v2.1.0"), 0x7FF),
        (dict(runtime_name="containerd", runtime_version="v2.2.1"), 0x3FFF),
        (dict(runtime_name="cri-o", runtime_version="1.33", NRI_version="v0.12.0"), 0x3FFF),
    ],
)
def test_mask_is_clipped_to_what_the_runtime_accepts(configure: dict[str, str], expected: int) -> None:
    class Wide(Recorder):
        async def post_update_pod_sandbox(self, pod: api.PodSandbox) -> None:  # bit 0x1000, NRI >= v0.10
            return None

    async def scenario() -> None:
        async with launched(Wide()) as (_stub, rt, _):
            conf = await rt.register_and_configure(**configure)
            assert conf.events == (RECORDER_MASK | 0x1000) & expected

    run(scenario())


def test_configure_fails_when_no_subscribed_event_is_supported() -> None:
    class OnlyNew(Plugin):
        async def post_update_pod_sandbox(self, pod: api.PodSandbox) -> None:
            return None

    async def scenario() -> None:
        async with launched(OnlyNew()) as (_stub, rt, _):
            req = await rt.next_request()
            await rt.reply(req.stream_id)
            r = await rt.call(
                "Configure", api.ConfigureRequest(runtime_name="containerd", runtime_version="1.7.24")
            )
            assert r.code == 2 and "0x1000" in r.message and "upgrade the runtime" in r.message

    run(scenario())


def test_v0_6_launched_plugin_is_registered_after_configure() -> None:
    plugin = Recorder()

    async def scenario() -> None:
        async with launched(plugin) as (stub, rt, _):
            # NRI v0.6.1 sends neither timeouts nor NRI_version, and never Synchronize.
            await rt.register_and_configure(runtime_name="containerd", runtime_version="1.7.24")
            async with asyncio.timeout(TIMEOUT):
                await stub.registered.wait()
            assert stub.registrations == 1

    run(scenario())


def test_failed_registration_closes_the_connection() -> None:
    plugin = Recorder()

    async def scenario() -> None:
        async with launched(plugin) as (stub, rt, task):
            req = await rt.next_request()
            await rt.reply(req.stream_id, code=3, text="invalid plugin index")
            async with asyncio.timeout(TIMEOUT):
                await task
            assert stub.registrations == 0 and plugin.disconnected_calls == 0

    run(scenario())


def test_stop_while_registering_is_not_logged_as_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    plugin = Recorder()

    async def scenario() -> None:
        async with launched(plugin) as (stub, rt, task):
            await rt.next_request()  # RegisterPlugin, never answered
            stub.stop()  # SIGTERM while the registration is outstanding
            async with asyncio.timeout(TIMEOUT):
                await task
            assert stub.registrations == 0

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert any("abandoned: stopping" in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- external mode: reconnect ----------------------------------------------------------------


def test_external_plugin_reconnects_and_reregisters(tmp_path: Path) -> None:
    plugin = Recorder()
    path = str(tmp_path / "nri.sock")

    async def full_registration(rt: FakeRuntime) -> None:
        conf = await rt.register_and_configure(runtime_name="containerd", runtime_version="v2.0.0")
        assert conf.events == RECORDER_MASK
        assert (await rt.call("Synchronize", api.SynchronizeRequest())).ok

    async def scenario() -> None:
        stub = Stub(plugin, name="gpu", index="10", socket_path=path, logger=logging.getLogger("t"))
        task = asyncio.create_task(stub.run())
        await asyncio.sleep(0.25)  # nothing listens yet: the stub keeps retrying
        assert not task.done()
        rt = await FakeRuntime.accept(listen(path))  # a new socket each time, as on restart
        await full_registration(rt)
        async with asyncio.timeout(TIMEOUT):
            await stub.registered.wait()
        await rt.close()  # runtime restart
        rt = await FakeRuntime.accept(listen(path))  # a new socket each time, as on restart
        await full_registration(rt)
        async with asyncio.timeout(TIMEOUT):
            while stub.registrations < 2:
                await asyncio.sleep(0.01)
        assert stub.reconnects == 1 and plugin.disconnected_calls == 1 and stub.registered.is_set()
        stub.stop()
        async with asyncio.timeout(TIMEOUT):
            await task
        await rt.close()
        assert plugin.disconnected_calls == 2

    run(scenario())


# --- connection robustness -------------------------------------------------------------------


async def connection_pair(
    handlers: Mapping[tuple[str, str], Callable[[bytes], Awaitable[bytes]]],
) -> tuple[Connection, asyncio.Task[str], socket.socket, list[str]]:
    ours, theirs = socket.socketpair()
    reasons: list[str] = []
    conn = Connection(ours, handlers, on_close=reasons.append)
    await conn.open()
    return conn, asyncio.create_task(conn.serve()), theirs, reasons


def test_malformed_frame_closes_cleanly_and_fails_pending_calls() -> None:
    async def scenario() -> None:
        conn, serve, theirs, reasons = await connection_pair({})
        call = asyncio.create_task(conn.call(RUNTIME_SERVICE, "RegisterPlugin", b"", timeout=TIMEOUT))
        await asyncio.sleep(0.01)
        theirs.sendall(mux.HEADER.pack(1, (1 << 24) + 1))
        async with asyncio.timeout(TIMEOUT):
            reason = await serve
        assert reason.startswith("protocol error: mux frame for connection 1 announces 16777217")
        assert reasons == [reason]
        with pytest.raises(ConnectionClosed):
            await call
        theirs.close()

    run(scenario())


def test_eof_inside_a_frame_is_reported() -> None:
    async def scenario() -> None:
        conn, serve, theirs, reasons = await connection_pair({})
        theirs.sendall(mux.HEADER.pack(1, 100) + b"abc")
        theirs.close()
        async with asyncio.timeout(TIMEOUT):
            assert "EOF" in await serve and conn.closed
        assert len(reasons) == 1

    run(scenario())


def test_client_call_timeout_and_error_status() -> None:
    async def scenario() -> None:
        conn, serve, theirs, _ = await connection_pair({})
        rt = await FakeRuntime.over(theirs)
        with pytest.raises(ttrpc.RpcError) as info:
            await conn.call(RUNTIME_SERVICE, "UpdateContainers", b"", timeout=0.05)
        assert info.value.code == ttrpc.Code.DEADLINE_EXCEEDED
        first = await rt.next_request()
        call = asyncio.create_task(conn.call(RUNTIME_SERVICE, "UpdateContainers", b"", timeout=TIMEOUT))
        second = await rt.next_request()
        assert (first.stream_id, second.stream_id) == (1, 3)
        assert second.timeout_nano == int(TIMEOUT * 1e9)
        await rt.reply(first.stream_id)  # late answer to the timed-out call: ignored
        await rt.reply(second.stream_id, code=9, text="not now")
        with pytest.raises(ttrpc.RpcError, match="rpc error: code = FailedPrecondition desc = not now"):
            await call
        await conn.close("done")
        assert await serve == "done"
        await rt.close()

    run(scenario())


def test_large_response_is_framed_for_the_go_reader() -> None:
    big = b"z" * 100_000

    async def handler(payload: bytes) -> bytes:
        return big

    async def scenario() -> None:
        conn, serve, theirs, _ = await connection_pair({(PLUGIN_SERVICE, "Big"): handler})
        reader, writer = await asyncio.open_unix_connection(sock=theirs)
        client = ttrpc.ClientConnection()
        _, message = client.send_request(PLUGIN_SERVICE, "Big", b"")
        writer.write(mux.encode_message(mux.PLUGIN_SERVICE_CONN, message))
        frames: list[mux.Frame] = []
        demux = mux.MuxReader()
        responses: list[ttrpc.ResponseReceived] = []
        async with asyncio.timeout(TIMEOUT):
            while not responses:
                for frame in demux.feed(await reader.read(65536)):
                    frames.append(frame)
                    responses += [
                        r for r in client.receive_data(frame.payload) if isinstance(r, ttrpc.ResponseReceived)
                    ]
        assert [len(f.payload) for f in frames] == [4096, len(frames[1].payload)]
        assert responses[0].ok and responses[0].payload == big
        await conn.close()
        writer.close()
        await serve

    run(scenario())


def test_a_handler_raising_rpc_error_answers_with_exactly_its_code() -> None:
    """``Plugin`` promises that raising ``ttrpc.RpcError`` picks the status code: every non-OK
    code goes out on the wire as given, with its text, and no payload."""

    class Picky(Recorder):
        async def create_container(
            self, pod: api.PodSandbox, container: api.Container
        ) -> api.CreateContainerResponse:
            code = int(container.env[0].removeprefix("CODE="))
            raise ttrpc.RpcError(code, f"refused with {code}")

    codes = [c for c in ttrpc.Code if c is not ttrpc.Code.OK]

    async def scenario() -> None:
        async with launched(Picky()) as (_stub, rt, _):
            await rt.register_and_configure(runtime_name="containerd", runtime_version="v2.1.0")
            for code in codes:
                req = api.CreateContainerRequest(pod=pod(1), container=ctr(1, env=(f"CODE={int(code)}",)))
                r = await rt.call("CreateContainer", req)
                assert (r.code, r.message, r.payload) == (code, f"refused with {int(code)}", b""), code

    run(scenario())
    assert len(codes) == 16


def test_handler_error_that_cannot_be_sent_verbatim_still_gets_an_answer() -> None:
    """An error text too large (or not encodable) for a ttrpc Response is cut down, never dropped:
    without an answer the runtime times out and creates the container without us (fail-open)."""
    huge = "\u4e2d" * 2_000_000

    async def refuse(payload: bytes) -> bytes:
        raise ContainerError(f"unsupported capabilities found in '{huge}'")

    async def host_name(payload: bytes) -> bytes:
        raise ContainerError("cannot read /usr/lib/libnvidia-ml.so.\udcff")

    async def scenario() -> None:
        handlers = {(PLUGIN_SERVICE, "CreateContainer"): refuse, (PLUGIN_SERVICE, "Other"): host_name}
        conn, serve, theirs, _ = await connection_pair(handlers)
        rt = await FakeRuntime.over(theirs)
        r = await rt.call("CreateContainer", api.CreateContainerRequest())
        assert r.code == ttrpc.Code.UNKNOWN and r.message.startswith("unsupported capabilities found in '")
        r = await rt.call("Other", api.Empty())
        assert r.code == ttrpc.Code.UNKNOWN and r.message.startswith("cannot read /usr/lib/libnvidia-ml.so.")
        await conn.close()
        await serve
        await rt.close()

    run(scenario())


def test_a_runtime_that_stops_reading_cannot_wedge_calls_or_close() -> None:
    """A wedged runtime (alive, socket open, reading nothing) must not hang a call past its timeout,
    nor ``close()``, which ``Stub.stop()`` (SIGTERM) and a failed registration wait for."""
    big = b"x" * ((4 << 20) - 64)

    async def answer_big(payload: bytes) -> bytes:
        return big

    async def scenario() -> None:
        conn, serve, theirs, reasons = await connection_pair({(PLUGIN_SERVICE, "Big"): answer_big})
        client = ttrpc.ClientConnection()
        for _ in range(4):  # ~16 MiB of answers: far more than the socket buffers hold
            _, message = client.send_request(PLUGIN_SERVICE, "Big", b"")
            theirs.sendall(mux.encode_message(mux.PLUGIN_SERVICE_CONN, message))
        await asyncio.sleep(0.3)  # the answers are written until the socket is full, then wait
        with pytest.raises(ttrpc.RpcError) as info:
            async with asyncio.timeout(3):
                await conn.call(RUNTIME_SERVICE, "RegisterPlugin", b"", timeout=0.2)
        assert info.value.code == ttrpc.Code.DEADLINE_EXCEEDED
        async with asyncio.timeout(3):
            await conn.close("plugin stopped")
            assert await serve == "plugin stopped"
        assert reasons == ["plugin stopped"]
        theirs.close()

    run(scenario())


def test_hung_handler_then_runtime_timeout_reconnects_cleanly(tmp_path: Path) -> None:
    """containerd answers a handler that misses its 2 s request timeout by closing the plugin's
    connection; the external stub must drop the hung call, reconnect and serve the next runtime."""
    hung = asyncio.Event()

    class Hangs(Recorder):
        async def create_container(
            self, pod: api.PodSandbox, container: api.Container
        ) -> api.CreateContainerResponse:
            if "HANG=1" in container.env:
                hung.set()
                await asyncio.Event().wait()
            return await super().create_container(pod, container)

    plugin = Hangs()
    path = str(tmp_path / "nri.sock")

    async def register(rt: FakeRuntime) -> None:
        await rt.register_and_configure(runtime_name="containerd", runtime_version="v2.1.0")
        assert (await rt.call("Synchronize", api.SynchronizeRequest())).ok

    async def scenario() -> None:
        stub = Stub(plugin, name="gpu", index="10", socket_path=path, logger=logging.getLogger("t"))
        task = asyncio.create_task(stub.run())
        rt = await FakeRuntime.accept(listen(path))  # a new socket each time, as on restart
        await register(rt)
        pending = await rt.start_call(
            "CreateContainer", api.CreateContainerRequest(pod=pod(1), container=ctr(1, env=("HANG=1",)))
        )
        async with asyncio.timeout(TIMEOUT):
            await hung.wait()
        await rt.close()  # the runtime's request timeout: "closing plugin ..."
        assert not pending.done()
        rt = await FakeRuntime.accept(listen(path))  # a new socket each time, as on restart
        await register(rt)
        async with asyncio.timeout(TIMEOUT):
            while stub.registrations < 2:
                await asyncio.sleep(0.01)
        r = await rt.call("CreateContainer", api.CreateContainerRequest(pod=pod(2), container=ctr(2)))
        assert r.ok and api.CreateContainerResponse.FromString(r.payload).adjust.env[0].value == "ctr2"
        assert (stub.reconnects, plugin.disconnected_calls) == (1, 1)
        stub.stop()
        async with asyncio.timeout(TIMEOUT):
            await task
        await rt.close()

    run(scenario())


# --- the event table and the registration state machine ------------------------------------


def test_event_table_covers_every_plugin_event_handler_once() -> None:
    from nri_plugin.wire.stub import EVENTS

    handlers = [row.handler for row in EVENTS]
    assert len(handlers) == len(set(handlers))
    plugin_methods = {
        name for name in vars(Plugin) if not name.startswith("_") and name not in (
            "configure", "synchronize", "on_registered", "on_disconnected"
        )
    }  # fmt: skip
    assert set(handlers) == plugin_methods
    assert len({row.event for row in EVENTS}) == len(EVENTS) and len({row.rpc for row in EVENTS}) == len(
        EVENTS
    )
    for row in EVENTS:  # the dedicated request type has the fields the handler is called with
        request = row.request()
        assert len(row.args(request)) >= 1


@pytest.mark.parametrize(
    "order",
    [
        ("REPLY", "CONFIGURE", "SYNCHRONIZE"),
        ("CONFIGURE", "REPLY", "SYNCHRONIZE"),
        ("CONFIGURE", "SYNCHRONIZE", "REPLY"),
        ("REPLY", "CONFIGURE_ONLY"),
        ("CONFIGURE_ONLY", "REPLY"),
    ],
)
def test_every_legal_order_registers_exactly_at_its_last_step(order: tuple[str, ...]) -> None:
    from nri_plugin.wire.stub import TRANSITIONS, Phase, Step

    phase = Phase.STARTED
    for i, name in enumerate(order):
        phase = TRANSITIONS.get((phase, Step[name]), phase)
        assert (phase is Phase.REGISTERED) == (i == len(order) - 1), (order, i, phase)
    # further steps leave a registered connection registered
    for step in Step:
        assert TRANSITIONS.get((phase, step), phase) is Phase.REGISTERED

"""The sans-IO trunk: two sessions joined in memory (plugin and runtime role), byte at a time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nri_plugin.errors import ProtocolError
from nri_plugin.wire import mux, ttrpc
from nri_plugin.wire.session import FrameDropped, Role, Session


def feed_bytewise(session: Session, data: bytes) -> list[object]:
    events: list[object] = []
    for i in range(len(data)):
        events.extend(session.receive_data(data[i : i + 1]))
    return events


def test_call_both_ways_any_split() -> None:
    plugin, runtime = Session(Role.PLUGIN), Session(Role.RUNTIME)
    # runtime -> plugin on conn 1
    sid, data = runtime.send_request("nri.pkg.api.v1alpha1.Plugin", "Configure", b"cfg", 2_000_000_000)
    assert mux.HEADER.unpack_from(data)[0] == mux.PLUGIN_SERVICE_CONN
    (req,) = feed_bytewise(plugin, data)
    assert isinstance(req, ttrpc.RequestReceived)
    assert (req.stream_id, req.method, req.payload, req.timeout_nano) == (
        sid,
        "Configure",
        b"cfg",
        2_000_000_000,
    )
    answer = plugin.send_response(req.stream_id, b"ok")
    (resp,) = runtime.receive_data(answer)
    assert isinstance(resp, ttrpc.ResponseReceived) and (resp.stream_id, resp.ok, resp.payload) == (
        sid,
        True,
        b"ok",
    )
    # plugin -> runtime on conn 2, answered with an error
    sid2, data2 = plugin.send_request("nri.pkg.api.v1alpha1.Runtime", "RegisterPlugin", b"")
    assert mux.HEADER.unpack_from(data2)[0] == mux.RUNTIME_SERVICE_CONN and plugin.pending_calls == {sid2}
    (req2,) = runtime.receive_data(data2)
    assert isinstance(req2, ttrpc.RequestReceived)
    (resp2,) = feed_bytewise(plugin, runtime.send_error(req2.stream_id, ttrpc.Code.UNKNOWN, "no"))
    assert isinstance(resp2, ttrpc.ResponseReceived) and (resp2.code, resp2.message) == (2, "no")
    assert plugin.pending_calls == frozenset()


def test_forgotten_call_answer_is_ignored() -> None:
    plugin, runtime = Session(Role.PLUGIN), Session(Role.RUNTIME)
    sid, data = plugin.send_request("S", "M", b"")
    (request,) = runtime.receive_data(data)
    assert isinstance(request, ttrpc.RequestReceived)
    plugin.forget(sid)
    assert plugin.receive_data(runtime.send_response(sid, b"")) == [
        ttrpc.MessageIgnored(sid, ttrpc.TYPE_RESPONSE)
    ]


def test_unknown_connection_and_violations() -> None:
    plugin = Session(Role.PLUGIN, max_violations=2)
    assert plugin.receive_data(mux.encode_frame(7, b"xyz")) == [FrameDropped(7, 3)]
    even = mux.encode_message(mux.PLUGIN_SERVICE_CONN, ttrpc.encode_message(2, ttrpc.TYPE_REQUEST, b""))
    events = plugin.receive_data(even + even)
    assert [type(e) for e in events] == [ttrpc.RequestRejected, ttrpc.RequestRejected]
    with pytest.raises(ProtocolError):
        plugin.receive_data(even)
    with pytest.raises(ValueError):
        plugin.send_error(1, ttrpc.Code.OK, "")


def test_importing_the_codecs_does_not_import_asyncio() -> None:
    code = (
        "import sys; import nri_plugin.wire.session, nri_plugin.wire.mux, nri_plugin.wire.ttrpc; "
        "from nri_plugin.wire import Session, Role, api; "
        "print('asyncio' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out

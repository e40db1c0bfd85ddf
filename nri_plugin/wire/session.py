"""Sans-IO NRI trunk for one peer: bytes in -> events out, calls and answers -> bytes out.

One unix socket carries two ttrpc connections over the mux (``mux.py``): on conn 1 the runtime
calls the plugin (the plugin service), on conn 2 the plugin calls the runtime. A :class:`Session`
owns everything about one end of that trunk that is not I/O -- the mux reassembly, the ttrpc
server bookkeeping of the connection it serves (odd, increasing stream ids; violations) and the
client bookkeeping of the connection it calls on (stream ids 1, 3, 5, ...; which answers are
awaited) -- for either role:

* ``Role.PLUGIN``: serves conn 1, calls on conn 2 (``connection.Connection`` drives one);
* ``Role.RUNTIME``: serves conn 2, calls on conn 1 (the fake runtimes of the tests).

Theory of operation (the shape of h11's ``Connection``): feed whatever bytes arrived to
:meth:`Session.receive_data` and act on the events it returns, in order; to answer a request or
to call the peer, ask the session for the bytes (:meth:`send_response`, :meth:`send_error`,
:meth:`send_request`) and write them in one piece. The session never blocks, never touches a
socket and never imports asyncio, so any split of the byte stream gives the same events and every
rule can be tested byte for byte.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from nri_plugin.wire import mux, ttrpc
from nri_plugin.wire.ttrpc import MessageIgnored, RequestReceived, RequestRejected, ResponseReceived

__all__ = [
    "Event",
    "FrameDropped",
    "MessageIgnored",
    "RequestReceived",
    "RequestRejected",
    "ResponseReceived",
    "Role",
    "Session",
]


class Role(enum.Enum):
    """Which end of the trunk a :class:`Session` is."""

    PLUGIN = "plugin"  # serves mux conn 1 (plugin service), calls on conn 2 (runtime service)
    RUNTIME = "runtime"  # serves mux conn 2, calls on conn 1

    @property
    def serves(self) -> int:
        return mux.PLUGIN_SERVICE_CONN if self is Role.PLUGIN else mux.RUNTIME_SERVICE_CONN

    @property
    def calls(self) -> int:
        return mux.RUNTIME_SERVICE_CONN if self is Role.PLUGIN else mux.PLUGIN_SERVICE_CONN


@dataclass(frozen=True, slots=True)
class FrameDropped:
    """A mux frame for a connection id this end has not opened (the Go mux drops those too)."""

    conn_id: int
    size: int


Event = RequestReceived | RequestRejected | ResponseReceived | MessageIgnored | FrameDropped
"""What :meth:`Session.receive_data` returns:

* :class:`~nri_plugin.wire.ttrpc.RequestReceived` -- a well-formed request on the served
  connection: run the handler, then answer with :meth:`Session.send_response` /
  :meth:`Session.send_error`;
* :class:`~nri_plugin.wire.ttrpc.RequestRejected` -- a request the protocol rules refuse: answer it
  with ``send_error(event.stream_id, event.code, event.message)``;
* :class:`~nri_plugin.wire.ttrpc.ResponseReceived` -- the answer to a call made with
  :meth:`Session.send_request` (answers to nothing, or to forgotten calls, are not reported);
* :class:`~nri_plugin.wire.ttrpc.MessageIgnored` -- a message on the calling connection that
  answers nothing awaited (the Go client drops it): nothing to do;
* :class:`FrameDropped` -- nothing to do but perhaps log it.
"""


class Session:
    """One end of an NRI trunk (see the module docstring)."""

    __slots__ = ("_client", "_mux", "_server", "role")

    def __init__(self, role: Role, *, max_violations: int = ttrpc.MAX_VIOLATIONS) -> None:
        self.role = role
        self._mux = mux.MuxReader()
        self._server = ttrpc.ServerConnection(max_violations)
        self._client = ttrpc.ClientConnection()

    @property
    def buffered(self) -> int:
        """Bytes received that do not complete a mux frame yet (e.g. to describe an EOF)."""
        return self._mux.buffered

    @property
    def pending_calls(self) -> frozenset[int]:
        """Stream ids of the calls still awaiting an answer."""
        return self._client.pending

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes received from the peer.

        Args:
            data: any number of bytes, cut anywhere (an empty chunk is allowed and does nothing).

        Returns:
            The events completed by these bytes, in stream order (see :data:`Event`).

        Raises:
            ProtocolError: the peer broke the protocol beyond repair (a mux frame over 16 MiB, or
                more than ``max_violations`` refused requests); the caller must close the
                connection. Events completed before the fault are lost with it.
        """
        events: list[Event] = []
        serves, calls = self.role.serves, self.role.calls
        for frame in self._mux.feed(data):
            if frame.conn_id == serves:
                events.extend(self._server.receive_data(frame.payload))
            elif frame.conn_id == calls:
                events.extend(self._client.receive_data(frame.payload))
            else:
                events.append(FrameDropped(frame.conn_id, len(frame.payload)))
        return events

    def send_response(self, stream_id: int, payload: bytes) -> bytes:
        """The bytes answering request ``stream_id`` with success and ``payload``.

        Returns:
            Mux frames ready to write; a payload that would exceed 4 MiB becomes a
            ResourceExhausted error answer instead, as the Go server does.
        """
        return mux.encode_message(self.role.serves, self._server.send_response(stream_id, payload))

    def send_error(self, stream_id: int, code: int, message: str) -> bytes:
        """The bytes answering request ``stream_id`` with status ``code`` and ``message``.

        Returns:
            Mux frames ready to write. The message is cut to fit and made valid UTF-8, so the
            answer always encodes.

        Raises:
            ValueError: ``code`` is 0 (OK is not an error).
        """
        return mux.encode_message(self.role.serves, self._server.send_error(stream_id, code, message))

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """A call to the peer's ``service/method``.

        Returns:
            ``(stream_id, bytes)``: the answer will come as a :class:`ResponseReceived` with this
            stream id; the bytes are mux frames ready to write.

        Raises:
            RpcError: RESOURCE_EXHAUSTED when the request would exceed 4 MiB (no stream id is
                used up then).
        """
        stream_id, message = self._client.send_request(service, method, payload, timeout_nano, metadata)
        return stream_id, mux.encode_message(self.role.calls, message)

    def forget(self, stream_id: int) -> None:
        """Stop awaiting the answer to ``stream_id`` (the caller gave up); a late one is dropped."""
        self._client.forget(stream_id)

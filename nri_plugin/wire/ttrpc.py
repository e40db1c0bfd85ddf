"""Sans-IO codec for ttrpc (github.com/containerd/ttrpc), unary calls only.

A ttrpc message is a 10-byte header ``[data length u32 BE][stream id u32 BE][type u8][flags u8]``
followed by the data: a protobuf ``ttrpc.Request`` (type 1) or ``ttrpc.Response`` (type 2).
Data messages (type 3) belong to streaming RPCs, which NRI never uses.

Three layers, none of which touches a socket:

* :class:`MessageReader` reassembles ttrpc messages from the bytes of one mux connection, however
  they were cut into frames; a message announcing more than 4 MiB is skipped without buffering it
  and reported as :class:`OversizedMessage`.
* :class:`ServerConnection` (our side of mux conn 1) turns bytes into :class:`RequestReceived` /
  :class:`RequestRejected` events and answers into message bytes, enforcing the Go server's rules
  (odd, strictly increasing stream ids; ResourceExhausted for oversized requests).
* :class:`ClientConnection` (our side of mux conn 2) numbers requests 1, 3, 5, ... and turns bytes
  into :class:`ResponseReceived` events for the requests it sent.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from nri_plugin.errors import NriPluginError, ProtocolError
from nri_plugin.wire._gen import ttrpc_pb2

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10

MESSAGE_LENGTH_MAX = 4 << 20  # data bytes, header excluded
ERROR_MESSAGE_MAX = MESSAGE_LENGTH_MAX // 2  # UTF-8 bytes of an error status message we send

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


class Code(enum.IntEnum):
    """gRPC status codes, as carried in ``ttrpc.Status.code``."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


def code_name(code: int) -> str:
    """The Go name of a status code as printed in "rpc error: code = <Name> desc = ..."."""
    try:
        name = Code(code).name
    except ValueError:
        return f"Code({code})"
    if name == "CANCELLED":
        return "Canceled"
    return "".join(part.capitalize() for part in name.split("_"))


class RpcError(NriPluginError):
    """A call finished with a non-OK status (raised by clients, or by handlers to pick the code)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"rpc error: code = {code_name(code)} desc = {message}")
        self.code = code
        self.message = message

    def status(self) -> tuple[int, str]:
        return self.code, self.message


def oversized_message(length: int) -> str:
    return f"message length {length} exceed maximum message size of {MESSAGE_LENGTH_MAX}"


@dataclass(frozen=True, slots=True)
class Message:
    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedMessage:
    """A message whose data exceeded MESSAGE_LENGTH_MAX; its data was discarded."""

    stream_id: int
    type: int
    length: int


def encode_message(stream_id: int, msg_type: int, data: bytes, flags: int = 0) -> bytes:
    """Header + data of one ttrpc message. Raises RpcError(RESOURCE_EXHAUSTED) above 4 MiB."""
    if len(data) > MESSAGE_LENGTH_MAX:
        raise RpcError(Code.RESOURCE_EXHAUSTED, oversized_message(len(data)))
    return HEADER.pack(len(data), stream_id, msg_type, flags) + data


class MessageReader:
    """Reassembles ttrpc messages from one logical byte stream (one mux connection)."""

    __slots__ = ("_buf", "_discard", "_max")

    def __init__(self, max_length: int = MESSAGE_LENGTH_MAX) -> None:
        self._buf = bytearray()
        self._discard = 0  # data bytes of an oversized message still to skip
        self._max = max_length

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message | OversizedMessage]:
        """All messages completed by ``data`` (see :meth:`messages`)."""
        return list(self.messages(data))

    def messages(self, data: bytes) -> Iterator[Message | OversizedMessage]:
        """The messages completed by ``data``, one at a time: a consumer that stops early (a peer
        past its violation limit, after which the connection is closed) costs nothing for the rest
        -- 16 MiB of zeros are 1.6 million empty messages, never materialized. Consume or close the
        iterator before the next call: bytes not consumed stay buffered and would be read again."""
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = data[skip:]
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        try:
            while end - pos >= HEADER_SIZE:
                length, stream_id, msg_type, flags = HEADER.unpack_from(buf, pos)
                if length > self._max:
                    pos += HEADER_SIZE
                    skip = min(length, end - pos)
                    pos += skip
                    self._discard = length - skip
                    yield OversizedMessage(stream_id, msg_type, length)
                    continue
                start = pos + HEADER_SIZE
                if end - start < length:
                    break
                pos = start + length
                yield Message(stream_id, msg_type, flags, bytes(buf[start:pos]))
        finally:
            if pos:
                del buf[:pos]


# --- server side (mux conn 1) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    service: str
    method: str
    payload: bytes
    timeout_nano: int
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request the protocol rules refuse; answer it with ``send_error(stream_id, code, message)``."""

    stream_id: int
    code: int
    message: str


def encode_response(stream_id: int, payload: bytes = b"", code: int = 0, message: str = "") -> bytes:
    """A Response message. Success carries ``status {code: 0}`` (``0a 00``), exactly like Go."""
    status = ttrpc_pb2.Status(code=code, message=message)
    response = ttrpc_pb2.Response(status=status, payload=payload)
    return encode_message(stream_id, TYPE_RESPONSE, response.SerializeToString())


# Protocol violations (even or reused stream ids, data frames, undecodable requests) answered
# like the Go server before the connection is given up: containerd never sends one, so more than
# a few mean a broken or hostile peer -- e.g. a frame of zeros is ~1.6 M bogus 10-byte messages.
MAX_VIOLATIONS = 8


class ServerConnection:
    """Our ttrpc server on one connection: requests in, responses out.

    :meth:`receive_data` raises :class:`ProtocolError` once the peer has violated the protocol more
    than ``max_violations`` times (the violations before are answered, as the Go server does).
    """

    __slots__ = ("_last_stream_id", "_max_violations", "_reader", "violations")

    def __init__(self, max_violations: int = MAX_VIOLATIONS) -> None:
        self._reader = MessageReader()
        self._last_stream_id = 0
        self._max_violations = max_violations
        self.violations = 0

    def receive_data(self, data: bytes) -> list[RequestReceived | RequestRejected]:
        events: list[RequestReceived | RequestRejected] = []
        for msg in self._reader.messages(data):
            if isinstance(msg, OversizedMessage):
                events.append(
                    RequestRejected(msg.stream_id, Code.RESOURCE_EXHAUSTED, oversized_message(msg.length))
                )
                continue
            event = self._check(msg)
            if isinstance(event, RequestRejected):
                self.violations += 1
                if self.violations > self._max_violations:
                    raise ProtocolError(
                        f"more than {self._max_violations} ttrpc protocol violations by the peer "
                        f"(last: stream {event.stream_id}: {event.message}); closing the connection"
                    )
            if event is not None:
                events.append(event)
        return events

    def _check(self, msg: Message) -> RequestReceived | RequestRejected | None:
        sid = msg.stream_id
        if sid % 2 != 1:
            return RequestRejected(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
        if msg.type == TYPE_DATA:
            return RequestRejected(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
        if msg.type != TYPE_REQUEST:
            return None  # unknown or misdirected types are ignored, for forward compatibility
        if sid <= self._last_stream_id:
            return RequestRejected(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
        self._last_stream_id = sid
        request = ttrpc_pb2.Request()
        try:
            request.ParseFromString(msg.data)
        except DecodeError as exc:
            return RequestRejected(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        return RequestReceived(
            stream_id=sid,
            service=request.service,
            method=request.method,
            payload=request.payload,
            timeout_nano=request.timeout_nano,
            metadata=tuple((kv.key, kv.value) for kv in request.metadata),
        )

    def send_response(self, stream_id: int, payload: bytes) -> bytes:
        """Bytes answering ``stream_id`` with success; an oversized payload becomes an error."""
        try:
            return encode_response(stream_id, payload)
        except RpcError as exc:
            return self.send_error(stream_id, exc.code, exc.message)

    def send_error(self, stream_id: int, code: int, message: str) -> bytes:
        if code == Code.OK:
            raise ValueError("send_error needs a non-zero status code")
        # The answer must always encode, whatever the text (which may quote container input or a
        # non-UTF-8 host file name): without one the runtime times out and goes on without us.
        # Cut to a byte budget on a character boundary; replace what UTF-8 cannot carry.
        data = message.encode("utf-8", "replace")[:ERROR_MESSAGE_MAX]
        return encode_response(stream_id, code=code, message=data.decode("utf-8", "ignore"))


# --- client side (mux conn 2) -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    stream_id: int
    payload: bytes
    code: int  # 0 = success (also when the status was absent)
    message: str

    @property
    def ok(self) -> bool:
        return self.code == Code.OK


@dataclass(frozen=True, slots=True)
class MessageIgnored:
    """A message on the client's connection that answers nothing we asked (not a Response, or for
    a stream id not awaited); the Go client drops these silently, and so may the caller."""

    stream_id: int
    type: int


class ClientConnection:
    """Our ttrpc client on one connection: odd stream ids from 1, responses matched to requests."""

    __slots__ = ("_next_stream_id", "_pending", "_reader")

    def __init__(self) -> None:
        self._reader = MessageReader()
        self._next_stream_id = 1
        self._pending: set[int] = set()

    @property
    def pending(self) -> frozenset[int]:
        return frozenset(self._pending)

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Allocate a stream id and encode a Request; returns (stream id, message bytes).

        Raises RpcError(RESOURCE_EXHAUSTED) when the request would exceed 4 MiB (nothing is
        allocated then).
        """
        request = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=payload,
            timeout_nano=timeout_nano,
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
        )
        stream_id = self._next_stream_id
        data = encode_message(stream_id, TYPE_REQUEST, request.SerializeToString())
        self._next_stream_id += 2
        self._pending.add(stream_id)
        return stream_id, data

    def forget(self, stream_id: int) -> None:
        """Stop expecting a response (the caller gave up); a late response is then dropped."""
        self._pending.discard(stream_id)

    def receive_data(self, data: bytes) -> list[ResponseReceived | MessageIgnored]:
        events: list[ResponseReceived | MessageIgnored] = []
        for msg in self._reader.messages(data):
            if msg.type != TYPE_RESPONSE or msg.stream_id not in self._pending:
                events.append(MessageIgnored(msg.stream_id, msg.type))  # answers nothing we asked
                continue
            self._pending.discard(msg.stream_id)
            if isinstance(msg, OversizedMessage):
                events.append(
                    ResponseReceived(
                        msg.stream_id, b"", Code.RESOURCE_EXHAUSTED, oversized_message(msg.length)
                    )
                )
                continue
            response = ttrpc_pb2.Response()
            try:
                response.ParseFromString(msg.data)
            except DecodeError as exc:
                events.append(
                    ResponseReceived(msg.stream_id, b"", Code.INTERNAL, f"failed to decode response: {exc}")
                )
                continue
            code = response.status.code if response.HasField("status") else 0
            message = response.status.message if response.HasField("status") else ""
            events.append(ResponseReceived(msg.stream_id, response.payload, code, message))
        return events

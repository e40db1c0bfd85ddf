"""Sans-IO codec for the NRI trunk multiplexer (containerd/nri ``pkg/net/multiplex``).

One unix stream socket carries two logical byte streams. Every frame is
``[conn id: u32 BE][payload length: u32 BE][payload]``. Connection 1 carries the plugin service
(the plugin is the ttrpc server), connection 2 the runtime service (the plugin is the client).
There is no handshake and there are no open/close frames.

Nothing here touches a socket: :class:`MuxReader` turns arbitrary byte chunks into
:class:`Frame` values and :func:`encode_message` turns one ttrpc message into frame bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nri_plugin.errors import ProtocolError

HEADER = struct.Struct(">II")
HEADER_SIZE = HEADER.size  # 8

PLUGIN_SERVICE_CONN = 1  # runtime -> plugin calls; we serve
RUNTIME_SERVICE_CONN = 2  # plugin -> runtime calls; we are the client

# A v0.6.1 peer refuses single writes above 16 MiB, so no legitimate frame is larger.
MAX_FRAME_PAYLOAD = 1 << 24

# The Go peer reads each frame with a 4096-byte bufio.Reader buffer when it starts a ttrpc message:
# a first frame above this size kills its connection (ENOMEM).
FIRST_FRAME_MAX = 4096


@dataclass(frozen=True, slots=True)
class Frame:
    conn_id: int
    payload: bytes


class MuxReader:
    """Reassembles mux frames from a byte stream delivered in chunks of any size."""

    __slots__ = ("_buf", "_max_payload")

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max_payload = max_payload

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a whole frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Frame]:
        """Add received bytes; return the frames completed by them, in order.

        Raises ProtocolError for a frame announcing more than ``max_payload`` bytes; the stream
        cannot be resynchronized after that, so the caller must close the connection.
        """
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            conn_id, length = HEADER.unpack_from(buf, pos)
            if length > self._max_payload:
                raise ProtocolError(
                    f"mux frame for connection {conn_id} announces {length} payload bytes, more than "
                    f"the limit of {self._max_payload}; the peer is not speaking the NRI mux protocol"
                )
            if end - pos - HEADER_SIZE < length:
                break
            start = pos + HEADER_SIZE
            frames.append(Frame(conn_id, bytes(buf[start : start + length])))
            pos = start + length
        if pos:
            del buf[:pos]
        return frames


def encode_frame(conn_id: int, payload: bytes) -> bytes:
    """One mux frame carrying ``payload`` on ``conn_id``."""
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ValueError(f"mux frame payload of {len(payload)} bytes exceeds {MAX_FRAME_PAYLOAD}")
    return HEADER.pack(conn_id, len(payload)) + payload


def split_message(message: bytes) -> list[bytes]:
    """Cut one whole ttrpc message into frame payloads exactly like the Go sender.

    Up to 4096 bytes: one frame. Otherwise a first frame of exactly 4096 bytes, then one frame
    with the rest (ttrpc writes through a 4096-byte bufio.Writer and flushes per message).
    """
    if not message:
        raise ValueError("a ttrpc message is never empty (it has a 10-byte header)")
    if len(message) <= FIRST_FRAME_MAX:
        return [message]
    return [message[:FIRST_FRAME_MAX], message[FIRST_FRAME_MAX:]]


def encode_message(conn_id: int, message: bytes) -> bytes:
    """The bytes to write for one ttrpc message on ``conn_id`` (one or two frames)."""
    return b"".join(encode_frame(conn_id, part) for part in split_message(message))

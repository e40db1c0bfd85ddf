"""One unary gRPC call to containerd: ``Snapshots.Mounts`` -> the container's snapshot mounts.

Why not ``grpcio``: the plugin needs exactly this one call, once per GPU container; ``grpcio``
would add a ~10 MB native runtime dependency with its own threads to a daemon whose NRI wire code
is already pure Python. HTTP/2 for a single unary request is small:

* client: the connection preface, an empty SETTINGS frame, one HEADERS frame (HPACK literals
  without indexing and without Huffman coding, which every decoder accepts) and one DATA frame
  (the gRPC length-prefixed ``MountsRequest``) ending the stream;
* server frames are read until stream 1 ends: SETTINGS are acknowledged, PINGs answered, DATA
  collected (bounded by :data:`MAX_RESPONSE`); response headers are not decoded. A gRPC error
  is a response without a message (trailers only), and is reported as such;
* the whole exchange has one deadline (socket timeout).

Messages (containerd ``api/services/snapshots/v1``, ``api/types/mount.proto``), hand-encoded:
``MountsRequest{snapshotter=1, key=2}``, ``MountsResponse{repeated Mount mounts=1}``,
``Mount{type=1, source=2, target=3, repeated options=4}``. The namespace travels as the
``containerd-namespace`` header.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nri_plugin.errors import ImageReadError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
MOUNTS_METHOD = "/containerd.services.snapshots.v1.Snapshots/Mounts"
MAX_RESPONSE = 1 << 20
_DATA, _HEADERS, _RST, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8


MountsFnType = Callable[[str, str, str, str, float], "list[SnapshotMount]"]
"""``snapshot_mounts``'s signature: (address, namespace, snapshotter, key, timeout) -> mounts."""


@dataclass(frozen=True, slots=True)
class SnapshotMount:
    type: str
    source: str
    options: tuple[str, ...]


# --- protobuf, the three fields we need ------------------------------------------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def encode_mounts_request(snapshotter: str, key: str) -> bytes:
    return _field(1, snapshotter.encode()) + _field(2, key.encode())


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ImageReadError("containerd's Mounts response is not valid protobuf")
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(field number, bytes) of every length-delimited field; varint fields are skipped."""
    i = 0
    while i < len(data):
        tag, i = _read_varint(data, i)
        wire = tag & 7
        if wire == 0:
            _, i = _read_varint(data, i)
            continue
        if wire != 2:
            raise ImageReadError(f"containerd's Mounts response has an unexpected wire type {wire}")
        size, i = _read_varint(data, i)
        if i + size > len(data):
            raise ImageReadError("containerd's Mounts response is truncated")
        yield tag >> 3, data[i : i + size]
        i += size


def decode_mounts_response(data: bytes) -> list[SnapshotMount]:
    mounts = []
    for number, body in _fields(data):
        if number != 1:
            continue
        kind = source = ""
        options: list[str] = []
        for sub, value in _fields(body):
            text = value.decode("utf-8", "surrogateescape")
            if sub == 1:
                kind = text
            elif sub == 2:
                source = text
            elif sub == 4:
                options.append(text)
        mounts.append(SnapshotMount(kind, source, tuple(options)))
    return mounts


# --- HTTP/2 -----------------------------------------------------------------------------------


def _hpack_int(value: int, prefix_bits: int = 7) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([value])
    out = bytearray([limit])
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """A header as "literal without indexing, new name", no Huffman coding."""
    n, v = name.encode(), value.encode()
    return b"\x00" + _hpack_int(len(n)) + n + _hpack_int(len(v)) + v


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def request_bytes(path: str, namespace: str, message: bytes) -> bytes:
    """Everything the client sends, in order (the unit tests decode it)."""
    headers = b"".join(
        _literal(k, v)
        for k, v in (
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("containerd-namespace", namespace),
        )
    )
    body = b"\x00" + struct.pack(">I", len(message)) + message
    return (
        PREFACE
        + _frame(_SETTINGS, 0, 0, b"")
        + _frame(_HEADERS, _END_HEADERS, 1, headers)
        + _frame(0, _END_STREAM, 1, body)
    )


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock, self.deadline, self.buf = sock, deadline, b""

    def take(self, n: int) -> bytes:
        while len(self.buf) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ImageReadError("containerd closed the API connection before answering")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


def _strip_padding(flags: int, payload: bytes) -> bytes:
    if flags & _PADDED and payload:
        pad = payload[0]
        return payload[1 : len(payload) - pad] if pad < len(payload) else b""
    return payload


def _exchange(sock: socket.socket, request: bytes, deadline: float) -> bytes:
    sock.sendall(request)
    reader = _Reader(sock, deadline)
    data = b""
    while True:
        head = reader.take(9)
        length = int.from_bytes(head[:3], "big")
        kind, flags = head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        if length > MAX_RESPONSE:
            raise ImageReadError(f"containerd sent a {length}-byte HTTP/2 frame; refusing it")
        payload = reader.take(length)
        if kind == _SETTINGS and not flags & _ACK:
            sock.sendall(_frame(_SETTINGS, _ACK, 0, b""))
        elif kind == _PING and not flags & _ACK:
            sock.sendall(_frame(_PING, _ACK, 0, payload))
        elif kind == _GOAWAY:
            raise ImageReadError("containerd refused the API request (GOAWAY)")
        elif stream == 1 and kind == _RST:
            raise ImageReadError("containerd reset the API request")
        elif stream == 1 and kind == _DATA:
            data += _strip_padding(flags, payload)
            if len(data) > MAX_RESPONSE:
                raise ImageReadError("containerd's Mounts response is too large")
        if stream == 1 and kind in (_DATA, _HEADERS) and flags & _END_STREAM:
            return data


def snapshot_mounts(
    address: str, namespace: str, snapshotter: str, key: str, timeout: float
) -> list[SnapshotMount]:
    """``Snapshots.Mounts(snapshotter, key)`` over containerd's API socket ``address``."""
    deadline = time.monotonic() + timeout
    request = request_bytes(MOUNTS_METHOD, namespace, encode_mounts_request(snapshotter, key))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(address)
            data = _exchange(sock, request, deadline)
    except TimeoutError as exc:
        raise ImageReadError(
            f"containerd's API socket {address!r} did not answer Snapshots.Mounts within {timeout:g} s"
        ) from exc
    except OSError as exc:
        raise ImageReadError(
            f"cannot reach containerd's API socket {address!r} ({exc.strerror or exc}); set "
            "nri-plugin.containerd-socket to containerd's grpc.address"
        ) from exc
    if len(data) < 5:
        raise ImageReadError(
            f"containerd answered Snapshots.Mounts(snapshotter={snapshotter!r}, key={key!r}) with an "
            "error (no such snapshot: is nri-plugin.snapshotter containerd's CRI snapshotter?)"
        )
    if data[0] != 0:
        raise ImageReadError("containerd sent a compressed gRPC message, which was not asked for")
    size = int.from_bytes(data[1:5], "big")
    return decode_mounts_response(data[5 : 5 + size])


def layer_dirs(mounts: list[SnapshotMount]) -> tuple[str, ...]:
    """The image's read-only layer directories, top first, from the snapshot's mounts: an
    overlay's ``lowerdir`` list (the container's own ``upperdir`` is empty at creation and is not
    read), or a bind mount's source (a snapshot without parents)."""
    if len(mounts) != 1:
        raise ImageReadError(f"the snapshot has {len(mounts)} mounts; expected one overlay or bind mount")
    mount = mounts[0]
    if mount.type == "overlay":
        for option in mount.options:
            if option.startswith("lowerdir="):
                dirs = tuple(d for d in option[len("lowerdir=") :].split(":") if d)
                if dirs and all(d.startswith("/") for d in dirs):
                    return dirs
        raise ImageReadError("the snapshot's overlay mount has no usable lowerdir option")
    if mount.type == "bind" and mount.source.startswith("/"):
        return (mount.source,)
    raise ImageReadError(
        f"the snapshot is mounted as {mount.type!r}, which this plugin cannot read; use the overlayfs "
        "or native snapshotter, or set nri-plugin.ldcache=off"
    )

"""systemd ``sd_notify`` over the ``NOTIFY_SOCKET`` datagram socket (``Type=notify`` units).

``NOTIFY_SOCKET`` is a filesystem path (``/run/systemd/notify``) or an abstract socket written with a
leading ``@``. Without the variable (a runtime-launched plugin, a shell) every call is a no-op that
returns False.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def socket_address(value: str) -> str | bytes | None:
    """The ``connect``/``sendto`` address for a ``NOTIFY_SOCKET`` value; None if unsupported."""
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # e.g. "vsock:..." (VMs): not supported here


def format_state(state: Mapping[str, str]) -> bytes:
    for key, val in state.items():
        if not key or "=" in key or "\n" in key or "\n" in val:
            raise ValueError(f"sd_notify field {key!r}={val!r}: no '=' in names, no newline in either")
    return "\n".join(f"{k}={v}" for k, v in state.items()).encode()


def notify(state: Mapping[str, str], environ: Mapping[str, str] | None = None) -> bool:
    """Send one notification. True when it was delivered, False when there is no usable socket."""
    value = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    addr = socket_address(value) if value else None
    if addr is None:
        return False
    data = format_state(state)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto(data, addr)
        except OSError:
            return False
    return True


class Notifier:
    """READY=1 at most once per process, STATUS= as often as wanted."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._environ = {"NOTIFY_SOCKET": env.get("NOTIFY_SOCKET", "")}
        self.ready_sent = False

    @property
    def enabled(self) -> bool:
        return bool(self._environ["NOTIFY_SOCKET"])

    def ready(self, status: str) -> bool:
        if self.ready_sent:
            return self.status(status)
        sent = notify({"READY": "1", "STATUS": status, "MAINPID": str(os.getpid())}, self._environ)
        self.ready_sent = sent or self.ready_sent
        return sent

    def status(self, status: str) -> bool:
        return notify({"STATUS": status}, self._environ)

    def stopping(self, status: str = "stopping") -> bool:
        return notify({"STOPPING": "1", "STATUS": status}, self._environ)

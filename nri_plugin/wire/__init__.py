"""Layer 1: the NRI wire protocol in pure Python (knows nothing about GPUs).

* ``api`` -- the generated NRI protobuf messages (package ``nri.pkg.api.v1alpha1``)
* ``mux`` / ``ttrpc`` -- sans-IO codecs for the trunk multiplexer and ttrpc framing
* ``session`` -- :class:`Session`: the sans-IO trunk for either peer role (bytes in, events out)
* ``connection`` -- asyncio driver of a session over a unix socket
* ``stub`` -- the plugin stub (:class:`Plugin`, :class:`Stub`); its docstring describes the lifecycle
* ``tasks`` -- :class:`TaskScope`, the one pattern for background task lifetimes (also the daemon's)

The public API of the layer is what ``__all__`` lists; code outside ``nri_plugin.wire`` imports
only that (``tests/unit/test_layers.py`` enforces it). The asyncio half (``Connection``, ``Stub``,
``Plugin``, ``TaskScope``) is imported on first use, so that importing the codecs does not import
asyncio.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.session import Event, FrameDropped, Role, Session
from nri_plugin.wire.ttrpc import (
    Code,
    MessageIgnored,
    RequestReceived,
    RequestRejected,
    ResponseReceived,
    RpcError,
)

if TYPE_CHECKING:
    from nri_plugin.wire.connection import Connection, ConnectionClosed
    from nri_plugin.wire.stub import Plugin, Stub, event_bit, event_mask
    from nri_plugin.wire.tasks import TaskScope

__all__ = [
    "Code",
    "Connection",
    "ConnectionClosed",
    "Event",
    "FrameDropped",
    "MessageIgnored",
    "Plugin",
    "RequestReceived",
    "RequestRejected",
    "ResponseReceived",
    "Role",
    "RpcError",
    "Session",
    "Stub",
    "TaskScope",
    "api",
    "event_bit",
    "event_mask",
]

_LAZY = {
    "Connection": "nri_plugin.wire.connection",
    "ConnectionClosed": "nri_plugin.wire.connection",
    "Plugin": "nri_plugin.wire.stub",
    "Stub": "nri_plugin.wire.stub",
    "TaskScope": "nri_plugin.wire.tasks",
    "event_bit": "nri_plugin.wire.stub",
    "event_mask": "nri_plugin.wire.stub",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

"""Layer 1: the NRI wire protocol in pure Python (knows nothing about GPUs).

* ``api`` -- the generated NRI protobuf messages (package ``nri.pkg.api.v1alpha1``)
* ``mux`` / ``ttrpc`` -- sans-IO codecs for the trunk multiplexer and ttrpc framing
* ``connection`` -- asyncio driver of the codecs over a unix socket
* ``stub`` -- the plugin stub (:class:`Plugin`, :class:`Stub`); its docstring describes the lifecycle
"""

from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.connection import Connection, ConnectionClosed
from nri_plugin.wire.stub import Plugin, Stub
from nri_plugin.wire.ttrpc import Code, RpcError

__all__ = ["Code", "Connection", "ConnectionClosed", "Plugin", "RpcError", "Stub", "api"]

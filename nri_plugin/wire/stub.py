"""The NRI plugin stub: registration, configuration, synchronization and event dispatch.

Lifecycle of one connection
---------------------------
1. Socket. A *runtime-launched* plugin (``/opt/nri/plugins/NN-name``) gets a connected socket as
   file descriptor ``NRI_PLUGIN_SOCKET``; an *external* plugin connects to the runtime's socket
   (``/var/run/nri/nri.sock``). :meth:`Stub.from_environment` picks the mode.
2. Serve + register. The stub starts serving mux conn 1 (runtime -> plugin calls) and then calls
   ``Runtime.RegisterPlugin`` on conn 2 (5 s timeout). The runtime may send ``Configure`` before
   its RegisterPlugin reply arrives; that is handled because conn 1 is already being served.
3. Configure. :meth:`Plugin.configure` receives the config string and the runtime identity. The
   reply subscribes to exactly the events whose handlers the Plugin subclass overrides, clipped
   to what the runtime accepts (0x7FF before NRI v0.10; 0x3FFF for NRI >= v0.10, recognized by
   ``ConfigureRequest.NRI_version`` being set or by containerd >= 2.2). The mask is never 0 (0
   would subscribe to everything).
4. Synchronize. Pages with ``more=true`` are answered ``more=true`` without updates and
   collected; :meth:`Plugin.synchronize` runs once over all pages when the last one arrives.
   (A plugin launched by an NRI v0.6 runtime gets no Synchronize; configure ends registration.)
5. Registered. When RegisterPlugin returned OK, Configure and Synchronize succeeded,
   ``Stub.registered`` is set, ``Stub.registrations`` counts up and :meth:`Plugin.on_registered`
   runs in its own task.
6. Events. CreateContainer/UpdateContainer/StopContainer/UpdatePodSandbox/
   ValidateContainerAdjustment have their own RPCs. The other events arrive as ``StateChange``
   (runtimes before NRI v0.12) or as dedicated RPCs (v0.12+): both go to the same handler. A
   dedicated RPC whose handler is not overridden answers Unimplemented (a v0.12 runtime then
   falls back to StateChange). Requests are handled concurrently, each in its own task.
   A handler exception fails that one call: ``rpc error: code = Unknown desc = <message>``.
7. End. The runtime never calls Shutdown; it just closes the socket. On EOF the stub clears
   ``registered`` and calls :meth:`Plugin.on_disconnected`. An external stub reconnects with
   capped exponential backoff (0.1 s doubling to 0.5 s, reset after a successful registration;
   a socket created or replaced meanwhile is dialled at once),
   re-registers and gets a new Configure/Synchronize; a launched stub's ``run()`` returns.

``Stub.stop()`` ends ``run()`` from anywhere in the event loop (e.g. a SIGTERM handler).
The stub never prints: a launched plugin has stdout/stderr on /dev/null; it logs to the logger
it was given.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from nri_plugin.errors import ConfigError
from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.connection import Connection, ConnectionClosed, Handler
from nri_plugin.wire.tasks import TaskScope
from nri_plugin.wire.ttrpc import RpcError

RUNTIME_SERVICE: Final = "nri.pkg.api.v1alpha1.Runtime"
PLUGIN_SERVICE: Final = "nri.pkg.api.v1alpha1.Plugin"
DEFAULT_SOCKET_PATH: Final = "/var/run/nri/nri.sock"
REGISTRATION_TIMEOUT: Final = 5.0
BACKOFF_INITIAL: Final = 0.1
# Capped low: while the plugin is not registered, containerd creates GPU containers without GPUs.
BACKOFF_MAX: Final = 0.5
# While waiting to re-dial, the socket path is polled this often: a (re)created socket is dialled
# at once instead of at the end of the backoff.
SOCKET_POLL: Final = 0.02

VALID_EVENTS_BEFORE_V0_10: Final = 0x7FF  # NRI v0.6.1 - v0.9.x: events 1..11
VALID_EVENTS_V0_10: Final = 0x3FFF  # NRI >= v0.10: events 1..14

_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+", re.ASCII)
_INDEX_RE = re.compile(r"[0-9]{2}", re.ASCII)


def event_bit(event: int) -> int:
    return 1 << (event - 1)


class Plugin:
    """Base class of NRI plugins: subclass it and override only the handlers you need.

    Every handler is a coroutine. The subscription mask follows from which event handlers are
    overridden. Raising fails that one call (a ContainerError's message reaches the CRI caller
    verbatim); raising ``ttrpc.RpcError`` picks the status code.
    """

    async def configure(self, config: str, runtime_name: str, runtime_version: str) -> None:
        return None

    async def synchronize(
        self, pods: list[api.PodSandbox], containers: list[api.Container]
    ) -> list[api.ContainerUpdate]:
        return []

    # --- events with their own RPC in every NRI version (reply carries data) ---

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        return api.CreateContainerResponse()

    async def update_container(
        self, pod: api.PodSandbox, container: api.Container, resources: api.LinuxResources
    ) -> api.UpdateContainerResponse:
        return api.UpdateContainerResponse()

    async def stop_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.StopContainerResponse:
        return api.StopContainerResponse()

    # --- NRI >= v0.10 only (never subscribed against an older runtime) ---

    async def update_pod_sandbox(
        self, pod: api.PodSandbox, overhead: api.LinuxResources, resources: api.LinuxResources
    ) -> None:
        return None

    async def validate_container_adjustment(
        self, request: api.ValidateContainerAdjustmentRequest
    ) -> api.ValidateContainerAdjustmentResponse:
        return api.ValidateContainerAdjustmentResponse()

    # --- notifications (StateChange before v0.12, dedicated RPCs from v0.12) ---

    async def run_pod_sandbox(self, pod: api.PodSandbox) -> None:
        return None

    async def stop_pod_sandbox(self, pod: api.PodSandbox) -> None:
        return None

    async def remove_pod_sandbox(self, pod: api.PodSandbox) -> None:
        return None

    async def post_update_pod_sandbox(self, pod: api.PodSandbox) -> None:  # NRI >= v0.10
        return None

    async def post_create_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        return None

    async def start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        return None

    async def post_start_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        return None

    async def post_update_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        return None

    async def remove_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        return None

    # --- connection state ---

    async def on_registered(self) -> None:
        """Registration completed (Configure + Synchronize, or Configure for v0.6 launched plugins)."""
        return None

    async def on_disconnected(self) -> None:
        """The connection of a registered plugin ended (called once per on_registered)."""
        return None


@dataclass(frozen=True, slots=True)
class EventRpc:
    """One row of the event table: everything the stub derives about one NRI event.

    ``handler`` is the :class:`Plugin` method; the subscription bit is ``event_bit(event)``;
    the runtime calls the dedicated RPC ``rpc`` with a ``request`` message whose fields ``args``
    picks out for the handler; ``respond`` turns the handler's result into the response bytes.
    ``notification`` events reach plugins of runtimes before NRI v0.12 as ``StateChange``.
    """

    handler: str
    event: int
    rpc: str
    request: type[Any]
    args: Callable[[Any], tuple[Any, ...]]
    respond: Callable[[Any], bytes] = lambda _: b""  # every notification's response is empty
    notification: bool = False


def _serialized(response: Any) -> bytes:
    return bytes(response.SerializeToString())


def _pod(req: Any) -> tuple[Any, ...]:
    return (req.pod,)


def _pod_container(req: Any) -> tuple[Any, ...]:
    return (req.pod, req.container)


_UPDATE_POD_SANDBOX_RESPONSE = api.UpdatePodSandboxResponse().SerializeToString()

EVENTS: Final[tuple[EventRpc, ...]] = (
    EventRpc("create_container", api.CREATE_CONTAINER, "CreateContainer", api.CreateContainerRequest,
             _pod_container, _serialized),
    EventRpc("update_container", api.UPDATE_CONTAINER, "UpdateContainer", api.UpdateContainerRequest,
             lambda r: (r.pod, r.container, r.linux_resources), _serialized),
    EventRpc("stop_container", api.STOP_CONTAINER, "StopContainer", api.StopContainerRequest,
             _pod_container, _serialized),
    EventRpc("update_pod_sandbox", api.UPDATE_POD_SANDBOX, "UpdatePodSandbox", api.UpdatePodSandboxRequest,
             lambda r: (r.pod, r.overhead_linux_resources, r.linux_resources),
             lambda _: _UPDATE_POD_SANDBOX_RESPONSE),
    EventRpc("validate_container_adjustment", api.VALIDATE_CONTAINER_ADJUSTMENT,
             "ValidateContainerAdjustment", api.ValidateContainerAdjustmentRequest,
             lambda r: (r,), _serialized),
    # notifications: StateChange before NRI v0.12, dedicated RPCs with empty responses from v0.12
    EventRpc("run_pod_sandbox", api.RUN_POD_SANDBOX, "RunPodSandbox", api.RunPodSandboxRequest,
             _pod, notification=True),
    EventRpc("stop_pod_sandbox", api.STOP_POD_SANDBOX, "StopPodSandbox", api.StopPodSandboxRequest,
             _pod, notification=True),
    EventRpc("remove_pod_sandbox", api.REMOVE_POD_SANDBOX, "RemovePodSandbox", api.RemovePodSandboxRequest,
             _pod, notification=True),
    EventRpc("post_update_pod_sandbox", api.POST_UPDATE_POD_SANDBOX, "PostUpdatePodSandbox",
             api.PostUpdatePodSandboxRequest, _pod, notification=True),
    EventRpc("post_create_container", api.POST_CREATE_CONTAINER, "PostCreateContainer",
             api.PostCreateContainerRequest, _pod_container, notification=True),
    EventRpc("start_container", api.START_CONTAINER, "StartContainer", api.StartContainerRequest,
             _pod_container, notification=True),
    EventRpc("post_start_container", api.POST_START_CONTAINER, "PostStartContainer",
             api.PostStartContainerRequest, _pod_container, notification=True),
    EventRpc("post_update_container", api.POST_UPDATE_CONTAINER, "PostUpdateContainer",
             api.PostUpdateContainerRequest, _pod_container, notification=True),
    EventRpc("remove_container", api.REMOVE_CONTAINER, "RemoveContainer", api.RemoveContainerRequest,
             _pod_container, notification=True),
)  # fmt: skip
_BY_EVENT: Final = {row.event: row for row in EVENTS}
EVENT_HANDLERS: Final = tuple(row.handler for row in EVENTS)


def overridden_handlers(plugin: Plugin) -> frozenset[str]:
    """Names of the event handlers ``plugin``'s class overrides."""
    cls = type(plugin)
    return frozenset(name for name in EVENT_HANDLERS if getattr(cls, name) is not getattr(Plugin, name))


def event_mask(plugin: Plugin) -> int:
    """The subscription mask implied by the overridden event handlers."""
    overridden = overridden_handlers(plugin)
    mask = 0
    for row in EVENTS:
        if row.handler in overridden:
            mask |= event_bit(row.event)
    return mask


def _version_tuple(text: str) -> tuple[int, int] | None:
    match = re.match(r"v?(\d+)\.(\d+)", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


def runtime_valid_events(req: api.ConfigureRequest) -> int:
    """The events the configuring runtime accepts in ConfigureResponse."""
    if req.NRI_version:  # field 6 exists only from NRI v0.12
        return VALID_EVENTS_V0_10
    version = _version_tuple(req.runtime_version)
    if req.runtime_name == "containerd" and version is not None and version >= (2, 2):
        return VALID_EVENTS_V0_10  # containerd 2.2 uses NRI v0.10/v0.11
    return VALID_EVENTS_BEFORE_V0_10


def _is_nri_v0_6_runtime(req: api.ConfigureRequest) -> bool:
    # registration_timeout/request_timeout (fields 4, 5) are sent from NRI v0.7 on.
    return req.registration_timeout == 0 and req.request_timeout == 0 and not req.NRI_version


class Phase(enum.Enum):
    """Registration phase of one connection (see the transition table below)."""

    STARTED = "started"  # connected, RegisterPlugin sent
    REPLIED = "replied"  # RegisterPlugin answered OK, no Configure yet
    CONFIGURED = "configured"  # Configure done, RegisterPlugin not answered yet
    SYNCING = "syncing"  # answered and configured: waiting for the last Synchronize page
    SYNCED = "synced"  # configured and synchronized (or none due), RegisterPlugin not answered yet
    REGISTERED = "registered"


class Step(enum.Enum):
    REPLY = "RegisterPlugin answered OK"
    CONFIGURE = "Configure done (Synchronize follows)"
    CONFIGURE_ONLY = "Configure done (NRI v0.6 launched plugin: no Synchronize)"
    SYNCHRONIZE = "last Synchronize page done"


# Theory of operation: containerd answers RegisterPlugin, calls Configure and then Synchronize,
# but Configure (and even Synchronize) may arrive before the RegisterPlugin answer, since conn 1
# is served while the call on conn 2 is in flight. The plugin is registered once all three
# happened, in any of these orders. Pairs not in the table leave the phase unchanged (a repeated
# step, or a step after registration).
TRANSITIONS: Final[Mapping[tuple[Phase, Step], Phase]] = MappingProxyType(
    {
        (Phase.STARTED, Step.REPLY): Phase.REPLIED,
        (Phase.STARTED, Step.CONFIGURE): Phase.CONFIGURED,
        (Phase.STARTED, Step.CONFIGURE_ONLY): Phase.SYNCED,
        (Phase.REPLIED, Step.CONFIGURE): Phase.SYNCING,
        (Phase.REPLIED, Step.CONFIGURE_ONLY): Phase.REGISTERED,
        (Phase.CONFIGURED, Step.REPLY): Phase.SYNCING,
        (Phase.CONFIGURED, Step.SYNCHRONIZE): Phase.SYNCED,
        (Phase.SYNCING, Step.SYNCHRONIZE): Phase.REGISTERED,
        (Phase.SYNCED, Step.REPLY): Phase.REGISTERED,
    }
)


@dataclass
class _Session:
    """State of one connection."""

    tasks: TaskScope
    phase: Phase = Phase.STARTED
    sync_pods: list[api.PodSandbox] = field(default_factory=list)
    sync_containers: list[api.Container] = field(default_factory=list)

    @property
    def registered(self) -> bool:
        return self.phase is Phase.REGISTERED


class Stub:
    def __init__(
        self,
        plugin: Plugin,
        *,
        name: str,
        index: str,
        socket_path: str = DEFAULT_SOCKET_PATH,
        reconnect: bool = True,
        logger: logging.Logger | None = None,
        socket_fd: int | None = None,
    ) -> None:
        """``socket_fd``: an already connected socket (runtime-launched mode); else connect to
        ``socket_path``. Raises ConfigError for a bad name/index or a plugin without events."""
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(
                f"NRI plugin name {name!r} is invalid: use only letters, digits and '_', '.', '+', '-' "
                "(containerd NRI >= v0.12 rejects other characters)"
            )
        if not _INDEX_RE.fullmatch(index):
            raise ConfigError(
                f"NRI plugin index {index!r} is invalid: it must be exactly two digits, e.g. '10'"
            )
        mask = event_mask(plugin)
        if mask == 0:
            raise ConfigError(
                f"NRI plugin class {type(plugin).__name__} overrides no event handler, so it would "
                f"subscribe to no event: override at least one of {', '.join(EVENT_HANDLERS)}"
            )
        self.plugin = plugin
        self.name = name
        self.index = index
        self.socket_path = socket_path
        self.reconnect = reconnect
        self.log = logger or logging.getLogger("nri_plugin.wire.stub")
        self._socket_fd = socket_fd
        self.launched = socket_fd is not None
        self.events = mask
        self.registered = asyncio.Event()
        self.runtime_name = ""
        self.runtime_version = ""
        self.config = ""
        self.registrations = 0
        self.reconnects = 0
        self._subscribed = 0  # the mask last sent in ConfigureResponse
        self._stop = asyncio.Event()
        self._conn: Connection | None = None

    @classmethod
    def from_environment(
        cls,
        plugin: Plugin,
        *,
        name: str,
        index: str,
        socket_path: str = DEFAULT_SOCKET_PATH,
        logger: logging.Logger | None = None,
    ) -> Stub:
        """Runtime-launched when NRI_PLUGIN_SOCKET is set (name/index from NRI_PLUGIN_NAME/IDX
        when set), otherwise an external plugin connecting to ``socket_path``."""
        fd_text = os.environ.get("NRI_PLUGIN_SOCKET")
        if fd_text is None:
            return cls(plugin, name=name, index=index, socket_path=socket_path, logger=logger)
        try:
            fd = int(fd_text)
            if fd < 0:
                raise ValueError(fd_text)
        except ValueError:
            raise ConfigError(
                f"NRI_PLUGIN_SOCKET={fd_text!r} is not a file descriptor number; it is set by the runtime "
                "when it launches the plugin, unset it to run as an external plugin"
            ) from None
        return cls(
            plugin,
            name=os.environ.get("NRI_PLUGIN_NAME") or name,
            index=os.environ.get("NRI_PLUGIN_IDX") or index,
            socket_path=socket_path,
            reconnect=False,
            logger=logger,
            socket_fd=fd,
        )

    @property
    def ident(self) -> str:
        return f"{self.index}-{self.name}"

    # --- running -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask ``run()`` to close the connection and return (safe to call more than once)."""
        self._stop.set()

    async def run(self) -> None:
        """Serve until stop(); an external stub reconnects after EOF (when ``reconnect``)."""
        backoff = BACKOFF_INITIAL
        first = True
        while not self._stop.is_set():
            try:
                sock = self._open_socket()
            except OSError as exc:
                raise ConfigError(
                    f"NRI_PLUGIN_SOCKET={self._socket_fd} is not a usable socket ({exc}); "
                    "it is only valid in a process the runtime launched"
                    if self.launched
                    else f"cannot create a unix socket for {self.socket_path}: {exc}"
                ) from exc
            try:
                if not self.launched:
                    await asyncio.get_running_loop().sock_connect(sock, self.socket_path)
            except OSError as exc:
                self.log.warning(
                    "nri: cannot connect to %s: %s; retrying in %.1f s", self.socket_path, exc, backoff
                )
                sock.close()
                if not self.reconnect:
                    return
                await self._wait_for_socket(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if not first:
                self.reconnects += 1
            first = False
            registered = await self._session(sock)
            if self.launched or not self.reconnect or self._stop.is_set():
                return
            if registered:
                backoff = BACKOFF_INITIAL
            await self._wait_for_socket(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _open_socket(self) -> socket.socket:
        if self._socket_fd is not None:
            return socket.socket(fileno=self._socket_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    def _socket_key(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.socket_path)
        except OSError:
            return None
        return (st.st_ino, st.st_ctime_ns)

    async def _wait_for_socket(self, seconds: float) -> None:
        """Sleep up to ``seconds`` (or until stop()), waking early when the socket path is
        created or replaced -- containerd listening again after a restart."""
        before = self._socket_key()
        deadline = asyncio.get_running_loop().time() + seconds
        while not self._stop.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await self._sleep(min(left, SOCKET_POLL))
            now = self._socket_key()
            if now is not None and now != before:
                return

    async def _sleep(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            pass

    async def _session(self, sock: socket.socket) -> bool:
        """Run one connection to its end; returns whether it got registered."""
        session = _Session(TaskScope("nri stub", self.log))
        conn = Connection(sock, self._handlers(session), logger=self.log)
        self._conn = conn
        try:
            await conn.open()
        except OSError as exc:
            self.log.warning("nri: cannot use the connection: %s", exc)
            sock.close()
            return False
        tasks = session.tasks
        serve = tasks.spawn(conn.serve(), name="nri-serve")
        stopper = tasks.spawn(self._stop.wait(), name="nri-stop")
        tasks.spawn(self._register(conn, session), name="nri-register")
        try:
            await asyncio.wait({serve, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not serve.done():
                await conn.close("plugin stopped")
            reason = await serve
        finally:
            self._conn = None
            await tasks.aclose()  # the register call, a pending on_registered, the stop watcher
        self.log.info("nri: connection to the runtime ended: %s", reason)
        if session.registered:
            self.registered.clear()
            try:
                await self.plugin.on_disconnected()
            except Exception:
                self.log.exception("nri: on_disconnected failed")
        return session.registered

    async def _register(self, conn: Connection, session: _Session) -> None:
        req = api.RegisterPluginRequest(plugin_name=self.name, plugin_idx=self.index)
        self.log.info("nri: registering plugin %s", self.ident)
        try:
            await conn.call(RUNTIME_SERVICE, "RegisterPlugin", req.SerializeToString(), REGISTRATION_TIMEOUT)
        except (RpcError, ConnectionClosed) as exc:
            if self._stop.is_set():  # stop() closed the connection under us: not a failure
                self.log.info("nri: registration of plugin %s abandoned: stopping", self.ident)
                return
            self.log.error("nri: registration of plugin %s failed: %s", self.ident, exc)
            await conn.close(f"registration failed: {exc}")
            return
        self._advance(session, Step.REPLY)

    def _advance(self, session: _Session, step: Step) -> None:
        """Apply one registration step (``TRANSITIONS``); act on reaching REGISTERED."""
        before = session.phase
        session.phase = TRANSITIONS.get((before, step), before)
        if session.phase is not Phase.REGISTERED or before is Phase.REGISTERED:
            return
        self.registrations += 1
        self.registered.set()
        self.log.info(
            "nri: plugin %s registered with %s %s (events 0x%x)",
            self.ident,
            self.runtime_name,
            self.runtime_version,
            self._subscribed,
        )
        session.tasks.spawn(self._call_on_registered(), name="nri-on-registered")

    async def _call_on_registered(self) -> None:
        try:
            await self.plugin.on_registered()
        except Exception:
            self.log.exception("nri: on_registered failed")

    async def update_containers(
        self, updates: list[api.ContainerUpdate], evictions: list[api.ContainerEviction] | None = None
    ) -> list[api.ContainerUpdate]:
        """Unsolicited container updates; returns the ones that failed. Do not await this from
        inside an event handler: the runtime holds its lock during the event (deadlock)."""
        conn = self._conn
        if conn is None or not self.registered.is_set():
            raise ConnectionClosed("UpdateContainers needs a registered NRI connection")
        req = api.UpdateContainersRequest(update=updates, evict=evictions or [])
        payload = await conn.call(RUNTIME_SERVICE, "UpdateContainers", req.SerializeToString(), 5.0)
        return list(api.UpdateContainersResponse.FromString(payload).failed)

    # --- request handlers --------------------------------------------------------------------

    def _handlers(self, session: _Session) -> dict[tuple[str, str], Handler]:
        """The dispatch table of one connection: the registration RPCs, ``StateChange``, and one
        entry per overridden event handler, all derived from :data:`EVENTS`."""
        plugin = self.plugin
        overridden = overridden_handlers(plugin)
        collect_sync = type(plugin).synchronize is not Plugin.synchronize

        async def configure(payload: bytes) -> bytes:
            req = api.ConfigureRequest.FromString(payload)
            self.config = req.config
            self.runtime_name = req.runtime_name
            self.runtime_version = req.runtime_version
            await plugin.configure(req.config, req.runtime_name, req.runtime_version)
            accepted = runtime_valid_events(req)
            events = self.events & accepted
            if events != self.events:
                self.log.warning(
                    "nri: runtime %s %s does not support events 0x%x; not subscribing to them",
                    req.runtime_name,
                    req.runtime_version,
                    self.events & ~accepted,
                )
            if events == 0:
                raise ConfigError(
                    f"plugin {self.ident} handles only events 0x{self.events:x}, none of which runtime "
                    f"{req.runtime_name} {req.runtime_version} supports (it accepts 0x{accepted:x}); "
                    "upgrade the runtime or override an older event handler"
                )
            self._subscribed = events
            no_sync = self.launched and _is_nri_v0_6_runtime(req)
            self._advance(session, Step.CONFIGURE_ONLY if no_sync else Step.CONFIGURE)
            return api.ConfigureResponse(events=events).SerializeToString()

        async def synchronize(payload: bytes) -> bytes:
            req = api.SynchronizeRequest.FromString(payload)
            if req.more:
                if collect_sync:
                    session.sync_pods.extend(req.pods)
                    session.sync_containers.extend(req.containers)
                return api.SynchronizeResponse(more=True).SerializeToString()
            pods = [*session.sync_pods, *req.pods]
            containers = [*session.sync_containers, *req.containers]
            session.sync_pods, session.sync_containers = [], []
            updates = await plugin.synchronize(pods, containers)
            self._advance(session, Step.SYNCHRONIZE)
            return api.SynchronizeResponse(update=updates, more=False).SerializeToString()

        async def shutdown(payload: bytes) -> bytes:
            return api.Empty().SerializeToString()

        async def state_change(payload: bytes) -> bytes:
            req = api.StateChangeEvent.FromString(payload)
            row = _BY_EVENT.get(req.event)
            if row is not None and row.notification and row.handler in overridden:
                await getattr(plugin, row.handler)(*row.args(req))  # StateChangeEvent: pod, container
            return _EMPTY

        table: dict[str, Handler] = {
            "Configure": configure,
            "Synchronize": synchronize,
            "Shutdown": shutdown,
            "StateChange": state_change,
        }
        for row in EVENTS:
            if row.handler in overridden:
                table[row.rpc] = _event_handler(getattr(plugin, row.handler), row)
        return {(PLUGIN_SERVICE, method): handler for method, handler in table.items()}


_EMPTY: Final = api.Empty().SerializeToString()


def _event_handler(method: Callable[..., Awaitable[Any]], row: EventRpc) -> Handler:
    """The RPC handler of one event: decode the request, call the plugin, encode the answer."""

    async def handle(payload: bytes) -> bytes:
        req = row.request.FromString(payload)
        return row.respond(await method(*row.args(req)))

    return handle

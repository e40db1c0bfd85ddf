"""The glue between the NRI stub (layer 1) and the GPU logic (layers 2-4).

``GpuPlugin.create_container`` is the hot path: NRI ``Container`` -> the hook's inputs -> the
decision over the cached host driver snapshot -> the protobuf adjustment. Nothing on this path reads
the host or logs at info level for containers that ask for no GPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nri_plugin import config as cfg
from nri_plugin import logs, resync
from nri_plugin import metrics as metrics_mod
from nri_plugin.adjust import EMPTY_SELECTION, Decision, compat_enabled, decide
from nri_plugin.config import Effect, Layer, Settings
from nri_plugin.errors import ConfigError, ContainerError, DriverChangedError
from nri_plugin.health import Readiness
from nri_plugin.host import HostDriver
from nri_plugin.image import LoaderConfig, LoaderOutcome, LoaderService, MountsFn
from nri_plugin.notify import Notifier
from nri_plugin.request import container_annotations, device_paths, request_inputs
from nri_plugin.wire import Plugin, TaskScope, api

# How long a CreateContainer that found a changed driver waits for the rediscovery (containerd
# gives a plugin 2 s per call; discovery without a hanging NVML takes tens of milliseconds).
REDISCOVER_BUDGET_S = 1.0


class InternalError(ContainerError):
    """A bug on the CreateContainer path: fails that container, never the daemon."""


# Unsolicited NRI updates/evictions (``Stub.update_containers``): set by cli.run once the stub exists.
Updater = Callable[
    [list[api.ContainerUpdate], list[api.ContainerEviction]], Awaitable[list[api.ContainerUpdate]]
]


@dataclass(frozen=True, slots=True)
class Unadjusted:
    """A container found at Synchronize that asks for GPUs but has none (see ``nri_plugin.resync``)."""

    container_id: str
    pid: int
    who: dict[str, str]
    verdict: resync.Verdict


def make_driver(settings: Settings) -> HostDriver:
    """A HostDriver for ``settings`` (no discovery yet)."""
    return HostDriver(settings.roots, **discover_kwargs(settings))


def discover_kwargs(settings: Settings) -> dict[str, Any]:
    return {
        "ldcache_path": settings.ldcache_path,
        "use_nvml": settings.use_nvml,
        "nvml_timeout": settings.nvml_timeout,
        "mps_pipe_dir": settings.mps_pipe_dir,
    }


LIBCUDA_ENV_PREFIXES = ("NVIDIA_CTK_LIBCUDA_DIR=", "TRITON_LIBCUDA_PATH=")
# Past the image read's own budget, how long CreateContainer still waits for the worker thread.
LOADER_GRACE_S = 0.25


def loader_config(settings: Settings) -> LoaderConfig:
    """The container-ldcache settings as the loader service's config."""
    return LoaderConfig(
        enabled=settings.container_ldcache != "off",
        state_dir=settings.runtime_dir,
        containerd_socket=settings.containerd_socket,
        namespace=settings.containerd_namespace,
        snapshotter=settings.snapshotter,
        timeout=settings.image_read_timeout,
        compat=compat_enabled(settings.cuda_compat_mode, settings.allow_cuda_compat_libs_from_container),
        read_root=settings.host_root,
    )


def make_sink(settings: Settings, launched: bool) -> logs.Sink:
    if launched:
        return logs.launched_sink(settings.log_file, settings.log_format)
    return logs.default_sink(settings.log_file, settings.log_format)


class GpuPlugin(Plugin):
    """Answers CreateContainer with the GPU adjustment; everything else is left to the runtime."""

    def __init__(
        self,
        *,
        file_layer: Layer,
        flag_layer: Layer,
        logger: logs.Logger,
        driver: HostDriver | None = None,
        metrics: metrics_mod.Metrics | None = None,
        notifier: Notifier | None = None,
        launched: bool = False,
        driver_factory: Callable[[Settings], HostDriver] = make_driver,
        stub_counts: Callable[[], metrics_mod.StubCounts] = metrics_mod.StubCounts,
        mounts_fn: MountsFn | None = None,
        state_dir: str | None = None,
    ) -> None:
        """``state_dir``: where the first-registered record lives (None: in memory only, for tests
        and dry runs -- then the first Synchronize of this object is the boundary)."""
        super().__init__()
        self._file_layer = file_layer
        self._flag_layer = flag_layer
        self.settings = cfg.build(file_layer, flag_layer)
        self.log = logger
        self.launched = launched
        self._driver_factory = driver_factory
        self.driver = driver if driver is not None else driver_factory(self.settings)
        self.metrics: metrics_mod.Metrics = metrics if metrics is not None else metrics_mod.NullMetrics()
        self.notifier = notifier if notifier is not None else Notifier({})
        self._stub_counts = stub_counts
        # Every background task (driver watch, deferred Synchronize report, evictions) belongs to
        # this scope: close() cancels and awaits them all; the handles below are kept to replace
        # one kind of task by a newer one (a restarted watch, a later Synchronize).
        self._tasks = TaskScope("gpu plugin", logging.getLogger(__name__))
        self._watch_task: asyncio.Task[None] | None = None
        self._deferred_report: asyncio.Task[None] | None = None
        self.runtime = ""
        self._mounts_fn = mounts_fn
        self.loader = self._make_loader(self.settings)
        self._warned: set[str] = set()
        self._state_dir = state_dir
        self._first_ns: int | None = None
        self._first_error = ""
        self.updater: Updater | None = None
        self._evictable: list[Unadjusted] = []
        self._evict_task: asyncio.Task[None] | None = None

    def _make_loader(self, settings: Settings) -> LoaderService:
        if self._mounts_fn is None:
            return LoaderService(loader_config(settings))
        return LoaderService(loader_config(settings), mounts_fn=self._mounts_fn)

    # -- lifecycle (called by cli.run) ---------------------------------------------------------

    async def discover(self, budget: float | None = None) -> None:
        """Initial discovery, in a worker thread. A failure is logged; only GPU containers will fail.

        ``budget`` (seconds) bounds the wait for a runtime-launched plugin, whose registration timer
        is already running: past it we register anyway and the discovery finishes in the background.
        """
        t0 = time.perf_counter()
        task = self.driver.start_refresh()

        def report(_: object = None) -> None:
            if not task.cancelled() and task.exception() is not None:
                exc = task.exception()
                assert exc is not None
                self.log.exception("host driver discovery failed", exc)
            self._log_snapshot("host driver discovered", (time.perf_counter() - t0) * 1000)

        try:
            # shielded: the refresh is shared (HostDriver.start_refresh); our cancellation is not its
            await (asyncio.shield(task) if budget is None else asyncio.wait_for(asyncio.shield(task), budget))
        except TimeoutError:
            self.log.warning(
                "host driver discovery is still running; registering anyway, GPU containers "
                "fail until it completes",
                budget_s=budget,
            )
            task.add_done_callback(report)
            return
        except Exception:
            pass  # reported below
        report()

    def _log_snapshot(self, msg: str, ms: float) -> None:
        snap = self.driver.snapshot()
        if snap is None:
            self.log.warning(
                "no usable NVIDIA driver: GPU containers will fail until one is found",
                error=self.driver.last_error or self.driver.no_driver_reason or "",
                ms=round(ms, 1),
            )
            return
        self.log.info(
            msg,
            driver_version=snap.driver_version,
            cuda_version=snap.cuda_version or "",
            source=snap.source,
            gpus=[g.uuid for g in snap.gpus],
            mig_devices=sum(len(g.mig_devices) for g in snap.gpus),
            missing=len(snap.missing),
            ms=round(ms, 1),
        )
        for note in snap.missing:
            if note.startswith("refused"):  # present but unsafe to mount: the operator must know
                self.log.warning("host driver: refused", note=note)
            else:
                self.log.debug("host driver: not found", note=note)

    def start_background(self) -> None:
        """Start the driver watch and (if configured) the metrics endpoint; needs a running loop."""
        self._start_watch()
        self._ensure_metrics()
        self._prepare_state()

    def _prepare_state(self) -> None:
        if not self.loader.config.enabled:
            return
        try:
            self.loader.store.prepare()
        except OSError as e:
            self.log.error(
                "cannot create the state directory; GPU containers keep their image's ld.so.cache "
                "(fix nri-plugin.runtime-dir)",
                state_dir=self.loader.config.state_dir,
                error=str(e),
            )

    def _start_watch(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._watch_task = self._tasks.spawn(
            self.driver.watch(self.settings.refresh_interval), name="driver-watch"
        )

    def _ensure_metrics(self) -> None:
        address = self.settings.metrics_address
        if self.metrics.address == address:
            return
        self.metrics.close()
        self.metrics = metrics_mod.NullMetrics()
        if not address:
            return
        try:
            self.metrics = metrics_mod.create(
                address, stub_counts=self._stub_counts, snapshot=lambda: self.driver.snapshot()
            )
        except (OSError, ValueError) as e:
            self.log.error(
                "metrics endpoint not started; fix nri-plugin.metrics-address",
                metrics_address=address,
                error=str(e),
            )
            return
        self.log.info("metrics endpoint listening", metrics_address=address, listening=self.metrics.listening)

    async def close(self) -> None:
        await self._tasks.aclose()
        self._watch_task = None
        self.metrics.close()

    def readiness(self) -> Readiness:
        """Ready = registered with the runtime and a driver snapshot exists (``/readyz``)."""
        counts = self._stub_counts()
        if not counts.registered:
            return Readiness(
                False,
                "not registered with the runtime ("
                + ("reconnecting" if counts.registrations else "connecting")
                + f" to {self.settings.socket_path}); new containers get no GPUs",
            )
        if self.driver.snapshot() is None:
            why = (
                "discovery in progress"
                if self.driver.pending
                else (self.driver.last_error or self.driver.no_driver_reason or "no driver found")
            )
            return Readiness(False, f"registered, but no NVIDIA driver snapshot: {why}")
        return Readiness(True, "ready: registered and injecting")

    # -- NRI handlers --------------------------------------------------------------------------

    async def configure(self, config: str, runtime_name: str, runtime_version: str) -> None:
        self.runtime = f"{runtime_name} {runtime_version}".strip()
        try:
            nri_layer = cfg.parse_toml(config, "NRI config") if config.strip() else Layer("NRI config")
            new = cfg.build(self._file_layer, nri_layer, self._flag_layer)
        except ConfigError as e:
            # The runtime drops the plugin (and kills a launched one): say so where it will be seen.
            self.log.error(
                "NRI config rejected; the runtime will drop this plugin", error=str(e), runtime=self.runtime
            )
            raise
        for warning in nri_layer.warnings:  # the file layer's were logged at start-up (cli.run)
            if warning not in self._warned:  # Configure comes again at every reconnect: once only
                self._warned.add(warning)
                self.log.warning("toolkit configuration not applied", detail=warning)
        if nri_layer.ignored:  # the file layer's were logged once at start-up (cli.run)
            self.log.debug(
                "ignoring toolkit keys this plugin does not use",
                source=nri_layer.source,
                keys=list(nri_layer.ignored),
            )
        await self.apply(new)
        self.log.info(
            "configured",
            runtime=self.runtime,
            config_bytes=len(config),
            settings_from=cfg.provenance(self._file_layer, nri_layer, self._flag_layer),
        )

    async def apply(self, new: Settings) -> None:
        """Switch to new settings, rebuilding only what the changed ones need (``Setting.effect``)."""
        old, self.settings = self.settings, new
        changes = old.changes(new)
        if changes.get(Effect.LOGGING):
            if (old.log_file, old.log_format) != (new.log_file, new.log_format):
                self.log.reconfigure(sink=make_sink(new, self.launched))
            if old.log_level != new.log_level:
                self.log.reconfigure(level=logs.parse_level(new.log_level))
                logs.sync_bridge_level(self.log)
        for attr in changes.get(Effect.RESTART, ()):
            self.log.warning(
                "setting takes effect at the next start only",
                setting=attr,
                running=getattr(old, attr),
                configured=getattr(new, attr),
            )
        if changes.get(Effect.DISCOVERY):
            self.driver = self._driver_factory(new)
            self.log.info("driver settings changed; rediscovering", roots=str(new.roots))
            await self.discover(budget=1.5)  # Configure must answer within the runtime's 2 s
            if self._watch_task is not None:
                self._start_watch()
        elif changes.get(Effect.WATCH) and self._watch_task is not None:
            self._start_watch()
        if self._watch_task is not None or self.metrics.address:
            self._ensure_metrics()
        # Decided by the loader's config itself, not by the LOADER effect of what changed: two
        # loader settings can change without changing it (cuda-compat-mode ldconfig -> mount both
        # mean compat on), and then the service and its memos stay. The declarations are kept
        # honest by a test (test_config: what changes loader_config is declared LOADER).
        if loader_config(new) != self.loader.config:
            self.loader = self._make_loader(new)
            if self._watch_task is not None:
                self._prepare_state()

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        t0 = time.perf_counter()
        try:
            env, mounts, privileged = request_inputs(container)
            hook = self.settings.hook
            annotations = container_annotations(container) if hook.accept_cdi_annotations else None
            driver = self.driver

            def decide_now() -> Decision:  # on the driver's current state
                return decide(
                    env,
                    mounts,
                    privileged,
                    hook,
                    driver.snapshot(),
                    discovery_pending=driver.pending,
                    discovery_error=driver.discovery_error,
                    annotations=annotations,
                    device_paths=device_paths(container),  # lazy: read only for GPU requests
                )

            try:
                decision = decide_now()
            except DriverChangedError as changed:
                # A mount source is not what discovery pinned: an in-place driver upgrade or a
                # swapped file. Rediscover at once (bounded: containerd waits 2 s for us) and decide
                # again on the new snapshot; a still-changed or slow host fails this container.
                self.log.warning("host driver changed under a snapshot; rediscovering", error=str(changed))
                if not await driver.refresh_soon(REDISCOVER_BUDGET_S):
                    raise
                self._log_snapshot("host driver rediscovered", (time.perf_counter() - t0) * 1000)
                decision = decide_now()
            for warning in decision.warnings:
                self.log.warning("GPU request warning", **_who(pod, container), detail=warning)
            if decision.left_alone:
                self.metrics.skipped(time.perf_counter() - t0)
                self.log.info("GPU container left alone", **_who(pod, container), reason=decision.left_alone)
                return api.CreateContainerResponse()
            if decision.request is None:
                self.metrics.skipped(time.perf_counter() - t0)
                if self.log.enabled(logs.Level.DEBUG):
                    self.log.debug("no GPU requested", **_who(pod, container))
                return api.CreateContainerResponse()
            response = api.CreateContainerResponse(adjust=decision.message())
            outcome = await self._loader_outcome(container, env, decision)
            if outcome is not None:
                _apply_outcome(response.adjust, outcome)
        except ContainerError as e:
            elapsed = time.perf_counter() - t0
            self.metrics.failed(metrics_mod.reason_label(type(e).__name__), elapsed)
            self.log.error(
                "GPU container refused",
                **_who(pod, container),
                reason=type(e).__name__,
                error=str(e),
                ms=round(elapsed * 1000, 3),
            )
            raise
        except Exception as e:
            elapsed = time.perf_counter() - t0
            self.metrics.failed(metrics_mod.reason_label(InternalError.__name__), elapsed)
            self.log.exception(
                "internal error handling CreateContainer",
                e,
                **_who(pod, container),
                ms=round(elapsed * 1000, 3),
            )
            raise InternalError(
                f"internal error: {type(e).__name__}: {e} (a bug in the NVIDIA NRI plugin; "
                f"the plugin's log has the traceback)"
            ) from e
        elapsed = time.perf_counter() - t0
        self.metrics.adjusted(elapsed)
        req, adj = decision.request, decision.adjustment
        sel = decision.selection or EMPTY_SELECTION
        self.log.info(
            "GPU container adjusted",
            **_who(pod, container),
            devices=req.devices,
            capabilities=req.driver_capabilities,
            gpus=[g.uuid for g in sel.gpus],
            mig_devices=[m.uuid for m in sel.mig_devices],
            device_nodes=len(adj.devices),
            mounts=len(adj.mounts),
            env=len(adj.env),
            hooks=len(adj.create_container_hooks),
            ldcache=outcome.path if outcome is not None else "off",
            ms=round(elapsed * 1000, 3),
        )
        return response

    async def _loader_outcome(
        self, container: api.Container, env: list[str], decision: Decision
    ) -> LoaderOutcome | None:
        """The generated ld.so.cache (or the fallback) for a GPU container; None when off."""
        loader, snap = self.loader, self.driver.snapshot()
        if not loader.config.enabled or decision.plan is None or snap is None:
            return None
        mounts = decision.adjustment.mounts
        own = {e.split("=", 1)[0]: e.split("=", 1)[1] for e in env if e.startswith(LIBCUDA_ENV_PREFIXES)}
        cancelled = threading.Event()
        try:
            outcome = await asyncio.wait_for(
                asyncio.to_thread(loader.prepare, container.id, mounts, own, snap, cancelled),
                loader.config.timeout + LOADER_GRACE_S,
            )
        except TimeoutError:
            cancelled.set()
            reason = (
                f"the image was not read within nri-plugin.image-read-timeout ({loader.config.timeout:g} s)"
            )
            outcome = loader.fallback(container.id, mounts, own, "timeout", reason)
        except Exception as e:  # a bug must not fail the container: it still gets its GPUs
            self.log.exception(
                "internal error generating the container's ld.so.cache", e, container_id=container.id
            )
            outcome = loader.fallback(container.id, mounts, own, "internal", f"{type(e).__name__}: {e}")
        self.metrics.ldcache(outcome.path, outcome.stage)
        if outcome.path == "fallback":
            self.log.warning(
                "container ld.so.cache not generated; the container keeps its image's cache",
                container=container.name,
                container_id=container.id,
                stage=outcome.stage,
                reason=outcome.reason,
            )
        return outcome

    async def stop_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.StopContainerResponse:
        self._forget(container)
        return api.StopContainerResponse()

    async def remove_container(self, pod: api.PodSandbox, container: api.Container) -> None:
        self._forget(container)

    def _forget(self, container: api.Container) -> None:
        try:
            if self.loader.remove(container.id):
                self.log.debug("removed the container's generated ld.so.cache", container_id=container.id)
        except Exception as e:  # never let cleanup break the event stream
            self.log.exception("cannot remove a container's generated files", e, container_id=container.id)

    async def synchronize(
        self, pods: list[api.PodSandbox], containers: list[api.Container]
    ) -> list[api.ContainerUpdate]:
        """At every (re)registration: report the containers that ask for GPUs but have none.

        NRI fails open: a container created while the plugin was not registered (restarting,
        reconnecting, too slow) started without any adjustment. Each such container -- its request
        resolves to GPUs on the current snapshot, yet its spec has no NVIDIA device node, NVIDIA CDI
        device or legacy hook -- is logged with its pod and counted in
        ``nri_gpu_unadjusted_containers``; with ``evict-unadjusted`` those created after this plugin
        first registered on the node are evicted once registration is complete (``nri_plugin.resync``).
        Right after a start the first discovery may still run (registration does not wait for it):
        then the check runs as soon as it has finished.
        """
        try:
            gone = self.loader.sync([c.id for c in containers])
            if gone:
                self.log.info("removed generated files of containers that no longer exist", count=len(gone))
        except Exception as e:
            self.log.exception("cannot clean the state directory at Synchronize", e)
        self._record_first_registration()
        if self.driver.snapshot() is None and self.driver.pending:
            if self._deferred_report is not None:
                self._deferred_report.cancel()
            self._deferred_report = self._tasks.spawn(
                self._report_after_discovery(pods, containers), name="unadjusted-report"
            )
            return []
        self._evictable = self._report_unadjusted(pods, containers)
        return []

    def _record_first_registration(self) -> None:
        if self._first_ns is not None:
            return
        if self._state_dir is None:
            self._first_ns = time.time_ns()
            return
        try:
            self._first_ns = resync.first_registered_ns(self._state_dir)
        except OSError as e:
            if str(e) != self._first_error:
                self._first_error = str(e)
                self.log.warning(
                    "cannot read or record when this plugin first registered; no container will be "
                    "evicted until nri-plugin.state-dir is a writable, persistent directory",
                    state_dir=self._state_dir,
                    error=str(e),
                )

    async def _report_after_discovery(
        self, pods: list[api.PodSandbox], containers: list[api.Container]
    ) -> None:
        await asyncio.shield(self.driver.start_refresh())
        self._evictable = self._report_unadjusted(pods, containers)
        if self._stub_counts().registered:  # registration completed meanwhile: evict now
            self._start_evictions()

    def _report_unadjusted(
        self, pods: list[api.PodSandbox], containers: list[api.Container]
    ) -> list[Unadjusted]:
        by_id = {pod.id: pod for pod in pods}
        found: list[Unadjusted] = []
        for container in containers:
            devices = self._unadjusted_request(container)
            if devices is None:
                continue
            pod = by_id.get(container.pod_sandbox_id, api.PodSandbox(id=container.pod_sandbox_id))
            verdict = resync.classify(_created_ns(container), self._first_ns)
            item = Unadjusted(container.id, container.pid, _who(pod, container), verdict)
            found.append(item)
            evicting = verdict.evict and self.settings.evict_unadjusted
            self.log.warning(
                "GPU container is running without its GPUs (created while the plugin was not "
                "registered); "
                + ("evicting it" if evicting else "recreate it")
                + ("" if verdict.evict or not self.settings.evict_unadjusted else "; not evicted"),
                **item.who,
                devices=devices,
                evictable=verdict.evict,
                why=verdict.why,
            )
        self.metrics.unadjusted(len(found))
        if found:
            self.log.warning("containers without their GPUs found at Synchronize", count=len(found))
        return [u for u in found if u.verdict.evict] if self.settings.evict_unadjusted else []

    def _unadjusted_request(self, container: api.Container) -> str | None:
        """The device request of a running container that asks for GPUs but got none, else None."""
        if container.state == api.CONTAINER_STOPPED or _has_gpu_injection(container):
            return None
        try:
            env, mounts, privileged = request_inputs(container)
            decision = decide(
                env,
                mounts,
                privileged,
                self.settings.hook,
                self.driver.snapshot(),
                annotations=container_annotations(container),
            )
        except ContainerError:
            return None  # would have been refused; it did not ask for GPUs we could give
        except Exception as e:  # never let one odd container break the registration
            self.log.exception("internal error checking a synchronized container", e)
            return None
        if decision.request is None or not decision.adjustment.devices:
            return None
        return decision.request.devices

    def _start_evictions(self) -> None:
        if not self._evictable:
            return
        todo, self._evictable = self._evictable, []
        if self._evict_task is not None and not self._evict_task.done():
            self._evict_task.cancel()
        self._evict_task = self._tasks.spawn(self._evict(todo), name="evict")

    async def _evict(self, todo: list[Unadjusted]) -> None:
        """Evict through NRI, then check; SIGKILL the init process of those still running."""
        reason = resync.EVICT_REASON
        evictions = [api.ContainerEviction(container_id=u.container_id, reason=reason) for u in todo]
        try:
            if self.updater is None:
                raise ConnectionError("no NRI connection to send the eviction on")
            await self.updater([], evictions)
        except Exception as e:  # the fallback below still applies
            self.log.warning("NRI eviction request failed", error=f"{type(e).__name__}: {e}")
        await asyncio.sleep(resync.EVICT_GRACE_S)
        for u in todo:
            if u.pid <= 0:  # no PID in the NRI record: nothing to check or signal
                self.metrics.evicted("nri")
                self.log.warning("eviction of GPU container without GPUs requested through NRI only", **u.who)
                continue
            if not resync.owns_process(u.container_id, u.pid):  # gone: the runtime evicted it
                self.metrics.evicted("nri")
                self.log.warning("evicted GPU container without GPUs", **u.who, method="nri")
                continue
            # containerd <= 2.2 ignores UpdateContainers evictions: stop the process ourselves.
            sent = resync.evict_fallback(u.container_id, u.pid)
            if sent:
                self.metrics.evicted("signal")
            self.log.warning(
                ("evicted" if sent else "could not evict") + " GPU container without GPUs",
                **u.who,
                method="signal",
                pid=u.pid,
                reason=resync.EVICT_REASON,
            )

    async def on_registered(self) -> None:
        snap = self.driver.snapshot()
        status = (
            f"registered with {self.runtime or 'the runtime'} as {self.settings.plugin_index}-"
            f"{self.settings.plugin_name}; "
            + (
                f"{len(snap.gpus)} GPU(s), driver {snap.driver_version}"
                if snap is not None
                else "no NVIDIA driver found"
            )
        )
        self.notifier.ready(status)
        self.log.info("registered", runtime=self.runtime)
        self._start_evictions()  # not from Synchronize itself: the runtime holds its lock there

    async def on_disconnected(self) -> None:
        self.notifier.status("reconnecting to the NRI socket")
        self.log.warning("disconnected from the runtime")


def _apply_outcome(adjust: api.ContainerAdjustment, outcome: LoaderOutcome) -> None:
    if outcome.mount is not None:
        m = outcome.mount
        adjust.mounts.append(
            api.Mount(destination=m.destination, type=m.type, source=m.source, options=m.options)
        )
    adjust.env.extend(api.KeyValue(key=k, value=v) for k, v in outcome.env)


def _who(pod: api.PodSandbox, container: api.Container) -> dict[str, str]:
    """The fields that identify a container in every log line about it."""
    return {
        "container": container.name,
        "container_id": container.id,
        "pod_namespace": pod.namespace,
        "pod": pod.name,
    }


def _has_gpu_injection(container: api.Container) -> bool:
    """Whether some injector gave this container GPUs: an NVIDIA device node (ours, CDI's or a
    runtime's), an NVIDIA CDI device, or the legacy prestart hook (its nodes are not in the spec)."""
    if any(d.path.startswith("/dev/nvidia") for d in container.linux.devices):
        return True
    if any(d.name.startswith("nvidia.com/") for d in container.CDI_devices):
        return True
    return any("nvidia" in h.path for h in container.hooks.prestart)


def _created_ns(container: api.Container) -> int | None:
    """Creation time (unix ns): NRI's ``created_at`` (NRI >= v0.9), else the start time of its
    init process when that process is verifiably the container's (containerd 1.7)."""
    if container.created_at > 0:
        return int(container.created_at)
    if container.pid and resync.owns_process(container.id, container.pid):
        return resync.process_start_ns(container.pid)
    return None

"""Prometheus metrics (only when ``metrics-address`` is set) and a no-op twin with the same interface.

``prometheus_client`` is imported lazily so that a plugin without metrics does not pay its import
time before registering. Each ``PrometheusMetrics`` owns its registry; values owned by other objects
(stub counters, the driver snapshot) are read on scrape by a custom collector, process usage by the
library's standard ``process_*`` collector. Exposition rules (``docs/operations.md`` "Metrics"
lists every name, and a test compares that list with a scrape):

* no ``*_created`` series (they double the series count and nobody alerts on them);
* ``reason`` labels are stable snake_case strings derived from the error class
  (``DriverNotFoundError`` -> ``driver_not_found``; :func:`reason_label`), never free text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from nri_plugin.config import parse_address
from nri_plugin.host import DriverSnapshot

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def reason_label(error_class: str) -> str:
    """The ``reason`` label of a failure: the error class in snake_case without ``Error``."""
    name = error_class.removesuffix("Error") or error_class
    return _CAMEL_BOUNDARY.sub("_", name).lower()


CREATE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0)


@dataclass(frozen=True, slots=True)
class StubCounts:
    registrations: int = 0
    reconnects: int = 0
    registered: bool = False  # currently registered with the runtime (alert when 0 for long)


class Metrics(Protocol):
    def adjusted(self, seconds: float) -> None: ...
    def failed(self, reason: str, seconds: float) -> None: ...
    def skipped(self, seconds: float) -> None: ...
    def unadjusted(self, count: int) -> None: ...
    def ldcache(self, path: str, stage: str) -> None: ...
    def evicted(self, method: str) -> None: ...
    def close(self) -> None: ...

    @property
    def address(self) -> str: ...

    @property
    def listening(self) -> str:
        """The bound "host:port" while serving ("" when not): the real port when 0 was asked for."""
        ...


class NullMetrics:
    """Metrics disabled: every call is free."""

    address = ""
    listening = ""

    def adjusted(self, seconds: float) -> None:
        pass

    def failed(self, reason: str, seconds: float) -> None:
        pass

    def skipped(self, seconds: float) -> None:
        pass

    def unadjusted(self, count: int) -> None:
        pass

    def ldcache(self, path: str, stage: str) -> None:
        pass

    def evicted(self, method: str) -> None:
        pass

    def close(self) -> None:
        pass


class _StateCollector:
    """Collected on each scrape: stub counters and the driver snapshot."""

    def __init__(
        self, stub_counts: Callable[[], StubCounts], snapshot: Callable[[], DriverSnapshot | None]
    ) -> None:
        self._stub_counts = stub_counts
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        counts = self._stub_counts()
        yield CounterMetricFamily(
            "nri_gpu_plugin_registrations", "Successful NRI registrations", value=counts.registrations
        )
        yield CounterMetricFamily(
            "nri_gpu_plugin_reconnects", "Reconnects to the NRI socket", value=counts.reconnects
        )
        yield GaugeMetricFamily(
            "nri_gpu_plugin_registered",
            "1 while registered with the runtime; 0 means new containers get no GPUs (NRI fails open)",
            value=1 if counts.registered else 0,
        )
        snap = self._snapshot()
        yield GaugeMetricFamily(
            "nri_gpu_driver_available",
            "1 when the host driver was discovered",
            value=0 if snap is None else 1,
        )
        yield GaugeMetricFamily(
            "nri_gpu_driver_gpus",
            "GPUs in the current driver snapshot",
            value=0 if snap is None else len(snap.gpus),
        )
        yield GaugeMetricFamily(
            "nri_gpu_driver_mig_devices",
            "MIG devices in the current driver snapshot",
            value=0 if snap is None else sum(len(g.mig_devices) for g in snap.gpus),
        )
        info = GaugeMetricFamily(
            "nri_gpu_driver_info",
            "The driver the snapshot describes (always 1)",
            labels=["driver_version", "cuda_version", "source"],
        )
        if snap is not None:
            info.add_metric([snap.driver_version, snap.cuda_version or "", snap.source], 1)
        yield info


class PrometheusMetrics:
    """Counters/histogram updated on the hot path, served over HTTP at ``address``."""

    def __init__(
        self,
        address: str,
        *,
        stub_counts: Callable[[], StubCounts] = StubCounts,
        snapshot: Callable[[], DriverSnapshot | None] = lambda: None,
    ) -> None:
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        # The library's switch is process-wide; the daemon has one registry, so that is what we want.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        host, port = parse_address(address)
        self.registry: CollectorRegistry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self._adjusted = Counter(
            "nri_gpu_containers_adjusted", "GPU containers given an adjustment", registry=self.registry
        )
        self._failed = Counter(
            "nri_gpu_containers_failed",
            "GPU containers whose creation was failed",
            ["reason"],
            registry=self.registry,
        )
        self._skipped = Counter(
            "nri_gpu_containers_skipped", "Containers that asked for no GPU", registry=self.registry
        )
        self._seconds = Histogram(
            "nri_gpu_create_container_seconds",
            "CreateContainer handling time",
            buckets=CREATE_BUCKETS,
            registry=self.registry,
        )
        self._unadjusted = Gauge(
            "nri_gpu_unadjusted_containers",
            "Containers that request GPUs but have no NVIDIA device nodes, found at the last "
            "Synchronize (created while the plugin was not registered: NRI fails open)",
            registry=self.registry,
        )
        self._ldcache = Counter(
            "nri_gpu_ldcache",
            "GPU containers by how their /etc/ld.so.cache was made: path image-cache or image-dirs "
            "(generated), or fallback with the stage that failed (containerd, image, store, timeout, "
            "internal)",
            ["path", "stage"],
            registry=self.registry,
        )
        self._evicted = Counter(
            "nri_gpu_containers_evicted",
            "Containers without their GPUs evicted at Synchronize (evict-unadjusted), by method",
            ["method"],
            registry=self.registry,
        )
        self.registry.register(_StateCollector(stub_counts, snapshot))
        self._server: Any = None
        self._thread: Any = None
        self._host, self._port = host, port
        self.address = address
        self.listening = ""

    def start(self) -> tuple[str, int]:
        """Start serving; returns the bound (host, port) (port 0 picks a free one)."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(self._port, self._host, registry=self.registry)
        bound = self._server.server_address
        host, port = str(bound[0]), int(bound[1])
        self.listening = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return host, port

    def adjusted(self, seconds: float) -> None:
        self._adjusted.inc()
        self._seconds.observe(seconds)

    def failed(self, reason: str, seconds: float) -> None:
        self._failed.labels(reason=reason).inc()
        self._seconds.observe(seconds)

    def skipped(self, seconds: float) -> None:
        self._skipped.inc()
        self._seconds.observe(seconds)

    def unadjusted(self, count: int) -> None:
        self._unadjusted.set(count)

    def ldcache(self, path: str, stage: str) -> None:
        self._ldcache.labels(path=path, stage=stage).inc()

    def evicted(self, method: str) -> None:
        self._evicted.labels(method=method).inc()

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self.listening = ""


def create(
    address: str,
    *,
    stub_counts: Callable[[], StubCounts] = StubCounts,
    snapshot: Callable[[], DriverSnapshot | None] = lambda: None,
) -> Metrics:
    """A started ``PrometheusMetrics`` for a non-empty address, else ``NullMetrics``."""
    if not address:
        return NullMetrics()
    m = PrometheusMetrics(address, stub_counts=stub_counts, snapshot=snapshot)
    m.start()
    return m

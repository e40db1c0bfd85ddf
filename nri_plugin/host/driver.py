"""The cached host driver: one snapshot, read in O(1) on the hot path, refreshed off it.

``HostDriver.watch()`` polls a cheap fingerprint (stat of the driver version file and ld.so.cache,
the GPU directories in procfs, the ``/dev/nvidia*`` nodes, the MIG instances' capability entries)
in a worker thread and re-runs discovery there only when it changes. A failed refresh keeps the
previous snapshot and records ``last_error``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.discover import DEFAULT_ROOTS, discover, explain_no_driver
from nri_plugin.host.model import DriverSnapshot, HostRoots
from nri_plugin.host.paths import resolve_in_root
from nri_plugin.host.pin import unique_checks, verify

log = logging.getLogger(__name__)

Fingerprint = tuple[tuple[str, tuple[int, ...] | None], ...]


def _stat_key(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_rdev, st.st_mode)


def _listing(path: str, prefix: str = "") -> list[str]:
    try:
        return sorted(n for n in os.listdir(path) if n.startswith(prefix))
    except OSError:
        return []


def fingerprint(roots: HostRoots, ldcache_path: str = "/etc/ld.so.cache") -> Fingerprint:
    """A value that changes when the driver is installed, upgraded, loaded or unloaded, or
    when the GPUs or their MIG instances change."""
    items: list[tuple[str, tuple[int, ...] | None]] = []
    version = resolve_in_root(roots.proc_root, "driver/nvidia/version")
    items.append((version, _stat_key(version)))
    ldcache = resolve_in_root(roots.driver_root, ldcache_path)
    items.append((ldcache, _stat_key(ldcache)))
    gpus_dir = resolve_in_root(roots.proc_root, "driver/nvidia/gpus")
    for name in _listing(gpus_dir):
        items.append((os.path.join(gpus_dir, name), None))
    dev = resolve_in_root(roots.dev_root, "/dev")
    for name in _listing(dev, "nvidia"):
        path = os.path.join(dev, name)
        items.append((path, _stat_key(path)))
    caps = os.path.join(dev, "nvidia-caps")
    for name in _listing(caps):
        path = os.path.join(caps, name)
        items.append((path, _stat_key(path)))
    # MIG instances: the driver keeps one capability entry per existing GPU/compute instance
    # (gpu<M>/mig/gi<G>/access, .../ci<C>/access).  Creating or destroying instances changes
    # nothing above once the /dev/nvidia-caps nodes exist, but changes the MIG devices.
    capabilities = resolve_in_root(roots.proc_root, "driver/nvidia/capabilities")
    for gpu in _listing(capabilities, "gpu"):
        mig = os.path.join(capabilities, gpu, "mig")
        for gi in _listing(mig, "gi"):
            gi_dir = os.path.join(mig, gi)
            items.append((gi_dir, _stat_key(gi_dir)))
            for ci in _listing(gi_dir, "ci"):
                ci_dir = os.path.join(gi_dir, ci)
                items.append((ci_dir, _stat_key(ci_dir)))
    return tuple(items)


class HostDriver:
    """Holds the current :class:`DriverSnapshot` (or ``None`` when the host has no driver)."""

    def __init__(
        self,
        roots: HostRoots = DEFAULT_ROOTS,
        *,
        discover_fn: Callable[..., DriverSnapshot | None] = discover,
        **discover_kwargs: Any,
    ) -> None:
        self.roots = roots
        self._discover_fn = discover_fn
        self._kwargs = discover_kwargs
        self._ldcache_path: str = discover_kwargs.get("ldcache_path", "/etc/ld.so.cache")
        self._snapshot: DriverSnapshot | None = None
        self._fingerprint: Fingerprint | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None
        # Why the last discovery itself failed (None once one succeeds): what a GPU container is
        # told when there is no snapshot. Not the watch's own failures (last_error has those too).
        self.discovery_error: str | None = None
        self.no_driver_reason: str | None = None
        self.refreshes = 0
        self.attempts = 0  # refreshes finished, failed ones included
        self._pending: asyncio.Future[bool] | None = None

    def snapshot(self) -> DriverSnapshot | None:
        """The current snapshot; O(1), safe from any thread."""
        return self._snapshot

    def changed(self) -> bool:
        """True if the host looks different from when the current snapshot was taken, or a mount
        source of the snapshot is no longer the file discovery pinned (``host.pin``)."""
        if fingerprint(self.roots, self._ldcache_path) != self._fingerprint:
            return True
        snap = self._snapshot
        if snap is None:
            return False
        if snap.pin_errors:  # a source vanished while it was being discovered: try again
            return True
        return verify(unique_checks(snap.pins.values())) is not None or verify(snap.rejected) is not None

    def start_refresh(self) -> asyncio.Future[bool]:
        """The refresh in progress, or a new one in a worker thread: every caller (start-up, the
        watch, a CreateContainer that found the driver changed) shares one, so discovery never
        runs twice at once (with a hanging NVML that would double the wait)."""
        task = self._pending
        if task is None or task.done():
            # Not a TaskScope task (nri_plugin.wire.tasks): this future is the shared result of one
            # refresh, held here (the strong reference) and awaited shielded by every caller; no
            # owner's end may cancel it -- the worker thread would go on, and the snapshot must be
            # kept consistent -- and its failure is each awaiting caller's to report, not a log line.
            task = asyncio.get_running_loop().create_task(asyncio.to_thread(self.refresh))
            self._pending = task
        return task

    async def refresh_soon(self, budget: float) -> bool:
        """Re-discover now (:meth:`start_refresh`) and wait for it at most ``budget`` seconds.
        True when a refresh finished within the budget (whether or not it changed anything); the
        refresh goes on in the background otherwise."""
        task = self.start_refresh()
        try:
            await asyncio.wait_for(asyncio.shield(task), budget)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if task.cancelled() and not _current_task_cancelling():
                return True  # the shared refresh was cancelled, not this caller: re-read the state
            raise
        except Exception:  # refresh() reports its own failures; the caller re-reads the state
            log.exception("host driver refresh failed")
        return True

    def refresh(self) -> bool:
        """Re-discover now; True if the snapshot differs from the previous one.

        On failure the previous snapshot stays in place and ``last_error`` says why.
        """
        with self._lock:
            try:
                return self._refresh_locked()
            finally:
                self.attempts += 1

    @property
    def pending(self) -> bool:
        """True until the first discovery has finished (successfully or not)."""
        return self.attempts == 0

    def _refresh_locked(self) -> bool:
        before = fingerprint(self.roots, self._ldcache_path)
        try:
            new = self._discover_fn(self.roots, **self._kwargs)
        except (HostDiscoveryError, OSError) as exc:
            self.last_error = f"host driver discovery failed (keeping the previous state): {exc}"
            self.discovery_error = str(exc)
            log.warning("%s", self.last_error)
            self._fingerprint = before
            return False
        self.refreshes += 1
        self.last_error = None
        self.discovery_error = None
        self.no_driver_reason = (
            None if new is not None else explain_no_driver(self.roots, ldcache_path=self._ldcache_path)
        )
        self._fingerprint = before
        old = self._snapshot
        self._snapshot = new
        return old != new

    async def watch(self, interval: float = 10.0) -> None:
        """Poll :meth:`changed` every ``interval`` seconds; refresh in a thread when it is True."""
        while True:
            try:
                # changed() stats files below the roots: never on the loop that serves containerd.
                if self._pending is not None and not self._pending.done():
                    await asyncio.shield(self._pending)  # e.g. the first discovery: do not queue another
                stale = self._fingerprint is None or await asyncio.to_thread(self.changed)
                # shielded: cancelling the watch (a Configure, close) must not cancel the refresh
                # that a CreateContainer may be waiting for in refresh_soon
                if stale and await asyncio.shield(self.start_refresh()):
                    log.info("host driver changed: %s", _summary(self._snapshot))
            except Exception as exc:  # the watcher must survive anything a weird host throws at it
                self.last_error = f"host driver watch failed: {exc!r}"
                log.exception("host driver watch failed")
            await asyncio.sleep(interval)


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _summary(snap: DriverSnapshot | None) -> str:
    if snap is None:
        return "no NVIDIA driver"
    return f"driver={snap.driver_version} gpus={len(snap.gpus)} source={snap.source}"

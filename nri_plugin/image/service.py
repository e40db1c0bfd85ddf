"""Per GPU container: read its image, generate its ``/etc/ld.so.cache``, store it, say what was done.

:meth:`LoaderService.prepare` is called by the CreateContainer handler in a worker thread, under
``nri-plugin.image-read-timeout``. Steps: ``Snapshots.Mounts(key=container id)`` on containerd's
API socket -> the layer directories -> :func:`nri_plugin.image.scan.read_facts` (memoized per
layer list: the same image costs one read) -> :func:`nri_plugin.adjust.build_cache` (memoized per
image, driver entries and compat decision) -> :class:`~nri_plugin.image.store.CacheStore`.

Any failure is a *fallback*: the container gets its adjustment exactly as without this feature
(its image's own cache stays; the driver libraries are still found through the loader's system
directories), plus the libcuda env. The outcome names the path (``image-cache``, ``image-dirs``
or ``fallback``), the stage that failed and why; the plugin logs it, counts it
(``nri_gpu_ldcache_total``) and the store records it for ``inspect --container-id``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

from nri_plugin.adjust import (
    ImageFacts,
    LoaderCache,
    MountEdit,
    build_cache,
    cache_mount,
    driver_records,
    lib_dirs,
    libcuda_env,
)
from nri_plugin.errors import ImageReadError
from nri_plugin.host import CacheRecord, DriverSnapshot
from nri_plugin.image.containerd import MountsFnType, layer_dirs, snapshot_mounts
from nri_plugin.image.rootfs import Budget, ImageRoot
from nri_plugin.image.scan import read_facts
from nri_plugin.image.store import CacheStore

FACTS_MEMO = 64
CACHE_MEMO = 256
MAX_HOST_CALLS = 200_000
REFUSAL_TTL_S = 60.0

MountsFn = MountsFnType


@dataclass(frozen=True, slots=True)
class LoaderConfig:
    """The settings this service reads (from ``nri_plugin.config.Settings``)."""

    enabled: bool = True
    state_dir: str = "/run/nvidia-nri-plugin"
    containerd_socket: str = "/run/containerd/containerd.sock"
    namespace: str = "k8s.io"
    snapshotter: str = "overlayfs"
    timeout: float = 0.5
    compat: bool = True  # cuda forward compat enabled (config.compat_enabled)
    read_root: str = "/"  # where the host's / is in this process's view (nri-plugin.host-root)


@dataclass(frozen=True, slots=True)
class LoaderOutcome:
    """What the container gets from this feature, and how it was decided."""

    path: str  # "image-cache", "image-dirs", "fallback"
    stage: str = ""  # failed stage: "containerd", "image", "store", "timeout", "internal"
    reason: str = ""
    mount: MountEdit | None = None
    env: tuple[tuple[str, str], ...] = ()
    detail: Mapping[str, object] = field(default_factory=dict)

    def record(self) -> dict[str, object]:
        return {"path": self.path, "stage": self.stage, "reason": self.reason, **self.detail}


class LoaderService:
    def __init__(self, config: LoaderConfig, *, mounts_fn: MountsFn = snapshot_mounts) -> None:
        self.config = config
        self.store = CacheStore(config.state_dir)
        self._mounts_fn = mounts_fn
        self._facts: OrderedDict[tuple[str, ...], ImageFacts] = OrderedDict()
        self._refused: OrderedDict[tuple[str, ...], tuple[float, str]] = OrderedDict()
        self._caches: OrderedDict[tuple[object, ...], LoaderCache] = OrderedDict()
        self._by_plan: OrderedDict[tuple[object, ...], tuple[object, ImageFacts, LoaderCache]] = OrderedDict()
        self._lock = threading.Lock()

    # -- memo --------------------------------------------------------------------------------

    def facts_for(self, layers: tuple[str, ...], deadline_s: float) -> ImageFacts:
        """The image's facts, read once per layer list; a refused image is refused from memory
        for :data:`REFUSAL_TTL_S` (so a hostile or oversized image costs one read per minute,
        not one per container)."""
        now = time.monotonic()
        with self._lock:
            hit = self._facts.get(layers)
            if hit is not None:
                self._facts.move_to_end(layers)
                return hit
            refused = self._refused.get(layers)
            if refused is not None and refused[0] > now:
                raise ImageReadError(refused[1])
        try:
            facts = read_facts(ImageRoot(layers, Budget.of(MAX_HOST_CALLS, deadline_s)))
        except ImageReadError as exc:
            with self._lock:
                self._refused[layers] = (now + REFUSAL_TTL_S, str(exc))
                while len(self._refused) > FACTS_MEMO:
                    self._refused.popitem(last=False)
            raise
        with self._lock:
            self._facts[layers] = facts
            while len(self._facts) > FACTS_MEMO:
                self._facts.popitem(last=False)
        return facts

    def cache_for(
        self, layers: tuple[str, ...], facts: ImageFacts, drivers: list[CacheRecord], driver_version: str
    ) -> LoaderCache:
        key = (layers, tuple(drivers), driver_version, self.config.compat)
        with self._lock:
            hit = self._caches.get(key)
            if hit is not None:
                self._caches.move_to_end(key)
                return hit
        made = build_cache(facts, drivers, driver_version, self.config.compat)
        with self._lock:
            self._caches[key] = made
            while len(self._caches) > CACHE_MEMO:
                self._caches.popitem(last=False)
        return made

    # -- the steps -----------------------------------------------------------------------------

    def evaluate(
        self,
        layers: tuple[str, ...],
        mounts: tuple[MountEdit, ...],
        container_env: Mapping[str, str],
        snapshot: DriverSnapshot,
        budget_s: float,
    ) -> tuple[LoaderCache, LoaderOutcome]:
        """The generated cache for an image given as layer directories, and its outcome (without
        a mount yet); raises :class:`ImageReadError` for a refused image."""
        facts = self.facts_for(layers, budget_s)
        # The plan's mounts tuple is memoized with the plan: the same object for the same request,
        # so its driver entries and the finished cache are found by identity, without rehashing.
        quick = (layers, id(mounts), snapshot.driver_version)
        with self._lock:
            hit = self._by_plan.get(quick)
        if hit is not None and hit[0] is mounts and hit[1] is facts:
            cache = hit[2]
        else:
            drivers = driver_records(mounts, snapshot, facts)
            cache = self.cache_for(layers, facts, drivers, snapshot.driver_version)
            with self._lock:
                self._by_plan[quick] = (mounts, facts, cache)
                while len(self._by_plan) > CACHE_MEMO:
                    self._by_plan.popitem(last=False)
        detail: dict[str, object] = {
            "digest": cache.digest,
            "entries": cache.entries,
            "driver_entries": cache.driver_entries,
            "image_entries": len(facts.records),
            "old_section": facts.has_old,
            "compat": cache.compat,
            "compat_version": facts.compat_version,
            "lib_dir": cache.lib_dir,
            "layers": len(layers),
        }
        env = libcuda_env(mounts, container_env, cache.lib_dir)
        return cache, LoaderOutcome(facts.source, env=env, detail=detail)

    def preview(
        self,
        layers: tuple[str, ...],
        mounts: tuple[MountEdit, ...],
        container_env: Mapping[str, str],
        snapshot: DriverSnapshot,
    ) -> LoaderOutcome:
        """What :meth:`prepare` would decide for these layers, writing nothing (``inspect``)."""
        try:
            return self.evaluate(layers, mounts, container_env, snapshot, self.config.timeout)[1]
        except ImageReadError as exc:
            env = libcuda_env(mounts, container_env, lib_dirs(ImageFacts("", ()))[0])
            return LoaderOutcome("fallback", stage="image", reason=str(exc), env=env)

    def prepare(
        self,
        container_id: str,
        mounts: tuple[MountEdit, ...],
        container_env: Mapping[str, str],
        snapshot: DriverSnapshot,
        cancelled: threading.Event | None = None,
    ) -> LoaderOutcome:
        """The outcome for one GPU container (never raises for a bad image or host)."""
        t0 = time.monotonic()
        cfg = self.config
        stage = "containerd"
        try:
            snap_mounts = self._mounts_fn(
                cfg.containerd_socket, cfg.namespace, cfg.snapshotter, container_id, cfg.timeout
            )
            layers = layer_dirs(snap_mounts)
            if cfg.read_root != "/":  # containerd names host paths; read them where they are here
                layers = tuple(os.path.join(cfg.read_root, d.lstrip("/")) for d in layers)
            stage = "image"
            left = max(0.01, cfg.timeout - (time.monotonic() - t0))
            cache, outcome = self.evaluate(layers, mounts, container_env, snapshot, left)
            stage = "store"
            if cancelled is not None and cancelled.is_set():
                raise ImageReadError("the image read finished after the CreateContainer budget")
            record = {k: v for k, v in outcome.record().items() if k not in ("stage", "reason")}
            source = self.store.put(container_id, cache.digest, cache.data, record)
            return LoaderOutcome(
                outcome.path, mount=cache_mount(source), env=outcome.env, detail=outcome.detail
            )
        except ImageReadError as exc:
            if cancelled is not None and cancelled.is_set():  # the handler already recorded "timeout"
                return LoaderOutcome("fallback", stage="timeout", reason=str(exc))
            return self.fallback(container_id, mounts, container_env, stage, str(exc))

    def fallback(
        self,
        container_id: str,
        mounts: tuple[MountEdit, ...],
        container_env: Mapping[str, str],
        stage: str,
        reason: str,
    ) -> LoaderOutcome:
        """Today's adjustment (no generated cache) plus the libcuda env; recorded for inspect."""
        env = libcuda_env(mounts, container_env, lib_dirs(ImageFacts("", ()))[0])
        outcome = LoaderOutcome("fallback", stage=stage, reason=reason, env=env)
        with contextlib.suppress(OSError, ImageReadError):  # the log line and the metric still say it
            self.store.write_record(container_id, outcome.record())
        return outcome

    def remove(self, container_id: str) -> bool:
        return self.store.remove(container_id)

    def sync(self, existing: list[str]) -> list[str]:
        return self.store.sync(existing)

"""The container adjustment: resolved GPU request + host snapshot -> device nodes and mounts.

The model is libnvidia-container's capability-filtered one (nvidia-toolkit.md §1.1-§1.5), not the
CDI generator's inject-everything one: only what the requested driver capabilities need is given.

Device nodes (``snapshot.device_nodes``; permission bits only, type/major/minor as discovered):

* ``/dev/nvidiactl`` always (missing -> ``ContainerError``: nothing works without it);
* ``/dev/nvidia-uvm`` and ``/dev/nvidia-uvm-tools`` with ``compute`` or ``video``;
  ``/dev/nvidia-modeset`` with ``display``; these are skipped when absent on the host (as CDI does);
* ``/dev/nvidia<minor>`` for every selected GPU and every parent of a selected MIG device
  (missing -> ``ContainerError`` naming the node and how to create it);
* for a selected MIG device, its GI and CI access capabilities ``gpu<M>/gi<G>/access`` and
  ``gpu<M>/gi<G>/ci<C>/access`` (minors from ``/proc/driver/nvidia-caps/mig-minors``) as
  ``/dev/nvidia-caps/nvidia-cap<minor>`` (missing -> ``ContainerError``);
* ``NVIDIA_MIG_CONFIG_DEVICES`` / ``NVIDIA_MIG_MONITOR_DEVICES``: only ``all`` is accepted, and not
  together with specific MIG devices (LNC ``select_mig_config_devices``). They add the ``config``
  (resp. ``monitor``) capability node and every GI/CI access capability of each selected
  MIG-enabled GPU. Nodes of this global mode that the host has not created are skipped, as LNC
  skips the ``/dev`` part when ``nvidia-caps`` is absent (a monitoring agent with
  ``NVIDIA_MIG_MONITOR_DEVICES=all`` must keep starting on hosts without MIG). "MIG-capable" is
  approximated by ``Gpu.mig_enabled``: the snapshot does not carry NVML's "MIG supported" bit.

**Deviation from LNC, on purpose: no mounts under ``/proc``.** LNC bind-mounts
``/proc/driver/nvidia/capabilities`` (or single ``access`` files) and masks ``/proc/driver/nvidia``
with a tmpfs. runc refuses mount destinations inside ``/proc`` except a fixed list, and since this
plugin does not mask ``/proc/driver/nvidia``, the container's own procfs already shows
``/proc/driver/nvidia/capabilities/...``; the device nodes above are what grants access.

Libraries (read-only binds, ``RO_BIND_OPTIONS``), by capability: utility -> ``utility``; compute ->
``compute``; video -> ``video`` + ``compute``; graphics and display -> ``graphics`` +
``graphics-glvnd``; ngx -> ``ngx``; compat32 -> additionally the 32-bit variants of every selected
group (``snapshot.libraries32``).

**Placement (the lead's decision).** At CreateContainer time the plugin cannot see the image's
rootfs (so it cannot pick LNC's per-distro ``libs_dir``), and it adds no OCI hook (no ``ldconfig``
run in the container, no NVIDIAScape-class risk). So every 64-bit library is mounted under its real
file name *and* under its SONAME in both ``/usr/lib/x86_64-linux-gnu`` (Debian/Ubuntu loader system
directory) and ``/usr/lib64`` (RHEL/Fedora/SUSE); 32-bit ones in ``/usr/lib/i386-linux-gnu`` and
``/usr/lib``. The dynamic loader falls back to its system directories when the image's
``ld.so.cache`` does not list a library, so ``dlopen("libcuda.so.1")`` works in both layouts
without ``LD_LIBRARY_PATH`` and without ``ldconfig``. The names LNC creates as symlinks are mounted
as files too: ``libcuda.so`` (libcuda), ``libnvidia-opticalflow.so`` and ``libGLX_indirect.so.0``
(libGLX_nvidia). Known limitation: ``ldconfig -p`` inside the container does not list these
libraries (tools that parse it, rather than calling ``dlopen``, will not find them).

Binaries: ``utility`` binaries with utility, MPS (``compute`` group) binaries with compute (not
with video alone), at ``/usr/bin/<name>``, read-only. IPC (``IPC_BIND_OPTIONS``, writable):
persistenced and fabricmanager sockets with utility, the MPS pipe directory with compute or video,
each if discovery accepted it (``host.discover.find_ipc``), always at its fixed container path
(``IpcPath.container_path``), never at the path it resolved to. GSP firmware: every file of
``snapshot.firmware`` at its path relative to the driver root, read-only, for every GPU container.

Failures beyond missing nodes: a capability whose key library (``KEY_LIBRARIES``: libnvidia-ml for
utility, libcuda for compute) was not discovered fails the container, and so does a node the
capability uses that exists with the wrong type or numbers (``snapshot.invalid_nodes``), e.g. a
``/dev/nvidia-uvm`` with a stale major -- silently leaving it out gave CUDA containers no UVM.

No env changes and no hooks: the spec itself carries everything, so nothing runs in or against the
container's rootfs on the host's behalf; that hook-less design is the point.

Order is deterministic (device nodes: control nodes, GPUs in snapshot order, capability nodes;
mounts: libraries by group, binaries, IPC, firmware); destinations are unique (first wins).
Results are memoized per (snapshot identity, device list, capabilities, MIG config/monitor).
"""

from __future__ import annotations

import functools
import os.path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Generic, TypeVar

from nri_plugin.adjust.model import IPC_BIND_OPTIONS, RO_BIND_OPTIONS, Adjustment, MountEdit
from nri_plugin.adjust.select import Selection, select_devices, show_id
from nri_plugin.errors import ContainerError, DriverChangedError, RequestError
from nri_plugin.host import (
    DeviceNode,
    DriverSnapshot,
    FileId,
    Gpu,
    HostRoots,
    IpcPath,
    Library,
    MigDevice,
    hot_path_checks,
    strip_root,
    unique_checks,
    verify,
)
from nri_plugin.request import ALL_DRIVER_CAPABILITIES, GpuRequest, split_list

LIB_DIRS_64 = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64")
LIB_DIRS_32 = ("/usr/lib/i386-linux-gnu", "/usr/lib")
BIN_DIR = "/usr/bin"
CAPS_DEV_DIR = "/dev/nvidia-caps"
MIG_MINORS_PATH = "/proc/driver/nvidia-caps/mig-minors"

KNOWN_CAPABILITIES = frozenset(ALL_DRIVER_CAPABILITIES.split(","))
# Library groups in the order they are mounted, and the groups each capability selects.
LIBRARY_GROUP_ORDER = ("utility", "compute", "video", "graphics", "graphics-glvnd", "ngx")
LIBRARY_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "utility": ("utility",),
        "compute": ("compute",),
        "video": ("video", "compute"),
        "graphics": ("graphics", "graphics-glvnd"),
        "display": ("graphics", "graphics-glvnd"),
        "ngx": ("ngx",),
    }
)
# Extra names LNC creates as symlinks next to the libraries: (SONAME prefix of the library, name).
EXTRA_LIBRARY_NAMES = (
    ("libcuda.so.", "libcuda.so"),
    ("libnvidia-opticalflow.so.", "libnvidia-opticalflow.so"),
    ("libGLX_nvidia.so.", "libGLX_indirect.so.0"),
)
T = TypeVar("T")
CREATE_NODES_HINT = (
    "create the NVIDIA device nodes on the host (`nvidia-modprobe -c <minor>` for a GPU, "
    "`nvidia-modprobe -u -c 0` for the UVM nodes, or `nvidia-ctk system create-device-nodes`)"
)


# The library without which a capability cannot work at all: when discovery found none (an
# unreadable or redirected ld.so.cache, a broken install) the container fails instead of starting
# with device nodes and no driver.
KEY_LIBRARIES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {"utility": ("utility", "libnvidia-ml.so."), "compute": ("compute", "libcuda.so.")}
)


@dataclass(frozen=True, slots=True)
class Plan:
    """What one request resolves to on one snapshot (the unit of memoization).

    ``checks`` are the pins (``host.pin``) of every mount source of the adjustment, shared
    directories once; ``unpinned`` the sources discovery did not pin (must be empty to mount).
    """

    selection: Selection
    adjustment: Adjustment
    checks: tuple[FileId, ...] = ()
    unpinned: tuple[str, ...] = ()


class Same(Generic[T]):
    """Cache key by identity; it holds the object, so its id cannot be reused while cached."""

    __slots__ = ("obj",)

    def __init__(self, obj: T) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Same) and other.obj is self.obj


# The memo keys are container-controlled strings.  Requests whose strings are longer than this
# in all (64 MIG UUIDs are under 3 KiB) are computed without the memo, so that it holds at most
# 512 small keys instead of 512 values of several MB each.
MEMO_MAX_KEY_CHARS = 8192


def plan(request: GpuRequest, snapshot: DriverSnapshot) -> Plan:
    """Selection and adjustment of ``request`` on ``snapshot`` (memoized; errors are not cached)."""
    key = (
        request.devices,
        request.driver_capabilities,
        request.mig_config_devices,
        request.mig_monitor_devices,
    )
    if sum(map(len, key)) > MEMO_MAX_KEY_CHARS:
        return _plan_cached.__wrapped__(Same(snapshot), *key)
    return _plan_cached(Same(snapshot), *key)


def select_for_request(request: GpuRequest, snapshot: DriverSnapshot) -> Selection:
    """The request's device selection on ``snapshot`` (memoized)."""
    return _select(Same(snapshot), request.devices)


def _select(snap: Same[DriverSnapshot], devices: str) -> Selection:
    if len(devices) > MEMO_MAX_KEY_CHARS:
        return _select_cached.__wrapped__(snap, devices)
    return _select_cached(snap, devices)


def build_adjustment(request: GpuRequest, snapshot: DriverSnapshot) -> Adjustment:
    """The container adjustment for ``request`` on ``snapshot``; see the module docstring."""
    return plan(request, snapshot).adjustment


def clear_cache() -> None:
    """Drop all memoized plans (tests; a new snapshot does not need it: its identity differs)."""
    _select_cached.cache_clear()
    _plan_cached.cache_clear()


@functools.lru_cache(maxsize=512)
def _select_cached(snap: Same[DriverSnapshot], devices: str) -> Selection:
    return select_devices(split_list(devices), snap.obj)


@functools.lru_cache(maxsize=512)
def _plan_cached(
    snap: Same[DriverSnapshot], devices: str, driver_capabilities: str, mig_config: str, mig_monitor: str
) -> Plan:
    snapshot = snap.obj
    selection = _select(snap, devices)
    all_selected = any(i.lower() == "all" for i in split_list(devices))
    caps = _capabilities(driver_capabilities)
    config_all = _mig_all("NVIDIA_MIG_CONFIG_DEVICES", "mig-config", mig_config, all_selected, selection)
    monitor_all = _mig_all("NVIDIA_MIG_MONITOR_DEVICES", "mig-monitor", mig_monitor, all_selected, selection)
    _check_key_libraries(snapshot, caps)
    mounts, sources = _mounts(snapshot, caps)
    adjustment = Adjustment(
        devices=_device_nodes(snapshot, selection, caps, config_all, monitor_all),
        mounts=mounts,
    )
    pins = snapshot.pins
    return Plan(
        selection,
        adjustment,
        checks=hot_path_checks(unique_checks(pins[src] for src in sources if src in pins)),
        unpinned=tuple(src for src in sources if src not in pins),
    )


def _check_key_libraries(snapshot: DriverSnapshot, caps: frozenset[str]) -> None:
    for cap in sorted(caps):
        key = KEY_LIBRARIES.get(cap)
        if key is None:
            continue
        group, prefix = key
        if not any(lib.soname.startswith(prefix) for lib in snapshot.libraries.get(group, ())):
            changed = verify(snapshot.rejected)
            if changed is not None:  # e.g. the library that was a dangling link is back
                raise DriverChangedError(
                    f"the driver library {prefix}* was unusable at discovery and has changed since "
                    f"({changed}); rediscovering"
                )
            raise ContainerError(
                f"NVIDIA_DRIVER_CAPABILITIES includes {cap!r}, but the driver library {prefix}* "
                f"(driver {snapshot.driver_version}) was not found through the ld.so.cache of the "
                f"driver root {snapshot.roots.driver_root!r}; run `ldconfig` on the host (or in the "
                "driver container), check the driver installation, and see `nvidia-nri-plugin info`"
            )


def _capabilities(driver_capabilities: str) -> frozenset[str]:
    caps = frozenset(split_list(driver_capabilities))
    unknown = sorted(caps - KNOWN_CAPABILITIES)
    if unknown:
        raise RequestError(
            f"NVIDIA_DRIVER_CAPABILITIES={driver_capabilities!r}: unknown driver capability "
            f"{unknown[0]!r}; use a comma list of {ALL_DRIVER_CAPABILITIES} or 'all'"
        )
    return caps


def _mig_all(variable: str, what: str, value: str, all_selected: bool, selection: Selection) -> bool:
    """True when ``value`` asks for the global MIG config/monitor mode (only ``all`` exists)."""
    for element in value.split(","):
        if not element:
            continue
        if element.lower() != "all":
            raise ContainerError(
                f"{variable}={show_id(value)}: {show_id(element)}: only 'all' devices are currently "
                f"supported; set {variable}=all or unset it"
            )
        if not all_selected and selection.mig_devices:
            raise ContainerError(
                f"{variable}=all: cannot enable {what} with specific MIG devices selected; "
                f"set NVIDIA_VISIBLE_DEVICES=all or unset {variable}"
            )
        return True
    return False


# --- device nodes -------------------------------------------------------------------------------


def _cap_proc_path(cap: str) -> str:
    """``gpu0/gi1/ci0/access`` -> ``/proc/driver/nvidia/capabilities/gpu0/mig/gi1/ci0/access``."""
    if "/" not in cap:
        return f"/proc/driver/nvidia/capabilities/mig/{cap}"
    gpu, rest = cap.split("/", 1)
    return f"/proc/driver/nvidia/capabilities/{gpu}/mig/{rest}"


def _mig_access_caps(mig: MigDevice) -> tuple[str, str]:
    gi = f"gpu{mig.parent_minor}/gi{mig.gpu_instance_id}/access"
    ci = f"gpu{mig.parent_minor}/gi{mig.gpu_instance_id}/ci{mig.compute_instance_id}/access"
    return gi, ci


def _gpu_access_caps(gpu: Gpu, mig_minors: Mapping[str, int]) -> list[str]:
    prefix = f"gpu{gpu.minor}/"
    return sorted((cap for cap in mig_minors if cap.startswith(prefix)), key=lambda cap: mig_minors[cap])


def _device_nodes(
    snapshot: DriverSnapshot, selection: Selection, caps: frozenset[str], config_all: bool, monitor_all: bool
) -> tuple[DeviceNode, ...]:
    nodes = snapshot.device_nodes
    out: dict[str, DeviceNode] = {}

    invalid = snapshot.invalid_nodes

    def refuse_invalid(path: str, why: str) -> None:
        problem = invalid.get(path)
        if problem is not None:
            raise ContainerError(
                f"{why}: device node {path} exists but is wrong ({problem}); recreate it with the "
                f"driver's numbers (remove it and run `nvidia-modprobe`, or `nvidia-ctk system "
                "create-device-nodes`)"
            )

    def required(path: str, why: str) -> None:
        node = nodes.get(path)
        if node is None:
            refuse_invalid(path, why)
            raise ContainerError(
                f"{why}: device node {path} is missing under the dev root {snapshot.roots.dev_root!r}; "
                f"{CREATE_NODES_HINT}"
            )
        out.setdefault(path, node)

    def optional(path: str, why: str = "") -> None:
        node = nodes.get(path)
        if node is not None:
            out.setdefault(path, node)
        elif why:
            refuse_invalid(path, why)

    required("/dev/nvidiactl", "the NVIDIA control device")
    if "compute" in caps or "video" in caps:
        optional("/dev/nvidia-uvm", "the unified memory device (compute, video)")
        optional("/dev/nvidia-uvm-tools", "the unified memory device (compute, video)")
    if "display" in caps:
        optional("/dev/nvidia-modeset", "the mode-setting device (display)")
    for gpu in selection.gpus:
        required(f"/dev/nvidia{gpu.minor}", f"GPU {gpu.index} ({gpu.uuid})")

    mig_minors = snapshot.mig_minors
    for mig in selection.mig_devices:
        for cap in _mig_access_caps(mig):
            minor = mig_minors.get(cap)
            if minor is None:
                raise ContainerError(
                    f"MIG device {mig.uuid}: capability {cap!r} is not listed in {MIG_MINORS_PATH}; "
                    "the MIG layout changed since the plugin read the host: restart the plugin "
                    "(or check that the nvidia-caps module is loaded)"
                )
            path = f"{CAPS_DEV_DIR}/nvidia-cap{minor}"
            if path not in nodes:
                raise ContainerError(
                    f"MIG device {mig.uuid}: device node {path} ({cap}) is missing under the dev root "
                    f"{snapshot.roots.dev_root!r}; create it with "
                    f"`nvidia-modprobe -f {_cap_proc_path(cap)}`"
                )
            out.setdefault(path, nodes[path])

    for enabled, global_cap in ((config_all, "config"), (monitor_all, "monitor")):
        if not enabled:
            continue
        wanted: list[str] = [global_cap]
        for gpu in selection.gpus:
            if gpu.mig_enabled:
                wanted.extend(_gpu_access_caps(gpu, mig_minors))
        for cap in wanted:
            minor = mig_minors.get(cap)
            if minor is not None:
                optional(f"{CAPS_DEV_DIR}/nvidia-cap{minor}")
    return tuple(out.values())


# --- mounts -------------------------------------------------------------------------------------


def _library_mounts(
    libraries: Iterable[Library], dirs: tuple[str, ...], roots: HostRoots
) -> Iterable[tuple[str, MountEdit]]:
    for lib in libraries:
        names = [lib.file_name, lib.soname]
        names.extend(extra for prefix, extra in EXTRA_LIBRARY_NAMES if lib.soname.startswith(prefix))
        source = roots.to_host(lib.host_path)
        for directory in dirs:
            for name in names:
                yield lib.host_path, MountEdit(source, f"{directory}/{name}", RO_BIND_OPTIONS)


def _mounts(snapshot: DriverSnapshot, caps: frozenset[str]) -> tuple[tuple[MountEdit, ...], tuple[str, ...]]:
    """The mounts, and the host paths (as this process reads them) of their sources."""
    groups = {group for cap in caps for group in LIBRARY_GROUPS.get(cap, ())}
    ordered = [group for group in LIBRARY_GROUP_ORDER if group in groups]
    roots = snapshot.roots
    mounts: list[tuple[str, MountEdit]] = []
    for group in ordered:
        mounts.extend(_library_mounts(snapshot.libraries.get(group, ()), LIB_DIRS_64, roots))
    if "compat32" in caps:
        for group in ordered:
            mounts.extend(_library_mounts(snapshot.libraries32.get(group, ()), LIB_DIRS_32, roots))

    bin_groups = [g for g in ("utility", "compute") if g in caps]
    for group in bin_groups:
        for host_path in snapshot.binaries.get(group, ()):
            dest = f"{BIN_DIR}/{os.path.basename(host_path)}"
            mounts.append((host_path, MountEdit(roots.to_host(host_path), dest, RO_BIND_OPTIONS)))

    ipc: list[IpcPath | None] = []
    if "utility" in caps:
        ipc += [snapshot.persistenced_socket, snapshot.fabricmanager_socket]
    if "compute" in caps or "video" in caps:
        ipc.append(snapshot.mps_pipe_dir)
    for entry in ipc:
        if entry is not None:  # the destination is the fixed path, never where the entry resolved
            mounts.append(
                (
                    entry.host_path,
                    MountEdit(roots.to_host(entry.host_path), entry.container_path, IPC_BIND_OPTIONS),
                )
            )

    driver_root = snapshot.roots.driver_root
    for host_path in snapshot.firmware:
        dest = strip_root(driver_root, host_path)
        mounts.append((host_path, MountEdit(roots.to_host(host_path), dest, RO_BIND_OPTIONS)))

    unique: dict[str, tuple[str, MountEdit]] = {}
    for source, mount in mounts:
        unique.setdefault(mount.destination, (source, mount))
    sources = dict.fromkeys(source for source, _ in unique.values())
    return tuple(mount for _, mount in unique.values()), tuple(sources)

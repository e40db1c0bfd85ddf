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
(libGLX_nvidia). ``ldconfig -p`` inside the container lists them through the generated
``/etc/ld.so.cache`` (``adjust.loader``, added by the daemon for the container's image).

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

No hooks: the spec itself carries everything, so nothing runs in or against the container's rootfs
on the host's behalf; that hook-less design is the point. (The libcuda env and the generated
``/etc/ld.so.cache`` mount are added by the daemon, ``adjust.loader``.)

The builder is a table of rules (:data:`RULES`), one per kind of artefact, each deciding from the
request's typed values, the selection and the snapshot what the container gets of that kind. A
new kind of host artefact is one discoverer in ``host.discover`` (its items land in
``snapshot.artefacts[name]``) plus one rule here, usually ``artefact_rule(name, wanted)``.

Order is deterministic (device nodes: control nodes, GPUs in snapshot order, capability nodes;
mounts: libraries by group, binaries, IPC, firmware, then artefacts in rule order); destinations
are unique (first wins). Plans are memoized in the snapshot's own cache (``snapshot.cache``), keyed
by the request's device list, capabilities and MIG config/monitor, with the finished protobuf
message, so a repeated request costs a copy.
"""

from __future__ import annotations

import os.path
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nri_plugin.adjust.model import IPC_BIND_OPTIONS, RO_BIND_OPTIONS, Adjustment, MountEdit
from nri_plugin.adjust.proto import build_message
from nri_plugin.adjust.select import (
    VALID_FORMS_HINT,
    Selection,
    describe_devices,
    select_devices,
    show_id,
)
from nri_plugin.errors import ContainerError, DeviceSelectionError, DriverChangedError, RequestError
from nri_plugin.host import (
    DeviceNode,
    DriverSnapshot,
    FileId,
    Gpu,
    HostFile,
    HostRoots,
    IpcPath,
    Library,
    MigDevice,
    drm_artefact,
    hot_path_checks,
    strip_root,
    verify,
)
from nri_plugin.request import (
    ALL_DRIVER_CAPABILITIES,
    FEATURE_VARIABLES,
    IMEX_KIND,
    GpuRequest,
    MigMode,
    shorten,
)
from nri_plugin.wire import api

LIB_DIRS_64 = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64")
LIB_DIRS_32 = ("/usr/lib/i386-linux-gnu", "/usr/lib")
BIN_DIR = "/usr/bin"
CAPS_DEV_DIR = "/dev/nvidia-caps"
MIG_MINORS_PATH = "/proc/driver/nvidia-caps/mig-minors"
IMEX_DIR = "/dev/nvidia-caps-imex-channels"

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
    ``message`` is the finished protobuf adjustment: callers copy it (``response_message``).
    """

    selection: Selection
    adjustment: Adjustment
    checks: tuple[FileId, ...] = ()
    unpinned: tuple[str, ...] = ()
    message: api.ContainerAdjustment | None = None
    warnings: tuple[str, ...] = ()  # asked for, but this node does not have it (logged, not fatal)

    def response_message(self) -> api.ContainerAdjustment:
        """A fresh copy of the adjustment message (the caller owns it)."""
        msg = api.ContainerAdjustment()
        msg.CopyFrom(self.message if self.message is not None else build_message(self.adjustment))
        return msg


# The memo keys are container-controlled strings.  Requests whose strings are longer than this
# in all (64 MIG UUIDs are under 3 KiB) are computed without the memo, so that it holds at most
# 512 small keys instead of 512 values of several MB each.
MEMO_MAX_KEY_CHARS = 8192


def _memo_key(request: GpuRequest) -> tuple[str, ...]:
    return (
        request.devices,
        request.driver_capabilities,
        request.mig_config_devices,
        request.mig_monitor_devices,
        ",".join(request.imex_channels),
        ",".join(sorted(request.features)),
        "privileged" if request.privileged else "",
    )


def plan(request: GpuRequest, snapshot: DriverSnapshot) -> Plan:
    """Selection and adjustment of ``request`` on ``snapshot`` (memoized in ``snapshot.cache``;
    errors are not cached)."""
    key = _memo_key(request)
    if sum(map(len, key)) > MEMO_MAX_KEY_CHARS:
        return _make_plan(request, snapshot)
    cache_key = ("plan", *key)
    cached = snapshot.cache.get(cache_key)
    if isinstance(cached, Plan):
        return cached
    made = _make_plan(request, snapshot)
    snapshot.cache.put(cache_key, made)
    return made


def select_for_request(request: GpuRequest, snapshot: DriverSnapshot) -> Selection:
    """The request's device selection on ``snapshot`` (memoized in ``snapshot.cache``). An
    unknown device fails with the variable and value at fault and this node's devices."""
    if len(request.devices) > MEMO_MAX_KEY_CHARS:
        return _select(request, snapshot)
    cache_key = ("select", request.devices)
    cached = snapshot.cache.get(cache_key)
    if isinstance(cached, Selection):
        return cached
    selection = _select(request, snapshot)
    snapshot.cache.put(cache_key, selection)
    return selection


def _select(request: GpuRequest, snapshot: DriverSnapshot) -> Selection:
    try:
        return select_devices(request.device_ids, snapshot)
    except DeviceSelectionError as exc:
        error = DeviceSelectionError(
            f"{request.devices_source}={shorten(request.devices)}: {show_id(exc.device_id)}: unknown "
            f"device; {describe_devices(snapshot)}; {VALID_FORMS_HINT}; `nvidia-nri-plugin info` "
            "lists every id this node accepts"
        )
        error.device_id = exc.device_id
        raise error from None


def build_adjustment(request: GpuRequest, snapshot: DriverSnapshot) -> Adjustment:
    """The container adjustment for ``request`` on ``snapshot``; see the module docstring."""
    return plan(request, snapshot).adjustment


# --- the rules -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Need:
    """What a rule decides from: the request's typed values, its selection, the snapshot."""

    snapshot: DriverSnapshot
    selection: Selection
    caps: frozenset[str]
    config_all: bool  # NVIDIA_MIG_CONFIG_DEVICES=all
    monitor_all: bool  # NVIDIA_MIG_MONITOR_DEVICES=all
    request: GpuRequest  # the other typed values (IMEX channels, gated features, management)

    def graphics(self) -> bool:
        return "graphics" in self.caps or "display" in self.caps


Edit = DeviceNode | tuple[str, MountEdit]
"""What a rule yields: a device node, or a mount with the host path (as this process reads it)
of its source, which must be pinned."""
Rule = Callable[[Need], Iterable[Edit]]


def _make_plan(request: GpuRequest, snapshot: DriverSnapshot) -> Plan:
    selection = select_for_request(request, snapshot)
    caps = _capabilities(request)
    need = Need(
        snapshot=snapshot,
        selection=selection,
        caps=caps,
        config_all=_mig_all(
            "NVIDIA_MIG_CONFIG_DEVICES",
            "mig-config",
            request.mig_config,
            request.mig_config_devices,
            request,
            selection,
        ),
        monitor_all=_mig_all(
            "NVIDIA_MIG_MONITOR_DEVICES",
            "mig-monitor",
            request.mig_monitor,
            request.mig_monitor_devices,
            request,
            selection,
        ),
        request=request,
    )
    _check_key_libraries(snapshot, caps)
    devices: dict[str, DeviceNode] = {}
    mounts: dict[str, tuple[str, MountEdit]] = {}
    for _name, rule in RULES:
        for edit in rule(need):
            if isinstance(edit, DeviceNode):
                devices.setdefault(edit.path, edit)
            else:
                mounts.setdefault(edit[1].destination, edit)
    adjustment = Adjustment(devices=tuple(devices.values()), mounts=tuple(m for _, m in mounts.values()))
    sources = tuple(dict.fromkeys(source for source, _ in mounts.values()))
    pins = snapshot.pins
    return Plan(
        selection,
        adjustment,
        checks=hot_path_checks(pins[src] for src in sources if src in pins),
        unpinned=tuple(src for src in sources if src not in pins),
        message=build_message(adjustment),
        warnings=tuple(_feature_warnings(request, snapshot)),
    )


def _feature_warnings(request: GpuRequest, snapshot: DriverSnapshot) -> Iterator[str]:
    if request.management and not request.privileged:
        yield (
            f"{request.devices_source}: management.nvidia.com/gpu=all in an unprivileged container: "
            "given every GPU and control node but not the MIG config/monitor capabilities or the IMEX "
            "channels; run the management agent privileged if it needs them"
        )
    for variable, feature in FEATURE_VARIABLES:
        if feature in request.features and not any(
            isinstance(item, DeviceNode) for item in snapshot.artefacts.get(feature, ())
        ):
            yield (
                f"{variable}=enabled, but this node has none of its device nodes "
                f"({FEATURE_NODES[feature]}); the container gets nothing for it: load the driver "
                "module on the node, or drop the variable"
            )


def _capabilities(request: GpuRequest) -> frozenset[str]:
    unknown = sorted(request.capabilities - KNOWN_CAPABILITIES)
    if unknown:
        raise RequestError(
            f"NVIDIA_DRIVER_CAPABILITIES={request.driver_capabilities!r}: unknown driver capability "
            f"{unknown[0]!r}; use a comma list of {ALL_DRIVER_CAPABILITIES} or 'all'"
        )
    return request.capabilities


def _mig_all(
    variable: str, what: str, mode: MigMode, value: str, request: GpuRequest, selection: Selection
) -> bool:
    """True when the variable (raw ``value``, parsed ``mode``) asks for the global MIG
    config/monitor mode (only ``all`` exists)."""
    if mode.unsupported is not None:
        raise ContainerError(
            f"{variable}={show_id(value)}: {show_id(mode.unsupported)}: only 'all' devices are currently "
            f"supported; set {variable}=all or unset it"
        )
    if not mode.all:
        return False
    if not request.all_devices and selection.mig_devices:
        raise ContainerError(
            f"{variable}=all: cannot enable {what} with specific MIG devices selected; "
            f"set NVIDIA_VISIBLE_DEVICES=all or unset {variable}"
        )
    return True


# Capabilities that mount driver libraries but have no single key library (a headless driver has
# no graphics libraries, some have no video ones: those are skipped, as libnvidia-container does).
# With *no* driver library found at all, though, the ld.so.cache was unreadable or redirected, and
# such a container would start with device nodes and nothing to use them with.
_LIBRARY_CAPABILITIES = frozenset({"video", "graphics", "display", "ngx", "compat32"})


def _rediscover_if_rejected_changed(what: str, snapshot: DriverSnapshot) -> None:
    """Raise :class:`DriverChangedError` when a candidate discovery rejected has changed since
    (e.g. the library that was a dangling link mid-upgrade is back): rediscover, do not fail."""
    changed = verify(snapshot.rejected)
    if changed is not None:
        raise DriverChangedError(
            f"{what} unusable at discovery and has changed since ({changed}); rediscovering"
        )


def _check_key_libraries(snapshot: DriverSnapshot, caps: frozenset[str]) -> None:
    without_key = sorted(caps & _LIBRARY_CAPABILITIES)
    if without_key and not any(snapshot.libraries.values()) and not (caps & KEY_LIBRARIES.keys()):
        _rediscover_if_rejected_changed("the driver libraries were", snapshot)
        raise ContainerError(
            f"NVIDIA_DRIVER_CAPABILITIES includes {without_key[0]!r}, but no driver library at all "
            f"(driver {snapshot.driver_version}) was found through the ld.so.cache of the driver root "
            f"{snapshot.roots.driver_root!r}; run `ldconfig` on the host (or in the driver container), "
            "check the driver installation, and see `nvidia-nri-plugin info`"
        )
    for cap in sorted(caps):
        key = KEY_LIBRARIES.get(cap)
        if key is None:
            continue
        group, prefix = key
        if not any(lib.soname.startswith(prefix) for lib in snapshot.libraries.get(group, ())):
            _rediscover_if_rejected_changed(f"the driver library {prefix}* was", snapshot)
            raise ContainerError(
                f"NVIDIA_DRIVER_CAPABILITIES includes {cap!r}, but the driver library {prefix}* "
                f"(driver {snapshot.driver_version}) was not found through the ld.so.cache of the "
                f"driver root {snapshot.roots.driver_root!r}; run `ldconfig` on the host (or in the "
                "driver container), check the driver installation, and see `nvidia-nri-plugin info`"
            )


# --- device node rules -------------------------------------------------------------------------


def _node(snapshot: DriverSnapshot, path: str, why: str, *, required: bool) -> DeviceNode | None:
    """The node at ``path``; a node that exists with the wrong numbers always fails ``why``, a
    missing one only when ``required``."""
    node = snapshot.device_nodes.get(path)
    if node is not None:
        return node
    problem = snapshot.invalid_nodes.get(path)
    if problem is not None:
        raise ContainerError(
            f"{why}: device node {path} exists but is wrong ({problem}); recreate it with the "
            f"driver's numbers (remove it and run `nvidia-modprobe`, or `nvidia-ctk system "
            "create-device-nodes`)"
        )
    if required:
        raise ContainerError(
            f"{why}: device node {path} is missing under the dev root {snapshot.roots.dev_root!r}; "
            f"{CREATE_NODES_HINT}"
        )
    return None


def control_nodes(need: Need) -> Iterator[Edit]:
    """``/dev/nvidiactl`` always; UVM with compute or video, modeset with display, if present."""
    snap, caps = need.snapshot, need.caps
    wanted: list[tuple[str, str, bool]] = [("/dev/nvidiactl", "the NVIDIA control device", True)]
    if "compute" in caps or "video" in caps:
        why = "the unified memory device (compute, video)"
        wanted += [("/dev/nvidia-uvm", why, False), ("/dev/nvidia-uvm-tools", why, False)]
    if "display" in caps:
        wanted.append(("/dev/nvidia-modeset", "the mode-setting device (display)", False))
    for path, why, required in wanted:
        node = _node(snap, path, why, required=required)
        if node is not None:
            yield node


def gpu_nodes(need: Need) -> Iterator[Edit]:
    """``/dev/nvidia<minor>`` of every selected GPU (and parent of a selected MIG device)."""
    for gpu in need.selection.gpus:
        node = _node(need.snapshot, f"/dev/nvidia{gpu.minor}", f"GPU {gpu.index} ({gpu.uuid})", required=True)
        assert node is not None
        yield node


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


def mig_access_nodes(need: Need) -> Iterator[Edit]:
    """The GI and CI access capability nodes of every selected MIG device (all required)."""
    snap = need.snapshot
    for mig in need.selection.mig_devices:
        for cap in _mig_access_caps(mig):
            minor = snap.mig_minors.get(cap)
            if minor is None:
                raise ContainerError(
                    f"MIG device {mig.uuid}: capability {cap!r} is not listed in {MIG_MINORS_PATH}; "
                    "the MIG layout changed since the plugin read the host: restart the plugin "
                    "(or check that the nvidia-caps module is loaded)"
                )
            path = f"{CAPS_DEV_DIR}/nvidia-cap{minor}"
            node = snap.device_nodes.get(path)
            if node is None:
                raise ContainerError(
                    f"MIG device {mig.uuid}: device node {path} ({cap}) is missing under the dev root "
                    f"{snap.roots.dev_root!r}; create it with `nvidia-modprobe -f {_cap_proc_path(cap)}`"
                )
            yield node


def mig_mode_nodes(need: Need) -> Iterator[Edit]:
    """``NVIDIA_MIG_CONFIG_DEVICES`` / ``NVIDIA_MIG_MONITOR_DEVICES=all``: the config (monitor)
    capability and every access capability of the selected MIG-enabled GPUs, where present."""
    snap = need.snapshot
    for enabled, global_cap in ((need.config_all, "config"), (need.monitor_all, "monitor")):
        if not enabled:
            continue
        wanted: list[str] = [global_cap]
        for gpu in need.selection.gpus:
            if gpu.mig_enabled:
                wanted.extend(_gpu_access_caps(gpu, snap.mig_minors))
        for cap in wanted:
            minor = snap.mig_minors.get(cap)
            node = None if minor is None else snap.device_nodes.get(f"{CAPS_DEV_DIR}/nvidia-cap{minor}")
            if node is not None:
                yield node


# --- mount rules -------------------------------------------------------------------------------


def _library_mounts(libraries: Iterable[Library], dirs: tuple[str, ...], roots: HostRoots) -> Iterator[Edit]:
    for lib in libraries:
        names = [lib.file_name, lib.soname]
        names.extend(extra for prefix, extra in EXTRA_LIBRARY_NAMES if lib.soname.startswith(prefix))
        source = roots.to_host(lib.host_path)
        for directory in dirs:
            for name in names:
                yield lib.host_path, MountEdit(source, f"{directory}/{name}", RO_BIND_OPTIONS)


def _library_groups(caps: frozenset[str]) -> list[str]:
    groups = {group for cap in caps for group in LIBRARY_GROUPS.get(cap, ())}
    return [group for group in LIBRARY_GROUP_ORDER if group in groups]


def libraries(need: Need) -> Iterator[Edit]:
    """The 64-bit libraries of the groups the capabilities select, in both library directories."""
    snap = need.snapshot
    for group in _library_groups(need.caps):
        yield from _library_mounts(snap.libraries.get(group, ()), LIB_DIRS_64, snap.roots)


def libraries32(need: Need) -> Iterator[Edit]:
    """With compat32: the 32-bit variants of the same groups."""
    if "compat32" in need.caps:
        snap = need.snapshot
        for group in _library_groups(need.caps):
            yield from _library_mounts(snap.libraries32.get(group, ()), LIB_DIRS_32, snap.roots)


def binaries(need: Need) -> Iterator[Edit]:
    """Utility binaries with utility, MPS binaries with compute, at /usr/bin/<name>."""
    snap = need.snapshot
    for group in ("utility", "compute"):
        if group in need.caps:
            for host_path in snap.binaries.get(group, ()):
                dest = f"{BIN_DIR}/{os.path.basename(host_path)}"
                yield host_path, MountEdit(snap.roots.to_host(host_path), dest, RO_BIND_OPTIONS)


def ipc(need: Need) -> Iterator[Edit]:
    """persistenced/fabricmanager sockets with utility, the MPS pipe directory with compute or
    video; always at the fixed container path, never where the entry resolved."""
    snap, caps = need.snapshot, need.caps
    wanted: list[IpcPath | None] = []
    if "utility" in caps:
        wanted += [snap.persistenced_socket, snap.fabricmanager_socket]
    if "compute" in caps or "video" in caps:
        wanted.append(snap.mps_pipe_dir)
    for entry in wanted:
        if entry is not None:
            source = snap.roots.to_host(entry.host_path)
            yield entry.host_path, MountEdit(source, entry.container_path, IPC_BIND_OPTIONS)


def firmware(need: Need) -> Iterator[Edit]:
    """GSP firmware of this driver version, for every GPU container, at its driver-root path."""
    snap = need.snapshot
    for host_path in snap.firmware:
        dest = strip_root(snap.roots.driver_root, host_path)
        yield host_path, MountEdit(snap.roots.to_host(host_path), dest, RO_BIND_OPTIONS)


def _privileged_only_nodes(snapshot: DriverSnapshot) -> frozenset[str]:
    """The management nodes only a privileged container gets: the MIG config and monitor
    capabilities (what NVIDIA_MIG_CONFIG/MONITOR_DEVICES need privilege for)."""
    return frozenset(
        f"{CAPS_DEV_DIR}/nvidia-cap{snapshot.mig_minors[cap]}"
        for cap in ("config", "monitor")
        if cap in snapshot.mig_minors
    )


def management_nodes(need: Need) -> Iterator[Edit]:
    """``management.nvidia.com/gpu=all``: every NVIDIA device node the node has (control, GPUs,
    MIG capabilities) and every IMEX channel, as the toolkit's management CDI spec lists them
    (not the nvidia-fs, NVSwitch or NVLink nodes, which their own features bring). An unprivileged
    container gets neither the MIG config/monitor capabilities nor the IMEX channels: the toolkit
    gives management devices only to trusted namespaces, and the hook's privilege rule for the MIG
    variables must not be sidestepped by a device name."""
    if not need.request.management:
        return
    withheld = frozenset() if need.request.privileged else _privileged_only_nodes(need.snapshot)
    for node in need.snapshot.device_nodes.values():
        if node.path not in withheld:
            yield node
    if need.request.privileged:
        for item in need.snapshot.artefacts.get("imex-channels", ()):
            if isinstance(item, DeviceNode):
                yield item


def _shown_channels(nodes: Iterable[DeviceNode]) -> str:
    minors = [str(node.minor) for node in nodes]
    if not minors:
        return "none"
    return ", ".join(minors[:16]) + (f" ... ({len(minors)} in all)" if len(minors) > 16 else "")


def imex_channels(need: Need) -> Iterator[Edit]:
    """The requested IMEX channels (``all``: every channel node of the node); a channel the node
    has no node for fails the container."""
    wanted = need.request.imex_ids
    if not wanted:
        return
    nodes = [n for n in need.snapshot.artefacts.get("imex-channels", ()) if isinstance(n, DeviceNode)]
    if "all" in wanted:
        yield from nodes
        return
    by_minor = {node.minor: node for node in nodes}
    for channel in wanted:
        node = by_minor.get(int(channel))
        if node is None:
            raise ContainerError(
                f"IMEX channel {channel} was requested (NVIDIA_IMEX_CHANNELS, an imex/ device mount or "
                f"{IMEX_KIND}={channel}), but this node has no {IMEX_DIR}/channel{channel} (its channels: "
                f"{_shown_channels(nodes)}); create it on the node with `nvidia-modprobe -i {channel}` "
                "(or let the IMEX daemon's channel allocation do it), or request an existing channel; "
                "see `nvidia-nri-plugin info`"
            )
        yield node


def fabricmanager_for_nvswitch(need: Need) -> Iterator[Edit]:
    """``NVIDIA_NVSWITCH=enabled``: fabricmanager's socket too (also without ``utility``)."""
    entry = need.snapshot.fabricmanager_socket
    if "nvswitch" in need.request.features and entry is not None:
        source = need.snapshot.roots.to_host(entry.host_path)
        yield entry.host_path, MountEdit(source, entry.container_path, IPC_BIND_OPTIONS)


def drm_nodes(need: Need) -> Iterator[Edit]:
    """With graphics or display: ``/dev/dri/card*`` and ``renderD*`` of each selected full GPU
    (a GPU in MIG mode has none usable: its MIG devices carry no display engine here)."""
    if need.graphics():
        for gpu in need.selection.gpus:
            if not gpu.mig_enabled:
                for item in need.snapshot.artefacts.get(drm_artefact(gpu.bus_id), ()):
                    if isinstance(item, DeviceNode):
                        yield item


def gbm_backend(need: Need) -> Iterator[Edit]:
    """With graphics or display: the GBM backend ``gbm/nvidia-drm_gbm.so``, which the driver
    installs as a link to ``libnvidia-allocator.so.1``, as a file in each library directory."""
    if need.graphics():
        snap = need.snapshot
        for lib in snap.libraries.get("compute", ()):
            if lib.soname.startswith("libnvidia-allocator.so."):
                for directory in LIB_DIRS_64:
                    dest = f"{directory}/gbm/nvidia-drm_gbm.so"
                    yield lib.host_path, MountEdit(snap.roots.to_host(lib.host_path), dest, RO_BIND_OPTIONS)


def artefact_rule(name: str, wanted: Callable[[Need], bool]) -> Rule:
    """The rule for ``snapshot.artefacts[name]``: all of them (device nodes, and files mounted
    read-only or, for writable ones, like IPC) when ``wanted(need)``."""

    def rule(need: Need) -> Iterator[Edit]:
        if not wanted(need):
            return
        roots = need.snapshot.roots
        for item in need.snapshot.artefacts.get(name, ()):
            if isinstance(item, HostFile):
                options = IPC_BIND_OPTIONS if item.writable else RO_BIND_OPTIONS
                yield item.host_path, MountEdit(roots.to_host(item.host_path), item.container_path, options)
            else:
                yield item

    return rule


# In order: device nodes (control, GPUs, capabilities), then mounts; artefact rules last.
RULES: tuple[tuple[str, Rule], ...] = (
    ("control nodes", control_nodes),
    ("GPU nodes", gpu_nodes),
    ("MIG access nodes", mig_access_nodes),
    ("MIG config/monitor nodes", mig_mode_nodes),
    ("libraries", libraries),
    ("32-bit libraries", libraries32),
    ("binaries", binaries),
    ("IPC", ipc),
    ("firmware", firmware),
    ("management nodes", management_nodes),
    ("IMEX channels", imex_channels),
    ("GPUDirect Storage", artefact_rule("gds", lambda need: "gds" in need.request.features)),
    ("MOFED", artefact_rule("mofed", lambda need: "mofed" in need.request.features)),
    ("GDRCopy", artefact_rule("gdrcopy", lambda need: "gdrcopy" in need.request.features)),
    ("NVSwitch", artefact_rule("nvswitch", lambda need: "nvswitch" in need.request.features)),
    ("NVSwitch fabricmanager", fabricmanager_for_nvswitch),
    ("DRM nodes", drm_nodes),
    ("graphics files", artefact_rule("graphics-files", Need.graphics)),
    ("GBM backend", gbm_backend),
    ("display files", artefact_rule("display-files", lambda need: "display" in need.caps)),
    ("OpenCL ICD", artefact_rule("opencl-icd", lambda need: "compute" in need.caps)),
)

# What each gated feature's device nodes are (for the message when a node has none).
FEATURE_NODES: Mapping[str, str] = MappingProxyType(
    {
        "gds": "/dev/nvidia-fs*",
        "mofed": "/dev/infiniband/uverbs*, /dev/infiniband/rdma_cm",
        "gdrcopy": "/dev/gdrdrv",
        "nvswitch": "/dev/nvidia-nvswitchctl, /dev/nvidia-nvswitch*",
    }
)

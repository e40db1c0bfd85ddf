"""Host driver discovery: read the host (below the configured roots) into a ``DriverSnapshot``.

Runs at start-up and whenever the driver changes -- never on the CreateContainer hot path. It may take
tens of milliseconds (plus the NVML child process); the snapshot it returns is then read in O(1).

Rules follow libnvidia-container (reference nvidia-toolkit.md §1.2-§1.6, §2.5):

* libraries come from the driver root's ``ld.so.cache``: ELF entries of the machine's architecture
  whose key *starts with* one of the wanted names, resolved inside the driver root, kept only if the
  resolved file name ends with the driver version; a later passing entry replaces an earlier one.
  The ``libnvidia-tls`` ELF ABI-tag check (2.3.99) is not done: the version-suffix check already
  pins the file to this driver, and the ABI tag only distinguished pre-2.3.99 glibc variants;
* binaries are searched in the CLI's default PATH below the driver root;
* device facts come from NVML (in a child process) when ``libnvidia-ml.so.1`` is in the cache and
  loads, else from ``/proc/driver/nvidia/gpus/*/information``;
* device nodes are stat'ed under the dev root and must be char devices with the expected numbers.
"""

from __future__ import annotations

import glob
import itertools
import os
import platform
import re
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.ldcache import LdCacheEntry, read_ldcache
from nri_plugin.host.model import (
    NVIDIA_MAJOR,
    DeviceNode,
    DriverSnapshot,
    FileId,
    Gpu,
    HostFile,
    HostRoots,
    IpcPath,
    Library,
)
from nri_plugin.host.nvml import NvmlInfo, query_nvml
from nri_plugin.host.paths import resolve_in_root
from nri_plugin.host.pin import kind_name, pin, pin_resolution, unique_checks
from nri_plugin.host.procfs import (
    parse_driver_version,
    parse_key_values,
    parse_mig_minors,
    parse_proc_devices,
    read_proc_gpus,
    read_text,
)

# Library name prefixes per capability group (libnvidia-container nvc_info.c; reference §1.2).
# The non-GLVND group (libGL.so, libEGL.so, ...) is deliberately not listed: it is only used with
# the driver option "no-glvnd".
LIBRARY_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "utility": ("libnvidia-ml.so", "libnvidia-cfg.so", "libnvidia-nscq.so"),
        "compute": (
            "libcuda.so",
            "libcudadebugger.so",
            "libnvidia-opencl.so",
            "libnvidia-gpucomp.so",
            "libnvidia-ptxjitcompiler.so",
            "libnvidia-fatbinaryloader.so",
            "libnvidia-allocator.so",
            "libnvidia-compiler.so",
            "libnvidia-pkcs11.so",
            "libnvidia-pkcs11-openssl3.so",
            "libnvidia-nvvm.so",
            "libnvidia-tileiras.so",
        ),
        "video": ("libvdpau_nvidia.so", "libnvidia-encode.so", "libnvidia-opticalflow.so", "libnvcuvid.so"),
        "graphics": (
            "libnvidia-eglcore.so",
            "libnvidia-glcore.so",
            "libnvidia-tls.so",
            "libnvidia-glsi.so",
            "libnvidia-fbc.so",
            "libnvidia-ifr.so",
            "libnvidia-rtcore.so",
            "libnvoptix.so",
        ),
        "graphics-glvnd": (
            "libGLX_nvidia.so",
            "libEGL_nvidia.so",
            "libGLESv2_nvidia.so",
            "libGLESv1_CM_nvidia.so",
            "libnvidia-glvkspirv.so",
            "libnvidia-cbl.so",
        ),
        "ngx": ("libnvidia-ngx.so",),
    }
)

BINARY_GROUPS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "utility": ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced", "nv-fabricmanager"),
        "compute": ("nvidia-cuda-mps-control", "nvidia-cuda-mps-server"),
    }
)

BINARY_SEARCH_PATH: tuple[str, ...] = (
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
)

PERSISTENCED_SOCKETS = ("/run/nvidia-persistenced/socket", "/var/run/nvidia-persistenced/socket")
FABRICMANAGER_SOCKETS = ("/run/nvidia-fabricmanager/socket", "/var/run/nvidia-fabricmanager/socket")
FIRMWARE_DIR = "/lib/firmware/nvidia"
NVML_SONAME = "libnvidia-ml.so.1"

# Device-node names in /proc/devices (before driver 550 the main one was "nvidia-frontend").
DEFAULT_ROOTS = HostRoots()  # production: everything below "/"

UVM_DEVICE = "nvidia-uvm"
CAPS_DEVICE = "nvidia-caps"
IMEX_DEVICE = "nvidia-caps-imex-channels"
IMEX_DIR = "/dev/nvidia-caps-imex-channels"
MISC_MAJOR = 10  # rdma_cm is a misc device
DRM_MAJOR = 226
MAX_DIR_ENTRIES = 8192  # bound on the entries read from one /dev or sysfs directory
# Where the toolkit's graphics discoverer looks for configuration files: /etc, then $XDG_DATA_DIRS
# (default /usr/local/share:/usr/share); found files are mounted at the same path.
CONFIG_DIRS = ("/etc", "/usr/local/share", "/usr/share")
GRAPHICS_CONFIGS = (
    "vulkan/icd.d/nvidia_icd.json",
    "vulkan/icd.d/nvidia_icd.x86_64.json",
    "vulkan/icd.d/nvidia_icd.aarch64.json",
    "vulkan/icd.d/nvidia_layers.json",
    "vulkan/implicit_layer.d/nvidia_layers.json",
    "glvnd/egl_vendor.d/10_nvidia.json",
    "egl/egl_external_platform.d/09_nvidia_wayland2.json",
    "egl/egl_external_platform.d/10_nvidia_wayland.json",
    "egl/egl_external_platform.d/15_nvidia_gbm.json",
    "egl/egl_external_platform.d/20_nvidia_xcb.json",
    "egl/egl_external_platform.d/20_nvidia_xlib.json",
    "nvidia/nvoptix.bin",
)
XORG_CONFIGS = ("X11/xorg.conf.d/10-nvidia.conf", "X11/xorg.conf.d/nvidia-drm-outputclass.conf")
XORG_MODULE_DIRS = (
    "/usr/lib/x86_64-linux-gnu/nvidia/xorg",
    "/usr/lib/xorg/modules/drivers",
    "/usr/lib/xorg/modules/extensions",
    "/usr/lib/xorg/modules/updates/drivers",
    "/usr/lib/xorg/modules/updates/extensions",
    "/usr/lib64/xorg/modules/drivers",
    "/usr/lib64/xorg/modules/extensions",
    "/usr/X11R6/lib/modules/drivers",
    "/usr/X11R6/lib/modules/extensions",
)
EGL_PLATFORM_LIBRARIES = (
    "libnvidia-egl-gbm.so",
    "libnvidia-egl-wayland.so",
    "libnvidia-egl-wayland2.so",
    "libnvidia-egl-xcb.so",
    "libnvidia-egl-xlib.so",
)
# The container directories every library goes to (adjust.build.LIB_DIRS_64; host cannot import it).
CONTAINER_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64")


@dataclass(frozen=True, slots=True)
class Arches:
    """ld.so.cache architecture names for native (64-bit) libraries and for compat32 libraries."""

    native: str
    compat32: str | None


def machine_arches(machine: str | None = None) -> Arches:
    m = machine or platform.machine()
    if m in ("x86_64", "amd64"):
        return Arches("x86-64", "i386")
    if m in ("aarch64", "arm64"):
        return Arches("aarch64", None)
    if m in ("ppc64le", "ppc64"):
        return Arches("ppc64", None)
    raise HostDiscoveryError(f"machine architecture {m!r} is not supported (x86_64, aarch64, ppc64le are)")


@dataclass
class _Notes:
    items: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        if text not in self.items:
            self.items.append(text)


# --------------------------------------------------------------------------------------- libraries


def _driver_version_from_name(file_name: str, soname_prefix: str) -> str | None:
    """``libcuda.so.550.54.14`` -> ``550.54.14`` (the toolkit infers the version this way)."""
    prefix = soname_prefix + "."
    if not file_name.startswith(prefix):
        return None
    rest = file_name[len(prefix) :]
    parts = rest.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts):
        return rest
    return None


# Rejected library candidates remembered for the "did the missing library come back?" check on the
# hot path (``DriverSnapshot.rejected``): a crafted cache with a million entries must not make it
# unbounded.
MAX_REJECTED = 64


def select_libraries(
    entries: Iterable[LdCacheEntry],
    driver_root: str,
    arch: str,
    driver_version: str,
    notes: _Notes | None = None,
    *,
    is_32bit: bool = False,
    rejected: list[str] | None = None,
) -> dict[str, tuple[Library, ...]]:
    """Group -> libraries of ``arch`` from ``entries`` (see module doc for the rules).

    ``rejected`` collects the cache values (paths inside the root) of candidates that did not pass.
    """
    wanted: list[tuple[str, str]] = []  # (group, prefix), each prefix once, group order kept
    seen: set[str] = set()
    for group, prefixes in LIBRARY_GROUPS.items():
        for prefix in prefixes:
            if prefix not in seen:
                seen.add(prefix)
                wanted.append((group, prefix))
    chosen: dict[str, Library] = {}
    for entry in entries:
        if not entry.is_elf or entry.arch != arch:
            continue
        if "/" in entry.key or "\0" in entry.key:
            # The key becomes a file name in the container's library directories; a crafted
            # cache must not be able to steer a mount elsewhere (a real SONAME has no slash).
            continue
        for _group, prefix in wanted:
            if not entry.key.startswith(prefix):
                continue
            host_path = resolve_in_root(driver_root, entry.value)
            previous = chosen.get(prefix)
            if previous is not None and previous.host_path == host_path:
                break
            file_name = os.path.basename(host_path)
            if file_name.endswith(driver_version) and os.path.isfile(host_path):
                chosen[prefix] = Library(
                    soname=entry.key, host_path=host_path, file_name=file_name, is_32bit=is_32bit
                )
            elif rejected is not None and len(rejected) < MAX_REJECTED:
                rejected.append(entry.value)
            break
    out: dict[str, tuple[Library, ...]] = {}
    for group, prefix in wanted:
        lib = chosen.get(prefix)
        if lib is not None:
            out[group] = (*out.get(group, ()), lib)
        elif notes is not None:
            bits = "32-bit " if is_32bit else ""
            notes.add(f"missing {bits}library {prefix} (group {group}, driver {driver_version})")
    return out


# ------------------------------------------------------------------------------------------ binaries


def find_binaries(driver_root: str, notes: _Notes | None = None) -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for group, names in BINARY_GROUPS.items():
        found: list[str] = []
        for name in names:
            for directory in BINARY_SEARCH_PATH:
                host_path = resolve_in_root(driver_root, f"{directory}/{name}")
                try:
                    st = os.stat(host_path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
                    found.append(host_path)
                    break
            else:
                if notes is not None:
                    notes.add(f"missing binary {name} (group {group})")
        if found:
            out[group] = tuple(found)
    return out


# -------------------------------------------------------------------------------------- ipc/firmware


class _Refused(Exception):
    """Internal: an IPC path that exists but must not be mounted; the message says why."""


def _root_owned_link(path: str, st: os.stat_result) -> None:
    if st.st_uid != 0:
        raise _Refused(f"{path} is a symlink owned by uid {st.st_uid}, not root")


def _trusted_owner(st: os.stat_result, parent: str) -> str | None:
    """``None`` when the owner of an entry of ``parent`` is trusted, else why not.

    Trusted: root; or the owner of ``parent`` itself when no one else can write ``parent`` and
    ``parent`` lies in a root-owned directory that only root can write (a daemon that drops
    privileges, e.g. ``nvidia-persistenced --user``, owns ``/run/nvidia-persistenced``; a local user
    can create neither that directory nor anything in it).
    """
    if st.st_uid == 0:
        return None
    why = f"owned by uid {st.st_uid}, not root"
    try:
        parent_st = os.lstat(parent)
        grand_st = os.lstat(os.path.dirname(parent))
    except OSError:
        return why
    if parent_st.st_uid != st.st_uid or parent_st.st_mode & 0o022:
        return why
    if grand_st.st_uid != 0 or grand_st.st_mode & 0o022:
        return why
    return None


def find_ipc(run_root: str, container_path: str, fmt: int, notes: _Notes) -> IpcPath | None:
    """The IPC socket (``fmt`` ``S_IFSOCK``) or directory (``S_IFDIR``) at ``container_path`` below
    the run root, if it exists and may be bind-mounted read-write into containers.

    These paths live in ``/run`` and ``/tmp``, where a local user may create entries; what we
    mount is writable. So: the entry itself must not be a symlink and must be of type ``fmt``;
    symlinks on the way to it are followed (inside the root) only when root owns them (``/var/run``
    -> ``/run``); its owner must be trusted (:func:`_trusted_owner`). A refused entry is noted with
    the reason. The container path is always ``container_path``, never where the entry resolves.
    """
    parent_path, name = os.path.split(container_path.rstrip("/"))
    try:
        parent = resolve_in_root(run_root, parent_path, on_link=_root_owned_link)
        host_path = os.path.join(parent, name)
        try:
            st = os.lstat(host_path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        if stat.S_ISLNK(st.st_mode):
            raise _Refused(f"{host_path} is a symlink (to {os.readlink(host_path)!r})")
        if stat.S_IFMT(st.st_mode) != fmt:
            raise _Refused(f"{host_path} is {kind_name(stat.S_IFMT(st.st_mode))}, not {kind_name(fmt)}")
        why = _trusted_owner(st, parent)
        if why is not None:
            raise _Refused(f"{host_path} is {why}")
    except _Refused as exc:
        notes.add(
            f"refused ipc path {container_path}: {exc} (not mounted into containers; it must be a "
            "root-owned socket or directory, not a symlink: fix the owner of the daemon that creates "
            "it, or remove what someone else planted there)"
        )
        return None
    except OSError as exc:
        notes.add(f"refused ipc path {container_path}: cannot inspect it: {exc.strerror}")
        return None
    return IpcPath(container_path=container_path, host_path=host_path)


def _first_ipc(run_root: str, candidates: Iterable[str], fmt: int, notes: _Notes) -> IpcPath | None:
    for candidate in candidates:
        found = find_ipc(run_root, candidate, fmt, notes)
        if found is not None:
            return found
    return None


def find_firmware(driver_root: str, driver_version: str) -> tuple[str, ...]:
    directory = resolve_in_root(driver_root, f"{FIRMWARE_DIR}/{driver_version}")
    out: list[str] = []
    for candidate in sorted(glob.glob(os.path.join(glob.escape(directory), "gsp*.bin"))):
        # Re-resolve inside the root: the glob result may itself be a symlink.
        rel = os.path.relpath(candidate, os.path.abspath(driver_root))
        host_path = resolve_in_root(driver_root, rel)
        if os.path.isfile(host_path):
            out.append(host_path)
    return tuple(out)


# -------------------------------------------------------------------------------------- device nodes


def _device_node(
    dev_root: str,
    path: str,
    major: int,
    minor: int,
    notes: _Notes,
    *,
    note_absent: bool = True,
    invalid: dict[str, str] | None = None,
) -> DeviceNode | None:
    host_path = resolve_in_root(dev_root, path)
    try:
        st = os.stat(host_path)
    except OSError:
        if note_absent:
            notes.add(f"missing device node {path} ({major}:{minor})")
        return None
    note: str | None = None
    if not stat.S_ISCHR(st.st_mode):
        note = f"not a character device (expected {major}:{minor})"
    elif (os.major(st.st_rdev), os.minor(st.st_rdev)) != (major, minor):
        note = f"is {os.major(st.st_rdev)}:{os.minor(st.st_rdev)}, expected {major}:{minor}"
    if note is not None:
        notes.add(f"invalid device node {path}: {note}")
        if invalid is not None:
            invalid[path] = f"{host_path} {note}"
        return None
    return DeviceNode(
        path=path,
        host_path=host_path,
        type="c",
        major=major,
        minor=minor,
        file_mode=st.st_mode & 0o7777,
        uid=st.st_uid,
        gid=st.st_gid,
    )


def find_device_nodes(
    dev_root: str,
    gpus: Iterable[Gpu],
    char_majors: Mapping[str, int],
    mig_minors: Mapping[str, int],
    notes: _Notes,
    invalid: dict[str, str] | None = None,
) -> dict[str, DeviceNode]:
    wanted: list[tuple[str, int, int]] = [
        ("/dev/nvidiactl", NVIDIA_MAJOR, 255),
        ("/dev/nvidia-modeset", NVIDIA_MAJOR, 254),
    ]
    uvm = char_majors.get(UVM_DEVICE)
    if uvm is not None:
        wanted += [("/dev/nvidia-uvm", uvm, 0), ("/dev/nvidia-uvm-tools", uvm, 1)]
    else:
        notes.add(f"{UVM_DEVICE} is not in /proc/devices: /dev/nvidia-uvm(-tools) unavailable")
    for gpu in gpus:
        wanted.append((f"/dev/nvidia{gpu.minor}", NVIDIA_MAJOR, gpu.minor))
    out: dict[str, DeviceNode] = {}
    for path, major, minor in wanted:
        node = _device_node(dev_root, path, major, minor, notes, invalid=invalid)
        if node is not None:
            out[path] = node
    caps = char_majors.get(CAPS_DEVICE)
    if mig_minors and caps is None:
        notes.add(f"{CAPS_DEVICE} is not in /proc/devices: MIG capability nodes unavailable")
    elif caps is not None:
        # mig-minors lists every possible capability; the driver (nvidia-modprobe) creates the nodes on
        # demand, so only config/monitor are noted one by one and the rest as a count.
        by_minor = {minor: cap for cap, minor in mig_minors.items()}
        absent = 0
        for minor in sorted(by_minor):
            path = f"/dev/nvidia-caps/nvidia-cap{minor}"
            individually = by_minor[minor] in ("config", "monitor")
            node = _device_node(dev_root, path, caps, minor, notes, note_absent=individually)
            if node is not None:
                out[path] = node
            elif not individually and not os.path.lexists(resolve_in_root(dev_root, path)):
                absent += 1
        if absent:
            notes.add(
                f"{absent} MIG capability device nodes listed in mig-minors are absent under "
                f"{resolve_in_root(dev_root, '/dev/nvidia-caps')} (nvidia-modprobe creates them on demand)"
            )
    return out


# ------------------------------------------------------------------------------------------- discover


def _read_ldcache_entries(roots: HostRoots, ldcache_path: str, notes: _Notes) -> list[LdCacheEntry]:
    host_path = resolve_in_root(roots.driver_root, ldcache_path)
    if not os.path.isfile(host_path):
        notes.add(f"ld.so.cache {ldcache_path} not found under driver root {roots.driver_root}")
        return []
    return read_ldcache(host_path)


def _lookup_soname(entries: Iterable[LdCacheEntry], soname: str, arch: str, driver_root: str) -> str | None:
    found: str | None = None
    for entry in entries:
        if entry.is_elf and entry.arch == arch and entry.key == soname:
            host_path = resolve_in_root(driver_root, entry.value)
            if os.path.isfile(host_path):
                found = host_path
    return found


def _proc_mig_minors(proc_root: str) -> dict[str, int]:
    minors: dict[str, int] = {}
    text = read_text(proc_root, "driver/nvidia-caps/mig-minors")
    if text is not None:
        minors.update(parse_mig_minors(text))
    # The CLI reads the config/monitor minors from the capability files; fill gaps from them.
    for cap in ("config", "monitor"):
        if cap in minors:
            continue
        cap_text = read_text(proc_root, f"driver/nvidia/capabilities/mig/{cap}")
        if cap_text is None:
            continue
        minor = parse_key_values(cap_text).get("DeviceFileMinor", "")
        if minor.isdigit():
            minors[cap] = int(minor)
    return minors


def _char_majors(proc_root: str) -> dict[str, int]:
    text = read_text(proc_root, "devices")
    majors = {k: v for k, v in parse_proc_devices(text or "").items() if k.startswith("nvidia")}
    majors["nvidia"] = NVIDIA_MAJOR  # fixed; "nvidia-frontend" before 550
    return majors


def explain_no_driver(roots: HostRoots = DEFAULT_ROOTS, *, ldcache_path: str = "/etc/ld.so.cache") -> str:
    """Why :func:`discover` found no driver, in words for a DriverNotFoundError."""
    return (
        f"no NVIDIA driver found: {resolve_in_root(roots.proc_root, 'driver/nvidia/version')} does not "
        f"exist and neither {NVML_SONAME} nor libcuda.so.1 is in the ld.so.cache "
        f"{resolve_in_root(roots.driver_root, ldcache_path)}; install the NVIDIA driver and load its kernel "
        f"module, or set the driver root (now {roots.driver_root!r}) to where the driver is installed "
        "(e.g. /run/nvidia/driver for the GPU operator)"
    )


# ------------------------------------------------------------------------------------ composition
#
# Discovery is a list of small discoverers, in the spirit of the toolkit's internal/discover
# (Discover/Merge/FirstValid): each reads one kind of host artefact into the Context and returns
# the DriverSnapshot fields it found, by name. A discoverer may read what earlier ones found
# (``ctx.found``); the device facts come from the first valid of NVML and /proc (``first_valid``).
# Every mount source a discoverer offers is declared with ``ctx.offer`` and pinned at the end.
# A new kind of artefact is one more discoverer here, returning ``{"artefacts": {name: items}}``
# (``HostFile``s, pinned automatically, and ``DeviceNode``s), and one rule in ``adjust.build``.


@dataclass
class Context:
    """What discoverers share: the configuration, the notes, and the results so far."""

    roots: HostRoots
    ldcache_path: str
    use_nvml: bool
    mps_pipe_dir: str
    nvml_timeout: float
    nvml_query: Callable[[str], NvmlInfo] | None
    arches: Arches
    notes: _Notes = field(default_factory=_Notes)
    found: dict[str, Any] = field(default_factory=dict)
    sources: list[tuple[str, str, bool]] = field(default_factory=list)  # (root, host path, by dir)
    artefacts: dict[str, tuple[DeviceNode | HostFile, ...]] = field(default_factory=dict)

    def offer(self, root: str, host_path: str, *, by_directory: bool) -> None:
        """Declare a mount source, to be pinned (``host.pin``) before the snapshot is returned."""
        self.sources.append((root, host_path, by_directory))


Discoverer = Callable[[Context], Mapping[str, Any] | None]
"""Reads the host, returns snapshot fields by name (``None``: nothing found, for ``first_valid``)."""


def first_valid(*discoverers: Discoverer) -> Discoverer:
    """The result of the first discoverer that finds something."""

    def run(ctx: Context) -> Mapping[str, Any] | None:
        for discoverer in discoverers:
            found = discoverer(ctx)
            if found is not None:
                return found
        return None

    return run


def _ldcache(ctx: Context) -> Mapping[str, Any]:
    entries = _read_ldcache_entries(ctx.roots, ctx.ldcache_path, ctx.notes)
    native, root = ctx.arches.native, ctx.roots.driver_root
    return {
        "_entries": entries,
        "_nvml_lib": _lookup_soname(entries, NVML_SONAME, native, root),
        "_cuda_lib": _lookup_soname(entries, "libcuda.so.1", native, root),
        "_version_text": read_text(ctx.roots.proc_root, "driver/nvidia/version"),
    }


def _nvml_facts(ctx: Context) -> Mapping[str, Any] | None:
    nvml_lib = ctx.found["_nvml_lib"]
    if not ctx.use_nvml:
        return None
    if nvml_lib is None:
        ctx.notes.add(f"{NVML_SONAME} not in the ld.so.cache: using /proc/driver/nvidia for device facts")
        return None
    try:
        info = ctx.nvml_query(nvml_lib) if ctx.nvml_query else query_nvml(nvml_lib, timeout=ctx.nvml_timeout)
    except HostDiscoveryError as exc:
        ctx.notes.add(f"NVML unavailable, using /proc/driver/nvidia instead: {exc}")
        return None
    return {
        "driver_version": info.driver_version,
        "cuda_version": info.cuda_version,
        "gpus": info.gpus,
        "source": "nvml",
    }


def _proc_facts(ctx: Context) -> Mapping[str, Any]:
    found, roots = ctx.found, ctx.roots
    version = _fallback_driver_version(found["_nvml_lib"], found["_cuda_lib"], found["_version_text"])
    if version is None:
        raise HostDiscoveryError(
            "cannot determine the NVIDIA driver version: no libcuda.so.<version> / "
            f"libnvidia-ml.so.<version> under driver root {roots.driver_root!r} and "
            f"{resolve_in_root(roots.proc_root, 'driver/nvidia/version')} is unreadable; reinstall "
            "the driver or fix the driver root"
        )
    gpus = tuple(
        Gpu(index=i, uuid=g.uuid, minor=g.minor, bus_id=g.bus_id, model=g.model)
        for i, g in enumerate(read_proc_gpus(roots.proc_root))
    )
    return {"driver_version": version, "cuda_version": None, "gpus": gpus, "source": "proc"}


def _kernel_numbers(ctx: Context) -> Mapping[str, Any]:
    proc = ctx.roots.proc_root
    return {
        "char_majors": MappingProxyType(_char_majors(proc)),
        "mig_minors": MappingProxyType(_proc_mig_minors(proc)),
    }


def _libraries(ctx: Context) -> Mapping[str, Any]:
    root, version, entries = ctx.roots.driver_root, ctx.found["driver_version"], ctx.found["_entries"]
    rejected: list[str] = []
    libraries = select_libraries(entries, root, ctx.arches.native, version, ctx.notes, rejected=rejected)
    libraries32: dict[str, tuple[Library, ...]] = {}
    if ctx.arches.compat32 is not None:
        libraries32 = select_libraries(entries, root, ctx.arches.compat32, version, None, is_32bit=True)
    for libs in (libraries, libraries32):
        for group in libs.values():
            for lib in group:
                ctx.offer(root, lib.host_path, by_directory=True)
    return {
        "libraries": MappingProxyType(libraries),
        "libraries32": MappingProxyType(libraries32),
        "rejected": unique_checks(pin_resolution(root, value) for value in rejected),
    }


def _binaries(ctx: Context) -> Mapping[str, Any]:
    binaries = find_binaries(ctx.roots.driver_root, ctx.notes)
    for paths in binaries.values():
        for path in paths:
            ctx.offer(ctx.roots.driver_root, path, by_directory=True)
    return {"binaries": MappingProxyType(binaries)}


def _ipc(ctx: Context) -> Mapping[str, Any]:
    run_root, notes = ctx.roots.run_root, ctx.notes
    persistenced = _first_ipc(run_root, PERSISTENCED_SOCKETS, stat.S_IFSOCK, notes)
    if persistenced is None:
        notes.add("missing ipc path /run/nvidia-persistenced/socket")
    found = {
        "persistenced_socket": persistenced,
        "fabricmanager_socket": _first_ipc(run_root, FABRICMANAGER_SOCKETS, stat.S_IFSOCK, notes),
        "mps_pipe_dir": find_ipc(run_root, ctx.mps_pipe_dir, stat.S_IFDIR, notes),
    }
    for ipc in found.values():
        if ipc is not None:
            ctx.offer(run_root, ipc.host_path, by_directory=False)
    return found


def _firmware(ctx: Context) -> Mapping[str, Any]:
    firmware = find_firmware(ctx.roots.driver_root, ctx.found["driver_version"])
    for path in firmware:
        ctx.offer(ctx.roots.driver_root, path, by_directory=True)
    return {"firmware": firmware}


def _device_nodes(ctx: Context) -> Mapping[str, Any]:
    found, invalid = ctx.found, dict[str, str]()
    nodes = find_device_nodes(
        ctx.roots.dev_root, found["gpus"], found["char_majors"], found["mig_minors"], ctx.notes, invalid
    )
    return {"device_nodes": MappingProxyType(nodes), "invalid_nodes": MappingProxyType(invalid)}


# --- driver features beyond the core: each discoverer offers artefacts for one rule of adjust.build


def _char_node(
    dev_root: str,
    path: str,
    notes: _Notes,
    majors: Mapping[str, int],
    major_name: str | None,
    minor: int | None,
) -> DeviceNode | None:
    """The character device at ``path`` (not followed if a symlink), accepted only when its major
    is the one ``/proc/devices`` lists for ``major_name`` (``None``: the misc major 10) and its
    minor is ``minor`` (``None``: unknown, refused): a node planted under such a name with other
    numbers (``/dev/mem``'s 1:1, ``/dev/kvm``'s 10:232) is refused."""
    host_path = os.path.join(resolve_in_root(dev_root, os.path.dirname(path)), os.path.basename(path))
    try:
        st = os.lstat(host_path)
    except OSError:
        return None
    expected = MISC_MAJOR if major_name is None else majors.get(major_name)
    numbers = (os.major(st.st_rdev), os.minor(st.st_rdev))
    if not stat.S_ISCHR(st.st_mode) or expected is None or minor is None or numbers != (expected, minor):
        why = "not a character device" if not stat.S_ISCHR(st.st_mode) else "is {}:{}".format(*numbers)
        if expected is None:
            wanted = f"{major_name!r} is not in /proc/devices"
        elif minor is None:
            wanted = "its minor is unknown"
        else:
            wanted = f"{expected}:{minor} expected"
        notes.add(f"refused device node {path}: {why} ({wanted})")
        return None
    return DeviceNode(
        path=path,
        host_path=host_path,
        type="c",
        major=numbers[0],
        minor=numbers[1],
        file_mode=st.st_mode & 0o7777,
        uid=st.st_uid,
        gid=st.st_gid,
    )


def _list_dir(dev_root: str, directory: str, pattern: str) -> list[re.Match[str]]:
    """The entry names of ``directory`` below the dev root that match ``pattern`` (at most
    MAX_DIR_ENTRIES of them, sorted), [] if it is absent."""
    wanted = re.compile(pattern)
    try:
        with os.scandir(resolve_in_root(dev_root, directory)) as entries:
            found = (m for m in (wanted.fullmatch(e.name) for e in entries) if m is not None)
            return sorted(itertools.islice(found, MAX_DIR_ENTRIES), key=lambda m: m.string)
    except OSError:
        return []


def _all_majors(ctx: Context) -> Mapping[str, int]:
    cached = ctx.found.get("_all_majors")
    if cached is None:
        cached = parse_proc_devices(read_text(ctx.roots.proc_root, "devices") or "")
        ctx.found["_all_majors"] = cached
    return cast(Mapping[str, int], cached)


def _imex_channels(ctx: Context) -> Mapping[str, Any]:
    """``/dev/nvidia-caps-imex-channels/channel<N>`` nodes with the ``nvidia-caps-imex-channels``
    major and minor N (nvidia-modprobe creates them; the driver numbers them)."""
    nodes: list[DeviceNode] = []
    major = ctx.found["char_majors"].get(IMEX_DEVICE)
    if major is not None:
        for match in _list_dir(ctx.roots.dev_root, IMEX_DIR, r"channel(0|[1-9][0-9]{0,6})"):
            channel, path = int(match.group(1)), f"{IMEX_DIR}/{match.string}"
            node = _device_node(ctx.roots.dev_root, path, major, channel, ctx.notes)
            if node is not None:
                nodes.append(node)
    nodes.sort(key=lambda n: n.minor)
    return {"artefacts": {"imex-channels": tuple(nodes)}}


def _gated_nodes(
    ctx: Context,
    directory: str,
    pattern: str,
    major_name: str | None,
    minor: Callable[[re.Match[str]], int | None],
) -> list[DeviceNode]:
    """The nodes of one gated feature: names matching ``pattern``, with the major ``major_name``
    has in /proc/devices and the minor ``minor(match)`` says the name must have."""
    majors, nodes = _all_majors(ctx), []
    for match in _list_dir(ctx.roots.dev_root, directory, pattern):
        path = f"{directory}/{match.string}"
        node = _char_node(ctx.roots.dev_root, path, ctx.notes, majors, major_name, minor(match))
        if node is not None:
            nodes.append(node)
    return nodes


def _numbered(base: int) -> Callable[[re.Match[str]], int | None]:
    """Minor = ``base`` + the number in the name (group 1)."""
    return lambda match: base + int(match.group(1))


def _misc_minor(ctx: Context, name: str) -> Callable[[re.Match[str]], int | None]:
    """A misc device's minor, from ``/sys/class/misc/<name>/dev`` ("10:58")."""

    def minor(_match: re.Match[str]) -> int | None:
        try:
            with open(os.path.join(ctx.roots.sys_root, "class/misc", name, "dev"), encoding="ascii") as f:
                major, _sep, value = f.read(32).strip().partition(":")
        except (OSError, UnicodeDecodeError):
            return None
        return int(value) if major == str(MISC_MAJOR) and value.isdigit() else None

    return minor


def _gated_features(ctx: Context) -> Mapping[str, Any]:
    """The device nodes (and files) of the toolkit's gated modes, as far as the host has them:
    GPUDirect Storage (nvidia-fs), MOFED (InfiniBand verbs and rdma_cm), GDRCopy, NVSwitch."""
    gds: list[DeviceNode | HostFile] = [
        *_gated_nodes(ctx, "/dev", r"nvidia-fs(0|[1-9][0-9]{0,2})", "nvidia-fs", _numbered(0))
    ]
    if gds:  # the toolkit adds udev's database and cuFile's config when nvidia-fs is there
        udev = find_ipc(ctx.roots.run_root, "/run/udev", stat.S_IFDIR, ctx.notes)
        if udev is not None:
            gds.append(HostFile("/run/udev", udev.host_path, ctx.roots.run_root, pin_self=True))
        cufile = resolve_in_root(ctx.roots.driver_root, "/etc/cufile.json")
        if os.path.isfile(cufile):
            gds.append(HostFile("/etc/cufile.json", cufile, ctx.roots.driver_root))
    mofed = [  # uverbs<N> is minor 192 + N (IB_UVERBS_BASE_MINOR); rdma_cm a misc device
        *_gated_nodes(
            ctx, "/dev/infiniband", r"uverbs(0|[1-9][0-9]{0,2})", "infiniband_verbs", _numbered(192)
        ),
        *_gated_nodes(ctx, "/dev/infiniband", r"rdma_cm", None, _misc_minor(ctx, "rdma_cm")),
    ]
    nvswitch = [  # nvidia-nvswitchctl is minor 255, nvidia-nvswitch<N> minor N (nvidia-modprobe)
        *_gated_nodes(ctx, "/dev", r"nvidia-nvswitch(0|[1-9][0-9]{0,2})", "nvidia-nvswitch", _numbered(0)),
        *_gated_nodes(ctx, "/dev", r"nvidia-nvswitchctl", "nvidia-nvswitch", lambda _: 255),
    ]
    return {
        "artefacts": {
            "gds": tuple(gds),
            "mofed": tuple(mofed),
            "gdrcopy": tuple(_gated_nodes(ctx, "/dev", r"gdrdrv", "gdrdrv", lambda _: 0)),
            "nvswitch": tuple(nvswitch),
        }
    }


def _config_files(ctx: Context, names: Iterable[str], dirs: Sequence[str]) -> list[HostFile]:
    """The first of ``<dir>/<name>`` for each name that is a regular file in the driver root,
    mounted at the same path (the toolkit's search: /etc, then the XDG data dirs)."""
    root, found = ctx.roots.driver_root, []
    for name in names:
        for directory in dirs:
            path = f"{directory}/{name}"
            host_path = resolve_in_root(root, path)
            if os.path.isfile(host_path) and not os.path.islink(host_path):
                found.append(HostFile(path, host_path, root))
                break
    return found


def _graphics_libraries(ctx: Context) -> list[HostFile]:
    """The EGL platform libraries (own version numbers, not the driver's) the external platform
    JSON files name, mounted like the driver libraries: under SONAME and file name in both dirs."""
    out: list[HostFile] = []
    root, native = ctx.roots.driver_root, ctx.arches.native
    seen: set[str] = set()
    for entry in ctx.found["_entries"]:
        if not (entry.is_elf and entry.arch == native and entry.key.startswith(EGL_PLATFORM_LIBRARIES)):
            continue
        if entry.key in seen:
            continue
        host_path = resolve_in_root(root, entry.value)
        if not os.path.isfile(host_path):
            continue
        seen.add(entry.key)
        for directory in CONTAINER_LIB_DIRS:
            for name in dict.fromkeys((entry.key, os.path.basename(host_path))):
                out.append(HostFile(f"{directory}/{name}", host_path, root))
    return out


def _graphics(ctx: Context) -> Mapping[str, Any]:
    """Graphics and display files as the toolkit's graphics discoverer finds them: the Vulkan, EGL
    and GLVND ICD/vendor JSON files and the EGL platform libraries (graphics, display), the X.Org
    driver modules and configuration (display), the OpenCL ICD (compute)."""
    version = ctx.found["driver_version"]
    display = _config_files(ctx, XORG_CONFIGS, ("/usr/share", "/etc"))
    for name in ("nvidia_drv.so", f"libglxserver_nvidia.so.{version}"):
        display += _config_files(ctx, [name], XORG_MODULE_DIRS)
    for found in list(display):  # X.Org loads the GLX module by its unversioned name
        if found.container_path.endswith(f"/libglxserver_nvidia.so.{version}"):
            unversioned = found.container_path.removesuffix(f".{version}")
            display.append(HostFile(unversioned, found.host_path, found.root))
    return {
        "artefacts": {
            "graphics-files": (
                *_config_files(ctx, GRAPHICS_CONFIGS, CONFIG_DIRS),
                *_graphics_libraries(ctx),
            ),
            "display-files": tuple(display),
            "opencl-icd": tuple(_config_files(ctx, ["OpenCL/vendors/nvidia.icd"], CONFIG_DIRS)),
        }
    }


def drm_artefact(bus_id: str) -> str:
    """The artefact name of the DRM nodes of the GPU at ``bus_id``."""
    return f"drm {bus_id}"


def _drm(ctx: Context) -> Mapping[str, Any]:
    """``/dev/dri/card*`` and ``renderD*`` of each GPU, matched through sysfs
    (``/sys/bus/pci/devices/<bus id>/drm/<name>``) and checked to be DRM nodes (major 226)."""
    found: dict[str, tuple[DeviceNode, ...]] = {}
    for gpu in ctx.found["gpus"]:
        domain, rest = gpu.bus_id.split(":", 1)
        sysfs = os.path.join(ctx.roots.sys_root, "bus/pci/devices", f"{int(domain, 16):04x}:{rest}", "drm")
        try:
            names = sorted(itertools.islice(os.listdir(sysfs), MAX_DIR_ENTRIES))
        except OSError:
            continue
        nodes = []
        for name in names:
            match = re.fullmatch(r"(card|renderD)([0-9]{1,4})", name)
            if match is not None:
                minor = int(match.group(2))
                node = _device_node(ctx.roots.dev_root, f"/dev/dri/{name}", DRM_MAJOR, minor, ctx.notes)
                if node is not None:
                    nodes.append(node)
        found[drm_artefact(gpu.bus_id)] = tuple(nodes)
    return {"artefacts": found}


# In order: each may read what the ones before it found.
DISCOVERERS: tuple[tuple[str, Discoverer], ...] = (
    ("ldcache", _ldcache),
    ("device facts", first_valid(_nvml_facts, _proc_facts)),
    ("kernel numbers", _kernel_numbers),
    ("libraries", _libraries),
    ("binaries", _binaries),
    ("ipc", _ipc),
    ("firmware", _firmware),
    ("device nodes", _device_nodes),
    ("imex channels", _imex_channels),
    ("gated features", _gated_features),
    ("graphics", _graphics),
    ("drm", _drm),
)


def _has_driver(ctx: Context) -> bool:
    found = ctx.found
    return not (found["_nvml_lib"] is None and found["_cuda_lib"] is None and found["_version_text"] is None)


def discover(
    roots: HostRoots = DEFAULT_ROOTS,
    *,
    ldcache_path: str = "/etc/ld.so.cache",
    use_nvml: bool = True,
    mps_pipe_dir: str = "/tmp/nvidia-mps",
    nvml_timeout: float = 20.0,
    nvml_query: Callable[[str], NvmlInfo] | None = None,
    machine: str | None = None,
    discoverers: Sequence[tuple[str, Discoverer]] = DISCOVERERS,
) -> DriverSnapshot | None:
    """Read the host driver below ``roots``; ``None`` when there is no NVIDIA driver at all.

    Runs ``discoverers`` in order over one :class:`Context` and composes their results, plus the
    pins of every offered mount source, into the snapshot. ``nvml_query`` replaces the NVML child
    process (tests); ``machine`` overrides ``uname -m``. Raises :class:`HostDiscoveryError` when
    the tree is unreadable or inconsistent.
    """
    ctx = Context(
        roots=roots,
        ldcache_path=ldcache_path,
        use_nvml=use_nvml,
        mps_pipe_dir=mps_pipe_dir,
        nvml_timeout=nvml_timeout,
        nvml_query=nvml_query,
        arches=machine_arches(machine),
    )
    for name, discoverer in discoverers:
        result = discoverer(ctx)
        if result is None:
            raise HostDiscoveryError(f"host discovery step {name!r} found nothing")
        found = dict(result)
        ctx.artefacts.update(found.pop("artefacts", {}))
        ctx.found.update(found)
        if name == "ldcache" and not _has_driver(ctx):
            return None
    for items in ctx.artefacts.values():  # artefact files are pinned like every mount source
        for item in items:
            if isinstance(item, HostFile):
                ctx.offer(item.root, item.host_path, by_directory=not (item.writable or item.pin_self))
    pins: dict[str, tuple[FileId, ...]] = {}
    pin_errors: dict[str, str] = {}
    for root, host_path, by_directory in ctx.sources:
        try:
            pins[host_path] = pin(root, host_path, by_directory=by_directory)
        except HostDiscoveryError as exc:  # e.g. removed between finding and pinning (an upgrade)
            pin_errors[host_path] = str(exc)
            ctx.notes.add(f"refused mount source: {exc}")
    fields = {k: v for k, v in ctx.found.items() if not k.startswith("_")}
    return DriverSnapshot(
        roots=roots,
        missing=tuple(ctx.notes.items),
        pins=MappingProxyType(pins),
        pin_errors=MappingProxyType(pin_errors),
        artefacts=MappingProxyType(dict(ctx.artefacts)),
        **fields,
    )


def _fallback_driver_version(
    nvml_lib: str | None, cuda_lib: str | None, version_text: str | None
) -> str | None:
    for host_path, prefix in ((cuda_lib, "libcuda.so"), (nvml_lib, "libnvidia-ml.so")):
        if host_path is not None:
            version = _driver_version_from_name(os.path.basename(host_path), prefix)
            if version is not None:
                return version
    if version_text is not None:
        return parse_driver_version(version_text)
    return None

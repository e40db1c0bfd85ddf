"""Value types describing what the host driver offers (layer 3).

A ``DriverSnapshot`` is computed once at start-up (and again when the driver changes) and then only
read on the CreateContainer hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from nri_plugin.host.paths import strip_root

# Capability groups used to index libraries/binaries (reference nvidia-toolkit.md §1.1-§1.3).
# Library groups: "utility", "compute", "video", "graphics", "graphics-glvnd", "ngx".
# Binary groups: "utility", "compute".
NVIDIA_MAJOR = 195  # the only fixed major; all others come from /proc/devices


def _empty() -> Mapping[str, int]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class HostRoots:
    """Where the host is read from. In production all are "/" (driver root may be /run/nvidia/driver)."""

    driver_root: str = "/"  # libraries, binaries, ld.so.cache, firmware (toolkit: nvidia-container-cli.root)
    dev_root: str = "/"  # device nodes: <dev_root>/dev/nvidia*
    proc_root: str = "/proc"  # /proc/devices, /proc/driver/nvidia/..., /proc/driver/nvidia-caps/...
    sys_root: str = "/sys"
    run_root: str = "/"  # IPC sockets: <run_root>/run/nvidia-persistenced/socket, <run_root>/tmp/nvidia-mps
    # Where the host's "/" is visible to this process: "/" on a node, e.g. "/host" in a DaemonSet pod
    # that mounts the host's root there. driver/dev/run roots above already include it (they are
    # the paths this process reads); mount sources handed to containerd have it stripped, because
    # containerd resolves them on the host.
    host_root: str = "/"

    def to_host(self, path: str) -> str:
        """``path`` as read by this process -> the same file's path on the host (for containerd)."""
        return strip_root(self.host_root, path)


@dataclass(frozen=True, slots=True)
class MigDevice:
    index: int  # index within the parent GPU (nvmlDeviceGetMigDeviceHandleByIndex order)
    uuid: str  # as NVML reports it: "MIG-<uuid>" (or legacy "MIG-GPU-<uuid>/<gi>/<ci>")
    gpu_instance_id: int
    compute_instance_id: int
    parent_index: int
    parent_minor: int


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int  # NVML index
    uuid: str  # "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
    minor: int  # /dev/nvidia<minor>
    bus_id: str  # normalized "%08x:%02x:%02x.0", lower-case hex
    model: str = ""
    brand: str | None = None  # Quadro/Tesla/NVS/GRID/GeForce/TITAN/Unknown; None = unknown source
    compute_capability: str | None = None  # "9.0"; None when not known (no NVML)
    mig_enabled: bool = False
    mig_devices: tuple[MigDevice, ...] = ()


@dataclass(frozen=True, slots=True)
class DeviceNode:
    """A host character device node, ready to become an NRI LinuxDevice."""

    path: str  # path in the container, e.g. "/dev/nvidia0" (same as on the host, relative to dev root)
    host_path: str  # absolute host path (under the dev root)
    type: str  # "c" or "b"
    major: int
    minor: int
    file_mode: int  # permission bits only (st_mode & 0o7777), never S_IFCHR
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class Library:
    soname: str  # ld.so.cache key, e.g. "libcuda.so.1"
    host_path: str  # absolute host path of the resolved real file (inside the driver root)
    file_name: str  # basename of the resolved file, e.g. "libcuda.so.550.54.14"
    is_32bit: bool = False


@dataclass(frozen=True, slots=True)
class IpcPath:
    """A daemon's socket or pipe directory, checked as :func:`~nri_plugin.host.discover.find_ipc`
    describes (right type, trusted owner, not a symlink)."""

    container_path: str  # the fixed path it gets in the container, e.g. "/run/nvidia-persistenced/socket"
    host_path: str  # where this process found it (below the run root)


@dataclass(frozen=True, slots=True)
class HostFile:
    """A host file or directory a discoverer offers for mounting (an ``artefacts`` item)."""

    container_path: str  # where it goes in the container
    host_path: str  # where this process found it (below ``root``; pinned)
    root: str  # the root it was discovered under
    writable: bool = False  # an IPC socket or directory (mounted read-write, noexec)
    # Pin the entry itself (inode and type) rather than through its directory's stamp: for
    # entries of busy directories such as /run, whose other entries change all the time.
    pin_self: bool = False


@dataclass(frozen=True, slots=True)
class FileId:
    """What a path named at discovery was: re-checked with one ``lstat`` before it is mounted."""

    path: str  # absolute path as this process reads it
    dev: int
    ino: int
    fmt: int  # stat.S_IFMT(st_mode): S_IFREG, S_IFDIR, S_IFSOCK, ...
    # When non-zero, st_ctime_ns, also compared: of a directory pinned for the driver files in it
    # (any entry created, removed, renamed or replaced by a symlink changes it; no one can set it
    # back), or of a file pinned itself (a rewrite in place changes it). 0 for the directories on
    # the way, whose entries may change freely, and for IPC entries, which containers write to.
    stamp_ns: int = 0
    follow: bool = False  # True only for a configured root itself (which may be a symlink)
    # The owner, compared when >= 0: of an entry pinned itself (IPC sockets and directories, which
    # are mounted read-write and were trusted for their owner at discovery; a new entry on a reused
    # inode, or one handed to another user, must not pass). Not the mode: containers may chmod what
    # they have mounted read-write, and discovery's trust does not depend on it. -1 elsewhere.
    uid: int = -1


class SnapshotCache:
    """A bounded memo owned by one snapshot, for values computed from it (``adjust`` keeps its
    device selections and plans here). It lives and dies with the snapshot: a new snapshot
    starts empty, so nothing computed from an old driver state can be served for a new one.
    Least recently used entries go first; ``get``/``put`` are O(1). Not thread-safe: it is used
    from the event loop only (``inspect`` runs single-threaded too)."""

    __slots__ = ("_data", "max_entries")

    def __init__(self, max_entries: int = 512) -> None:
        self._data: dict[object, object] = {}
        self.max_entries = max_entries

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: object) -> object | None:
        value = self._data.pop(key, None)
        if value is not None:
            self._data[key] = value  # most recently used last
        return value

    def put(self, key: object, value: object) -> None:
        self._data.pop(key, None)
        self._data[key] = value
        while len(self._data) > self.max_entries:
            del self._data[next(iter(self._data))]

    def clear(self) -> None:
        self._data.clear()


@dataclass(frozen=True, slots=True)
class DriverSnapshot:
    roots: HostRoots
    driver_version: str  # "550.54.14"
    cuda_version: str | None  # driver-supported CUDA "12.4"; None without NVML
    gpus: tuple[Gpu, ...]
    source: str  # "nvml" or "proc"
    char_majors: Mapping[str, int] = field(default_factory=_empty)  # /proc/devices name -> major
    # /proc/driver/nvidia-caps/mig-minors:
    # "config", "monitor", "gpu0/gi1/access", "gpu0/gi1/ci0/access" -> minor
    mig_minors: Mapping[str, int] = field(default_factory=_empty)
    libraries: Mapping[str, tuple[Library, ...]] = field(default_factory=dict)  # group -> 64-bit libs
    libraries32: Mapping[str, tuple[Library, ...]] = field(default_factory=dict)  # group -> 32-bit libs
    binaries: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # group -> host paths
    persistenced_socket: IpcPath | None = None
    fabricmanager_socket: IpcPath | None = None
    mps_pipe_dir: IpcPath | None = None
    firmware: tuple[str, ...] = ()  # host paths of gsp*.bin for this driver version
    device_nodes: Mapping[str, DeviceNode] = field(default_factory=dict)  # container path -> node
    missing: tuple[str, ...] = ()  # human-readable notes on what was looked for and not found
    # Every mount source above (host path) -> the chain of FileIds from its root down to the file
    # itself, as discovery saw them. The hot path re-checks them (``host.pin.verify``) so that a
    # file swapped after discovery is never handed to containerd.
    pins: Mapping[str, tuple[FileId, ...]] = field(default_factory=dict)
    pin_errors: Mapping[str, str] = field(default_factory=dict)  # host path -> why it is not pinned
    # What the library candidates that discovery rejected resolved through (``pin_resolution``):
    # a change there (a dangling libcuda link repaired) makes a rediscovery worthwhile.
    rejected: tuple[FileId, ...] = ()
    # Device nodes that exist but are not what the driver says (wrong type or numbers): path -> why.
    invalid_nodes: Mapping[str, str] = field(default_factory=dict)
    # What the discoverers added after the core ones found, by discoverer name; each has one
    # rule in adjust.build that decides when a container gets them.
    artefacts: Mapping[str, tuple[DeviceNode | HostFile, ...]] = field(default_factory=dict)
    # init=False: every snapshot, also one made by dataclasses.replace, starts with its own cache
    cache: SnapshotCache = field(default_factory=SnapshotCache, init=False, compare=False, repr=False)

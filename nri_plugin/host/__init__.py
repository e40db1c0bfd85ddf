"""Layer 3: the host driver, read under configurable roots (never on the CreateContainer hot path).

The public API of the layer is ``__all__``; code outside ``nri_plugin.host`` imports only that.
"""

from nri_plugin.host.discover import DEFAULT_ROOTS, discover, drm_artefact, explain_no_driver
from nri_plugin.host.driver import HostDriver
from nri_plugin.host.ldcache import (
    FLAG_ELF_LIBC6,
    FLAG_X8664_LIB64,
    HWCAP_EXTENSION,
    CacheFile,
    CacheRecord,
    parse_cache_file,
    sort_records,
    write_cache,
)
from nri_plugin.host.model import (
    DeviceNode,
    DriverSnapshot,
    FileId,
    Gpu,
    HostFile,
    HostRoots,
    IpcPath,
    Library,
    MigDevice,
    SnapshotCache,
)
from nri_plugin.host.paths import strip_root
from nri_plugin.host.pin import hot_path_checks, unique_checks, verify

__all__ = [
    "DEFAULT_ROOTS",
    "FLAG_ELF_LIBC6",
    "FLAG_X8664_LIB64",
    "HWCAP_EXTENSION",
    "CacheFile",
    "CacheRecord",
    "DeviceNode",
    "DriverSnapshot",
    "FileId",
    "Gpu",
    "HostDriver",
    "HostFile",
    "HostRoots",
    "IpcPath",
    "Library",
    "MigDevice",
    "SnapshotCache",
    "discover",
    "drm_artefact",
    "explain_no_driver",
    "hot_path_checks",
    "parse_cache_file",
    "sort_records",
    "strip_root",
    "unique_checks",
    "verify",
    "write_cache",
]

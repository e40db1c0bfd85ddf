"""The container's ``/etc/ld.so.cache``: what ``ldconfig`` would write inside it after injection.

Pure: the image's facts (read by ``nri_plugin.image`` from the container's snapshot) + the plan's
libraries + the host driver version -> the cache file's bytes and the env to add.

Entries, added in this order and then sorted with ldconfig's comparison (a stable sort, so of two
entries with the same name and flags the one added first stays first, and the loader takes it):

1. the image's CUDA forward-compat libraries (``/usr/local/cuda/compat``), only when
   :func:`compat_applies`: the toolkit's ``enable-cuda-compat`` hook puts that directory into a
   ``00-compat-*.conf``, ahead of every other directory, so ldconfig lists them first;
2. the injected driver libraries, under their SONAME, at the container path of the image's layout
   (``/usr/lib/x86_64-linux-gnu`` for a Debian-style multiarch image, else ``/usr/lib64``; for
   ``compat32`` ``/usr/lib/i386-linux-gnu`` or ``/usr/lib``): the toolkit's ``update-ldcache``
   hook lists the driver's directories in ``00-nvcr-*.conf``, also ahead of the image's own;
3. the image's own entries, in their order (from its cache, or from scanning its ``ld.so.conf``
   directories when it has none).

The old (libc5) section is written when the image's cache had one. Env:
``NVIDIA_CTK_LIBCUDA_DIR`` and ``TRITON_LIBCUDA_PATH`` name the directory holding the injected
libcuda, unless the container already sets them.
"""

from __future__ import annotations

import hashlib
import os.path
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from nri_plugin.adjust.build import LIB_DIRS_32, LIB_DIRS_64
from nri_plugin.adjust.model import MountEdit
from nri_plugin.host import (
    FLAG_ELF_LIBC6,
    FLAG_X8664_LIB64,
    CacheRecord,
    DriverSnapshot,
    sort_records,
    write_cache,
)

LDCACHE_PATH = "/etc/ld.so.cache"
LIBCUDA_ENV = ("NVIDIA_CTK_LIBCUDA_DIR", "TRITON_LIBCUDA_PATH")
COMPAT_DIR = "/usr/local/cuda/compat"
COMPAT_MODES = ("ldconfig", "mount", "hook", "disabled", "")
# The read-only bind of the generated cache over the image's.
LDCACHE_OPTIONS = ("ro", "nosuid", "nodev", "noexec", "bind", "rprivate")


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """What the image's loader setup is, as read from its layers (``nri_plugin.image``).

    ``source``: ``image-cache`` (its ``/etc/ld.so.cache``) or ``image-dirs`` (no cache: its
    ``ld.so.conf`` directories and the system directories scanned). ``multiarch``: a Debian-style
    ``/usr/lib/x86_64-linux-gnu`` image. ``compat_version``: the version of the one
    ``libcuda.so.<major>.<minor>...`` file in ``/usr/local/cuda/compat`` ("" when none, or not
    exactly one), ``compat_records`` that directory's libraries.
    """

    source: str
    records: tuple[CacheRecord, ...]
    has_old: bool = False
    multiarch: bool = False
    compat_version: str = ""
    compat_records: tuple[CacheRecord, ...] = ()


@dataclass(frozen=True, slots=True)
class LoaderCache:
    """The generated cache: its bytes, their sha256, and what went into it."""

    data: bytes
    digest: str
    entries: int
    driver_entries: int
    compat: bool  # the image's forward-compat libcuda takes precedence
    lib_dir: str


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) <= 9 else None


def compat_enabled(mode: str, allow_from_container: bool) -> bool:
    """The toolkit's ``cuda-compat-mode`` (``[nvidia-container-runtime.modes.legacy]``):
    ``ldconfig`` (its default), ``hook`` and ``mount`` make the image's compat libraries
    discoverable -- here always through the generated cache, as no hook or extra mount is used --;
    ``disabled`` never. Unset (``""``, as in configs older than the key) follows
    ``features.allow-cuda-compat-libs-from-container``."""
    if mode == "":
        return allow_from_container
    return mode != "disabled"


def compat_applies(facts: ImageFacts, host_driver_version: str, enabled: bool) -> bool:
    """The toolkit's rule: the compat libcuda's major version is greater than the host driver's."""
    if not enabled or not facts.compat_version or not facts.compat_records:
        return False
    compat, host = _major(facts.compat_version), _major(host_driver_version)
    return compat is not None and host is not None and compat > host


def lib_dirs(facts: ImageFacts) -> tuple[str, str]:
    """(64-bit, 32-bit) container directory the cache lists the driver libraries in."""
    return (LIB_DIRS_64[0], LIB_DIRS_32[0]) if facts.multiarch else (LIB_DIRS_64[1], LIB_DIRS_32[1])


def driver_records(
    mounts: Iterable[MountEdit], snapshot: DriverSnapshot, facts: ImageFacts
) -> list[CacheRecord]:
    """One entry per injected library SONAME (64-bit, and 32-bit with compat32), at the layout's
    directory (every library is mounted in both layouts' directories, so either path exists)."""
    dir64, dir32 = lib_dirs(facts)
    sonames64 = {lib.soname for libs in snapshot.libraries.values() for lib in libs}
    sonames32 = {lib.soname for libs in snapshot.libraries32.values() for lib in libs}
    out: list[CacheRecord] = []
    for mount in mounts:
        directory, name = os.path.split(mount.destination)
        if directory == LIB_DIRS_64[0] and name in sonames64:
            out.append(
                CacheRecord(name.encode(), f"{dir64}/{name}".encode(), FLAG_ELF_LIBC6 | FLAG_X8664_LIB64)
            )
        elif directory == LIB_DIRS_32[0] and name in sonames32:
            out.append(CacheRecord(name.encode(), f"{dir32}/{name}".encode(), FLAG_ELF_LIBC6))
    return out


def build_cache(
    facts: ImageFacts, drivers: list[CacheRecord], host_driver_version: str, compat_on: bool
) -> LoaderCache:
    """The cache file for one image and one set of driver entries (see the module docstring)."""
    compat = compat_applies(facts, host_driver_version, compat_on)
    added = [*(facts.compat_records if compat else ()), *drivers, *facts.records]
    ordered = sort_records(added)
    data = write_cache(ordered, old_section=facts.has_old)
    return LoaderCache(
        data=data,
        digest=hashlib.sha256(data).hexdigest(),
        entries=len(ordered),
        driver_entries=len(drivers),
        compat=compat,
        lib_dir=lib_dirs(facts)[0],
    )


def libcuda_env(
    mounts: Iterable[MountEdit], container_env: Mapping[str, str], lib_dir: str
) -> tuple[tuple[str, str], ...]:
    """``NVIDIA_CTK_LIBCUDA_DIR`` / ``TRITON_LIBCUDA_PATH`` = ``lib_dir`` when libcuda is injected
    there and the container does not set the variable itself."""
    if not any(m.destination == f"{lib_dir}/libcuda.so.1" for m in mounts):
        return ()
    return tuple((name, lib_dir) for name in LIBCUDA_ENV if name not in container_env)


def cache_mount(source: str) -> MountEdit:
    """The read-only bind of the generated file ``source`` (a host path) over the image's cache."""
    return MountEdit(source, LDCACHE_PATH, LDCACHE_OPTIONS)

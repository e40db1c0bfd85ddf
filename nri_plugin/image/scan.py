"""The image's loader setup, read from its layers (:mod:`nri_plugin.image.rootfs`): its own
``/etc/ld.so.cache`` entries, or -- when it has none -- what ``ldconfig`` would find in its
``ld.so.conf`` directories, and its CUDA forward-compat libraries.

Refusals (each an :class:`ImageReadError` whose text is the fallback reason):

* ``/etc`` is not a real directory of the image (``/etc -> /`` and the like): the cache could not
  be mounted at a path the image's loader reads without following an image symlink;
* ``/etc/ld.so.cache`` exists but is not a regular file once its symlinks are resolved inside the
  image (a dangling link, e.g. one to a host path, a directory, a device);
* the cache is bigger than :data:`MAX_CACHE_BYTES`, is not a consistent glibc cache (truncated,
  offsets out of range), has more than :data:`MAX_ENTRIES` entries, or an entry whose name is
  not a plain file name or whose path is not an absolute, normalized path (``..``, relative);
* the cache has glibc-hwcaps subdirectory entries (not supported yet);
* the read ran past its budget (:class:`~nri_plugin.image.rootfs.Budget`).

SONAMEs of scanned libraries come from their ELF dynamic section, read with a few bounded
``pread`` calls; nothing is loaded or executed.
"""

from __future__ import annotations

import fnmatch
import os.path
import re
import struct

from nri_plugin.adjust import COMPAT_DIR, LDCACHE_PATH, ImageFacts
from nri_plugin.errors import HostDiscoveryError, ImageReadError
from nri_plugin.host import HWCAP_EXTENSION, CacheRecord, parse_cache_file
from nri_plugin.image.rootfs import ImageRoot, Node

MAX_CACHE_BYTES = 8 << 20  # real caches are 10-500 KiB
MAX_ENTRIES = 100_000
MAX_CONF_BYTES = 1 << 20
MAX_CONF_FILES = 256
# ldconfig's trusted directories for x86-64 after the ld.so.conf ones (Debian's and the
# upstream/RHEL layout's; absent ones are skipped).
SYSTEM_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
)
MULTIARCH_DIR = "/usr/lib/x86_64-linux-gnu"
_COMPAT_LIBCUDA = re.compile(r"libcuda\.so\.\d+\.\d+(\.\d+)*")
# e_machine / ELF class -> ldconfig flags (libc6 type | architecture bits)
_ELF_FLAGS = {(62, 2): 0x0303, (62, 1): 0x0803, (3, 1): 0x0003, (183, 2): 0x0A03}


def read_facts(root: ImageRoot) -> ImageFacts:
    """Everything :func:`nri_plugin.adjust.build_cache` needs from the image."""
    etc = root.lookup("/etc", follow=False)
    if etc is not None and etc.kind != "dir":
        raise ImageReadError(
            f"the image's /etc is a {etc.kind}, not a directory: not mounting a generated "
            "/etc/ld.so.cache through it"
        )
    multiarch = _is_dir(root, MULTIARCH_DIR)
    compat_version, compat_records = _compat(root)
    node = None if etc is None else root.lookup(LDCACHE_PATH, follow=False)
    if node is None:
        records = scan_conf_dirs(root)
        return ImageFacts("image-dirs", tuple(records), False, multiarch, compat_version, compat_records)
    if node.kind == "symlink":
        target = root.readlink(node)
        node = root.lookup(LDCACHE_PATH)
        if node is None:
            raise ImageReadError(
                f"the image's {LDCACHE_PATH} is a symlink to {target!r}, which does not exist inside "
                "the image (symlinks are resolved in the image, never on the host)"
            )
    if node.kind != "file":
        raise ImageReadError(f"the image's {LDCACHE_PATH} is a {node.kind}, not a regular file")
    data = root.read(node, MAX_CACHE_BYTES)
    try:
        parsed = parse_cache_file(data)
    except HostDiscoveryError as exc:
        raise ImageReadError(f"the image's {LDCACHE_PATH} is not usable: {exc}") from exc
    check_records(parsed.records)
    return ImageFacts(
        "image-cache", parsed.records, parsed.has_old, multiarch, compat_version, compat_records
    )


def check_records(records: tuple[CacheRecord, ...]) -> None:
    """Refuse a cache whose entries ldconfig could not have written."""
    if len(records) > MAX_ENTRIES:
        raise ImageReadError(
            f"the image's {LDCACHE_PATH} has {len(records)} entries, more than {MAX_ENTRIES}"
        )
    for r in records:
        if r.hwcap & HWCAP_EXTENSION:
            raise ImageReadError(
                f"the image's {LDCACHE_PATH} has glibc-hwcaps subdirectory entries ({r.key!r}), "
                "which this plugin does not rewrite yet"
            )
        if not r.key or b"/" in r.key:
            raise ImageReadError(f"the image's {LDCACHE_PATH} has an entry named {r.key!r}: not a file name")
        value = r.value.decode("utf-8", "surrogateescape")
        if not value.startswith("/") or os.path.normpath(value) != value or "/.." in value:
            raise ImageReadError(
                f"the image's {LDCACHE_PATH} has the entry {r.key!r} -> {value!r}: not an absolute, "
                "normalized path (a corrupt or hostile cache)"
            )


def _is_dir(root: ImageRoot, path: str) -> bool:
    node = root.lookup(path)
    return node is not None and node.kind == "dir"


# --- ld.so.conf -------------------------------------------------------------------------------


def conf_dirs(root: ImageRoot) -> list[str]:
    """The directories of the image's ``/etc/ld.so.conf`` (``include`` globs followed), in order."""
    dirs: list[str] = []
    seen_files: set[str] = set()
    _read_conf(root, "/etc/ld.so.conf", dirs, seen_files)
    return dirs


def _read_conf(root: ImageRoot, path: str, dirs: list[str], seen: set[str]) -> None:
    node = root.lookup(path)
    if node is None or node.kind != "file" or node.path in seen:
        return
    if len(seen) >= MAX_CONF_FILES:
        raise ImageReadError(f"the image's ld.so.conf includes more than {MAX_CONF_FILES} files")
    seen.add(node.path)
    text = root.read(node, MAX_CONF_BYTES).decode("utf-8", "surrogateescape")
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include") and line[7:8] in (" ", "\t"):
            for pattern in line[8:].split():
                for included in _glob(root, pattern, os.path.dirname(path)):
                    _read_conf(root, included, dirs, seen)
        elif not line.startswith("hwcap"):
            for d in re.split(r"[\s:,]+", line):
                if d.startswith("/"):
                    dirs.append(os.path.normpath(d))


def _glob(root: ImageRoot, pattern: str, base: str) -> list[str]:
    """``include`` patterns: a glob in the last component only (as in every distribution's file)."""
    full = pattern if pattern.startswith("/") else os.path.join(base, pattern)
    directory, name = os.path.split(os.path.normpath(full))
    node = root.lookup(directory)
    if node is None or node.kind != "dir":
        return []
    return [f"{directory}/{n}" for n in root.listdir(node) if fnmatch.fnmatchcase(n, name)]


# --- scanning library directories -------------------------------------------------------------


def scan_conf_dirs(root: ImageRoot) -> list[CacheRecord]:
    """What ldconfig would cache for the image: its ld.so.conf directories, then the system ones;
    each directory once (by the path it resolves to)."""
    out: list[CacheRecord] = []
    done: set[str] = set()
    for directory in [*conf_dirs(root), *SYSTEM_DIRS]:
        node = root.lookup(directory)
        if node is None or node.kind != "dir" or node.path in done:
            continue
        done.add(node.path)
        out.extend(scan_dir(root, node, directory))
    return out


def scan_dir(root: ImageRoot, node: Node, shown: str) -> list[CacheRecord]:
    """One entry per SONAME of the shared libraries in the directory ``node`` (listed as
    ``shown``): at ``shown/<SONAME>`` when that name exists there, else at the file found."""
    by_soname: dict[bytes, tuple[str, int]] = {}
    names = root.listdir(node)
    present = set(names)
    for name in names:
        if not (name.startswith(("lib", "ld-")) and ".so" in name):
            continue
        target = root.lookup(f"{node.path.rstrip('/')}/{name}")
        if target is None or target.kind != "file":
            continue
        elf = elf_soname(root, target)
        if elf is None:
            continue
        soname, flags = elf
        key = soname or name.encode()
        current = by_soname.get(key)
        if current is None or name.encode() == key or (current[0].encode() != key and name > current[0]):
            by_soname[key] = (name, flags)
    out = []
    for key, (name, flags) in by_soname.items():
        file_name = (
            key.decode("utf-8", "surrogateescape")
            if key.decode("utf-8", "surrogateescape") in present
            else name
        )
        out.append(CacheRecord(key, f"{shown.rstrip('/')}/{file_name}".encode(), flags))
    return out


def elf_soname(root: ImageRoot, node: Node) -> tuple[bytes, int] | None:
    """(DT_SONAME or b"", ldconfig flags) of the ELF shared object ``node``; None if it is not
    one of a known architecture. Every offset is bounds-checked; at most a few small reads."""
    head = root.pread(node, 0, 64)
    if len(head) < 52 or head[:4] != b"\x7fELF" or head[5] != 1:
        return None
    is64 = head[4] == 2
    (e_type, machine) = struct.unpack_from("<HH", head, 16)
    flags = _ELF_FLAGS.get((machine, head[4]))
    if e_type != 3 or flags is None:
        return None
    if is64:
        phoff, phentsize, phnum = struct.unpack_from("<Q", head, 32)[0], *struct.unpack_from("<HH", head, 54)
        fmt, want = "<IIQQQQQQ", 56
    else:
        phoff, phentsize, phnum = struct.unpack_from("<I", head, 28)[0], *struct.unpack_from("<HH", head, 42)
        fmt, want = "<IIIIIIII", 32
    if phentsize != want or not 0 < phnum <= 64:
        return None
    table = root.pread(node, phoff, phentsize * phnum)
    if len(table) != phentsize * phnum:
        return None
    loads: list[tuple[int, int, int]] = []
    dynamic: tuple[int, int] | None = None
    for i in range(phnum):
        v = struct.unpack_from(fmt, table, i * phentsize)
        if is64:
            p_type, p_offset, p_vaddr, p_filesz = v[0], v[2], v[3], v[5]
        else:
            p_type, p_offset, p_vaddr, p_filesz = v[0], v[1], v[2], v[4]
        if p_type == 1:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == 2:
            dynamic = (p_offset, min(p_filesz, 64 << 10))
    if dynamic is None:
        return b"", flags
    return _soname_from_dynamic(root, node, dynamic, loads, is64), flags


def _soname_from_dynamic(
    root: ImageRoot, node: Node, dynamic: tuple[int, int], loads: list[tuple[int, int, int]], is64: bool
) -> bytes:
    data = root.pread(node, dynamic[0], dynamic[1])
    size, fmt = (16, "<qQ") if is64 else (8, "<iI")
    strtab = soname = None
    for off in range(0, len(data) - size + 1, size):
        tag, val = struct.unpack_from(fmt, data, off)
        if tag == 0:
            break
        if tag == 5:
            strtab = val
        elif tag == 14:
            soname = val
    if strtab is None or soname is None:
        return b""
    for vaddr, offset, filesz in loads:
        if vaddr <= strtab < vaddr + filesz:
            raw = root.pread(node, offset + (strtab - vaddr) + soname, 256)
            end = raw.find(b"\0")
            return raw[:end] if end > 0 else b""
    return b""


# --- CUDA forward compatibility ---------------------------------------------------------------


def _compat(root: ImageRoot) -> tuple[str, tuple[CacheRecord, ...]]:
    """(version of the one ``libcuda.so.X.Y...`` regular file in the compat directory, that
    directory's libraries); ("", ()) when there is none or more than one (as the toolkit)."""
    node = root.lookup(COMPAT_DIR)
    if node is None or node.kind != "dir":
        return "", ()
    names = root.listdir(node)
    found = []
    for name in names:
        if _COMPAT_LIBCUDA.fullmatch(name):
            entry = root.child(node, name)
            if entry is not None and entry.kind == "file":
                found.append(name)
    if len(found) != 1:
        return "", ()
    return found[0][len("libcuda.so.") :], tuple(scan_dir(root, node, node.path))

"""Parser for glibc's ``/etc/ld.so.cache``.

Three layouts exist, all written by glibc's ``ldconfig`` (``-c old|compat|new``; ``new`` is the default
since glibc 2.32):

* old (libc5 / glibc 2.0): magic ``"ld.so-1.7.0"`` (11 bytes, padded to 12), ``uint32 nlibs``, then
  ``nlibs`` entries ``{int32 flags; uint32 key; uint32 value}``. String offsets count from the end of
  the entry array.
* new: magic ``"glibc-ld.so.cache"`` + version ``"1.1"`` (20 bytes), ``uint32 nlibs``,
  ``uint32 len_strings``, ``uint8 flags`` (byte order: 2 little, 3 big), 3 bytes padding,
  ``uint32 extension_offset``, ``uint32 unused[3]`` (48 bytes in all), then ``nlibs`` entries
  ``{int32 flags; uint32 key; uint32 value; uint32 osversion; uint64 hwcap}`` (24 bytes). String
  offsets count from the start of this header.
* compat: an old section followed, at the next 8-byte boundary, by a complete new section. Like
  glibc's loader we then use the new section only.

``flags & 0xff`` is the type (1 ELF, 2 libc5, 3 libc6); ``flags & 0xff00`` the architecture
(0x0300 x86-64, 0x0a00 AArch64, 0x0500 PowerPC64, ...; 0 = the generic 32-bit ABI, i.e. i386 on an
x86 host).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nri_plugin.errors import HostDiscoveryError

OLD_MAGIC = b"ld.so-1.7.0"
NEW_MAGIC = b"glibc-ld.so.cache1.1"
OLD_HEADER_SIZE = 16  # 11-byte magic, 1 byte padding, uint32 nlibs
OLD_ENTRY_SIZE = 12
NEW_HEADER_SIZE = 48
NEW_ENTRY_SIZE = 24
NEW_SECTION_ALIGN = 8  # alignof(struct cache_file_new) on 64-bit hosts (it contains a uint64)

FLAG_ELF = 0x0001
FLAG_TYPE_MASK = 0x00FF
FLAG_ARCH_MASK = 0xFF00

_ENDIAN_UNSET, _ENDIAN_INVALID, _ENDIAN_LITTLE, _ENDIAN_BIG = 0, 1, 2, 3

# arch bits -> (name, is_64bit); from glibc sysdeps/generic/ldconfig.h FLAG_* constants.
_ARCHES: dict[int, tuple[str, bool]] = {
    0x0000: ("i386", False),
    0x0100: ("sparc64", True),
    0x0200: ("ia64", True),
    0x0300: ("x86-64", True),
    0x0400: ("s390x", True),
    0x0500: ("ppc64", True),
    0x0600: ("mips64-n32", False),
    0x0700: ("mips64", True),
    0x0800: ("x32", False),
    0x0900: ("arm-hf", False),
    0x0A00: ("aarch64", True),
    0x0B00: ("arm-sf", False),
    0x0C00: ("mips32-nan2008", False),
    0x0D00: ("mips64-n32-nan2008", False),
    0x0E00: ("mips64-nan2008", True),
    0x0F00: ("riscv-soft-float", False),
    0x1000: ("riscv-double-float", False),
    0x1100: ("loongarch-soft-float", False),
    0x1200: ("loongarch-double-float", False),
}


@dataclass(frozen=True, slots=True)
class LdCacheEntry:
    key: str  # the SONAME (or link name) the loader looks up, e.g. "libcuda.so.1"
    value: str  # the path ldconfig recorded, e.g. "/usr/lib/x86_64-linux-gnu/libcuda.so.1"
    flags: int
    is_64bit: bool
    arch: str  # "x86-64", "i386", "aarch64", ... or "flags-0x...." when unknown

    @property
    def is_elf(self) -> bool:
        return bool(self.flags & FLAG_ELF)


def _arch_of(flags: int) -> tuple[str, bool]:
    bits = flags & FLAG_ARCH_MASK
    return _ARCHES.get(bits, (f"flags-{bits:#06x}", False))


def _cstring(data: bytes, base: int, offset: int, what: str) -> bytes:
    """The NUL-terminated string at ``base + offset`` of a cache file (offsets are relative to the
    string table or header ``base``); a corrupt offset is a :class:`HostDiscoveryError`."""
    start = base + offset
    if offset < 0 or start < 0 or start >= len(data):
        raise HostDiscoveryError(
            f"ld.so.cache {what} string offset {offset} is outside the {len(data)}-byte file: the cache is "
            "corrupt; regenerate it with 'ldconfig'"
        )
    end = data.find(b"\0", start)
    if end < 0:
        raise HostDiscoveryError(
            f"ld.so.cache {what} string at offset {offset} is not NUL-terminated: the cache is corrupt; "
            "regenerate it with 'ldconfig'"
        )
    return data[start:end]


def _string_at(data: bytes, base: int, offset: int, what: str) -> str:
    return _cstring(data, base, offset, what).decode("utf-8", errors="surrogateescape")


def _entry(data: bytes, base: int, flags: int, key: int, value: int) -> LdCacheEntry:
    arch, is_64 = _arch_of(flags)
    return LdCacheEntry(
        key=_string_at(data, base, key, "key"),
        value=_string_at(data, base, value, "value"),
        flags=flags,
        is_64bit=is_64,
        arch=arch,
    )


def _parse_new(data: bytes, start: int) -> list[LdCacheEntry]:
    if len(data) - start < NEW_HEADER_SIZE:
        raise HostDiscoveryError(
            f"ld.so.cache new-format header at offset {start} is truncated ({len(data) - start} bytes left, "
            f"{NEW_HEADER_SIZE} needed); regenerate it with 'ldconfig'"
        )
    endian_flag = data[start + 28] & 0x3
    if endian_flag == _ENDIAN_BIG:
        order = ">"
    elif endian_flag in (_ENDIAN_LITTLE, _ENDIAN_UNSET):
        order = "<"
    else:
        raise HostDiscoveryError(
            f"ld.so.cache byte-order flag {endian_flag} is invalid; regenerate the cache with 'ldconfig'"
        )
    (nlibs,) = struct.unpack_from(order + "I", data, start + 20)
    first = start + NEW_HEADER_SIZE
    if nlibs > (len(data) - first) // NEW_ENTRY_SIZE:
        raise HostDiscoveryError(
            f"ld.so.cache claims {nlibs} entries but the file holds at most "
            f"{(len(data) - first) // NEW_ENTRY_SIZE}: the cache is truncated; regenerate it with 'ldconfig'"
        )
    entry_fmt = order + "iIIIQ"
    out: list[LdCacheEntry] = []
    for i in range(nlibs):
        offset = first + i * NEW_ENTRY_SIZE
        flags, key, value, _osversion, _hwcap = struct.unpack_from(entry_fmt, data, offset)
        out.append(_entry(data, start, flags, key, value))
    return out


def parse_ldcache(data: bytes) -> list[LdCacheEntry]:
    """Parse an ``ld.so.cache`` image into its entries, in file order.

    Raises :class:`HostDiscoveryError` if ``data`` is not a cache in one of glibc's formats or is
    internally inconsistent (truncated, offsets out of range).
    """
    if data.startswith(NEW_MAGIC):
        return _parse_new(data, 0)
    if not data.startswith(OLD_MAGIC):
        head = data[:20]
        raise HostDiscoveryError(
            f"ld.so.cache starts with {head!r}, which is neither 'ld.so-1.7.0' nor "
            "'glibc-ld.so.cache1.1': not a glibc loader cache; point ldcache at /etc/ld.so.cache or "
            "regenerate it with 'ldconfig'"
        )
    if len(data) < OLD_HEADER_SIZE:
        raise HostDiscoveryError(
            f"ld.so.cache old-format header is truncated ({len(data)} bytes); regenerate it with 'ldconfig'"
        )
    (nlibs,) = struct.unpack_from("<I", data, 12)
    if nlibs > (len(data) - OLD_HEADER_SIZE) // OLD_ENTRY_SIZE:
        raise HostDiscoveryError(
            f"ld.so.cache (old format) claims {nlibs} entries but the file holds at most "
            f"{(len(data) - OLD_HEADER_SIZE) // OLD_ENTRY_SIZE}: regenerate it with 'ldconfig'"
        )
    strings = OLD_HEADER_SIZE + nlibs * OLD_ENTRY_SIZE
    new_start = (strings + NEW_SECTION_ALIGN - 1) & ~(NEW_SECTION_ALIGN - 1)
    if len(data) - new_start > NEW_HEADER_SIZE and data.startswith(NEW_MAGIC, new_start):
        return _parse_new(data, new_start)
    out: list[LdCacheEntry] = []
    for i in range(nlibs):
        flags, key, value = struct.unpack_from("<iII", data, OLD_HEADER_SIZE + i * OLD_ENTRY_SIZE)
        out.append(_entry(data, strings, flags, key, value))
    return out


def read_ldcache(path: str) -> list[LdCacheEntry]:
    """Read and parse the cache file at ``path`` (a host path, already resolved inside its root)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise HostDiscoveryError(
            f"cannot read ld.so.cache {path!r}: {exc.strerror}; run 'ldconfig' in the driver root or set "
            "the ldcache path"
        ) from exc
    try:
        return parse_ldcache(data)
    except HostDiscoveryError as exc:
        raise HostDiscoveryError(f"{path}: {exc}") from exc


# --- the cache as a value, glibc's order, and writing it -----------------------------------------

FLAG_ELF_LIBC6 = 0x0003
FLAG_X8664_LIB64 = 0x0300
HWCAP_EXTENSION = 1 << 62  # DL_CACHE_HWCAP_EXTENSION: the entry names a glibc-hwcaps subdirectory
_INT32 = 1 << 32


@dataclass(frozen=True, slots=True)
class CacheRecord:
    """One entry exactly as stored: key and value as bytes, the numeric fields unchanged."""

    key: bytes
    value: bytes
    flags: int
    osversion: int = 0
    hwcap: int = 0


@dataclass(frozen=True, slots=True)
class CacheFile:
    """A parsed cache: its records in file order, and whether it had the old (libc5) section."""

    records: tuple[CacheRecord, ...]
    has_old: bool


def _new_records(data: bytes, start: int) -> list[CacheRecord]:
    _parse_new(data, start)  # header, byte order and entry-count checks (raises)
    order = ">" if data[start + 28] & 0x3 == _ENDIAN_BIG else "<"
    (nlibs,) = struct.unpack_from(order + "I", data, start + 20)
    out: list[CacheRecord] = []
    for i in range(nlibs):
        offset = start + NEW_HEADER_SIZE + i * NEW_ENTRY_SIZE
        flags, key, value, osversion, hwcap = struct.unpack_from(order + "iIIIQ", data, offset)
        out.append(
            CacheRecord(
                _cstring(data, start, key, "key"),
                _cstring(data, start, value, "value"),
                flags,
                osversion,
                hwcap,
            )
        )
    return out


def parse_cache_file(data: bytes) -> CacheFile:
    """Parse ``data`` like :func:`parse_ldcache`, keeping every field (for rewriting the cache).

    Raises :class:`HostDiscoveryError` for anything that is not a consistent glibc cache.
    """
    if data.startswith(NEW_MAGIC):
        return CacheFile(tuple(_new_records(data, 0)), has_old=False)
    parse_ldcache(data)  # magic, header and count checks of the old format (raises)
    (nlibs,) = struct.unpack_from("<I", data, 12)
    strings = OLD_HEADER_SIZE + nlibs * OLD_ENTRY_SIZE
    new_start = (strings + NEW_SECTION_ALIGN - 1) & ~(NEW_SECTION_ALIGN - 1)
    if len(data) - new_start > NEW_HEADER_SIZE and data.startswith(NEW_MAGIC, new_start):
        return CacheFile(tuple(_new_records(data, new_start)), has_old=True)
    records = []
    for i in range(nlibs):
        flags, key, value = struct.unpack_from("<iII", data, OLD_HEADER_SIZE + i * OLD_ENTRY_SIZE)
        records.append(
            CacheRecord(_cstring(data, strings, key, "key"), _cstring(data, strings, value, "value"), flags)
        )
    return CacheFile(tuple(records), has_old=True)


def _int32(v: int) -> int:
    v %= _INT32
    return v - _INT32 if v >= 1 << 31 else v


def _schar(b: int) -> int:
    return b - 256 if b >= 128 else b  # glibc compares plain (signed on x86) chars


def _digits(s: bytes, i: int) -> tuple[int, int]:
    """The int value (wrapping like C's int) of the digit run at ``s[i]``, and where it ends."""
    val = 0
    while i < len(s) and 0x30 <= s[i] <= 0x39:
        val = _int32(val * 10 + s[i] - 0x30)
        i += 1
    return val, i


def libcmp(p1: bytes, p2: bytes) -> int:
    """glibc's ``_dl_cache_libcmp``: byte order, except that digit runs compare as numbers and a
    digit sorts after a non-digit. Only the sign of the result matters."""
    i = j = 0
    while i < len(p1):
        c1 = p1[i]
        c2 = p2[j] if j < len(p2) else 0
        d1, d2 = 0x30 <= c1 <= 0x39, 0x30 <= c2 <= 0x39
        if d1 and d2:
            v1, i = _digits(p1, i)
            v2, j = _digits(p2, j)
            if v1 != v2:
                return _int32(v1 - v2)
        elif d1:
            return 1
        elif d2:
            return -1
        elif c1 != c2:
            return _schar(c1) - _schar(c2)
        else:
            i += 1
            j += 1
    return 0 - (_schar(p2[j]) if j < len(p2) else 0)


def _bits(v: int) -> int:
    return bin(v).count("1")


def compare_records(e1: CacheRecord, e2: CacheRecord) -> int:
    """ldconfig's entry order (``compare`` in glibc's elf/cache.c): names *descending* by
    :func:`libcmp`; for one name, higher flags first, glibc-hwcaps entries first, then the more
    specific hwcap (more bits, then larger value), then the larger osversion. Negative: ``e1``
    comes first. (hwcaps entries of one name would also be ordered by subdirectory name; records
    carrying the extension bit are refused before they get here.)"""
    res = libcmp(e2.key, e1.key)
    if res != 0:
        return res
    if e1.flags != e2.flags:
        return -1 if e1.flags > e2.flags else 1
    ext1, ext2 = bool(e1.hwcap & HWCAP_EXTENSION), bool(e2.hwcap & HWCAP_EXTENSION)
    if ext1 != ext2:
        return -1 if ext1 else 1
    for a, b in ((_bits(e1.hwcap), _bits(e2.hwcap)), (e1.hwcap, e2.hwcap), (e1.osversion, e2.osversion)):
        if a != b:
            return -1 if a > b else 1
    return 0


def sort_records(records: list[CacheRecord]) -> list[CacheRecord]:
    """The records in ldconfig's order. Like ldconfig's insertion (each new entry goes after every
    entry that does not compare greater), the sort is stable: of equal records, the one added
    first stays first, and the loader takes the first match."""
    import functools

    return sorted(records, key=functools.cmp_to_key(compare_records))


class _Strings:
    """The string table: each distinct string once, NUL-terminated, in first-use order."""

    def __init__(self) -> None:
        self.offsets: dict[bytes, int] = {}
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, s: bytes) -> int:
        at = self.offsets.get(s)
        if at is None:
            at = self.offsets[s] = self.size
            self.parts.append(s + b"\0")
            self.size += len(s) + 1
        return at


def write_cache(records: list[CacheRecord], *, old_section: bool = False) -> bytes:
    """A cache file holding ``records`` in the given order (sort them with :func:`sort_records`
    first): the new format, little-endian, preceded by an old-format section when
    ``old_section`` (ldconfig's ``-c compat`` layout: the old entries, padded to an even count,
    the new section at the next 8-byte boundary, one string table after it that both sections'
    offsets point into). No extension directory is written (``extension_offset`` 0): the loader
    treats that as "no extensions"."""
    table = _Strings()
    offsets = [(table.add(r.key), table.add(r.value)) for r in records]
    new_size = NEW_HEADER_SIZE + len(records) * NEW_ENTRY_SIZE
    old: bytes = b""
    if old_section:
        plain = [(r, o) for r, o in zip(records, offsets, strict=True) if r.hwcap == 0]
        if len(plain) % 2:
            plain.append(plain[-1])
        old_size = OLD_HEADER_SIZE + len(plain) * OLD_ENTRY_SIZE
        pad = (-old_size) % NEW_SECTION_ALIGN
        # old string offsets count from the end of the old entries: past the padding and the
        # whole new section
        base = pad + new_size
        old = OLD_MAGIC + b"\0" + struct.pack("<I", len(plain))
        old += b"".join(struct.pack("<iII", r.flags, base + k, base + v) for r, (k, v) in plain)
        old += b"\0" * pad
    header = NEW_MAGIC + struct.pack("<II", len(records), table.size)
    header += bytes([_ENDIAN_LITTLE, 0, 0, 0]) + struct.pack("<IIII", 0, 0, 0, 0)
    body = b"".join(
        struct.pack("<iIIIQ", r.flags, new_size + k, new_size + v, r.osversion, r.hwcap)
        for r, (k, v) in zip(records, offsets, strict=True)
    )
    return old + header + body + b"".join(table.parts)

"""ld.so.cache parser against glibc's real ldconfig output (all three formats) and hand-built caches."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.ldcache import LdCacheEntry, parse_ldcache, read_ldcache
from tests.fakehost import build_fake_host, make_gpus

pytestmark = pytest.mark.skipif(shutil.which("ldconfig") is None, reason="needs glibc's ldconfig")

_LINE = re.compile(r"^\t(?P<key>\S+) \((?P<desc>[^)]*)\) => (?P<value>\S+)$")


def _ldconfig_p(cache: Path) -> list[tuple[str, str, str]]:
    """What glibc's own reader (`ldconfig -p`) says is in ``cache``: (key, description, value)."""
    out = subprocess.run(["ldconfig", "-p", "-C", str(cache)], capture_output=True, text=True, check=True)
    rows = []
    for line in out.stdout.splitlines():
        m = _LINE.match(line)
        if m:
            rows.append((m["key"], m["desc"], m["value"]))
    return rows


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    host = build_fake_host(tmp_path_factory.mktemp("ldc") / "root", gpus=make_gpus(1), compat32=True)
    return host.root


@pytest.mark.parametrize("fmt", ["new", "compat", "old"])
def test_real_ldconfig_formats_match_glibc_reader(fake_root: Path, fmt: str) -> None:
    cache = fake_root / f"etc/ld.so.cache.{fmt}"
    subprocess.run(["ldconfig", "-c", fmt, "-r", str(fake_root), "-C", f"/etc/ld.so.cache.{fmt}"], check=True)
    head = cache.read_bytes()[:20]
    assert head.startswith(b"glibc-ld.so.cache1.1" if fmt == "new" else b"ld.so-1.7.0")
    entries = parse_ldcache(cache.read_bytes())
    expected = _ldconfig_p(cache)
    assert [(e.key, e.value) for e in entries] == [(k, v) for k, _, v in expected]
    assert len(entries) > 30
    for e, (_, desc, _) in zip(entries, expected, strict=True):
        assert e.is_elf
        if "x86-64" in desc:
            assert (e.arch, e.is_64bit) == ("x86-64", True)
        else:
            assert (e.arch, e.is_64bit) == ("i386", False)
    # Both ABIs of libcuda are there, 64-bit from the x86_64 dir and 32-bit from the i386 dir.
    cuda = {(e.arch, e.value) for e in entries if e.key == "libcuda.so.1"}
    assert cuda == {
        ("x86-64", "/usr/lib/x86_64-linux-gnu/libcuda.so.1"),
        ("i386", "/usr/lib/i386-linux-gnu/libcuda.so.1"),
    }


def test_real_32bit_libs_are_libc6(fake_root: Path) -> None:
    entries = read_ldcache(str(fake_root / "etc/ld.so.cache"))
    flags32 = {e.flags for e in entries if e.arch == "i386"}
    assert flags32 == {0x0003}  # FLAG_ELF_LIBC6, no arch bits
    assert {e.flags for e in entries if e.arch == "x86-64"} == {0x0303}


# ---------------------------------------------------------------------------- hand-built caches


def _strings(items: list[tuple[int, str, str]]) -> tuple[bytes, list[tuple[int, int, int]]]:
    table = b""
    offs = []
    for flags, key, value in items:
        k = len(table)
        table += key.encode() + b"\0"
        v = len(table)
        table += value.encode() + b"\0"
        offs.append((flags, k, v))
    return table, offs


def build_old(items: list[tuple[int, str, str]]) -> bytes:
    table, offs = _strings(items)
    out = b"ld.so-1.7.0\0" + struct.pack("<I", len(items))
    for flags, k, v in offs:
        out += struct.pack("<iII", flags, k, v)
    return out + table


def build_new(items: list[tuple[int, str, str]], *, order: str = "<", endian: int = 2) -> bytes:
    table, offs = _strings(items)
    header_len = 48 + 24 * len(items)
    out = b"glibc-ld.so.cache1.1" + struct.pack(order + "II", len(items), len(table))
    out += bytes([endian, 0, 0, 0]) + struct.pack(order + "IIII", 0, 0, 0, 0)
    assert len(out) == 48
    for flags, k, v in offs:
        out += struct.pack(order + "iIIIQ", flags, header_len + k, header_len + v, 0, 0)
    return out + table


ITEMS = [
    (0x0303, "libcuda.so.1", "/usr/lib64/libcuda.so.1"),
    (0x0003, "libcuda.so.1", "/usr/lib/libcuda.so.1"),
    (0x0A03, "libfoo.so.2", "/opt/arm/libfoo.so.2"),
    (0x0002, "libold5.so.1", "/lib/libold5.so.1"),
]


def _expect(items: list[tuple[int, str, str]]) -> list[tuple[str, str, int]]:
    return [(k, v, f) for f, k, v in items]


def test_hand_built_old_format() -> None:
    entries = parse_ldcache(build_old(ITEMS))
    assert [(e.key, e.value, e.flags) for e in entries] == _expect(ITEMS)
    assert [e.arch for e in entries] == ["x86-64", "i386", "aarch64", "i386"]
    assert [e.is_elf for e in entries] == [True, True, True, False]


def test_hand_built_new_format_both_byte_orders() -> None:
    for data in (build_new(ITEMS), build_new(ITEMS, order=">", endian=3), build_new(ITEMS, endian=0)):
        entries = parse_ldcache(data)
        assert [(e.key, e.value, e.flags) for e in entries] == _expect(ITEMS)


def test_hand_built_compat_prefers_new_section() -> None:
    old = build_old([(0x0303, "libstale.so.1", "/old/libstale.so.1")])
    # The old section takes 16 + 12 = 28 bytes; the new one starts at the next 8-byte boundary.
    padded = old[:28] + b"\0" * 4
    new = build_new(ITEMS)
    entries = parse_ldcache(padded + new)
    assert [e.key for e in entries] == [k for _, k, _ in ITEMS]


def test_old_format_with_unrelated_trailer_uses_old_entries() -> None:
    data = build_old(ITEMS) + b"\0" * 64
    assert [e.key for e in parse_ldcache(data)] == [k for _, k, _ in ITEMS]


def test_empty_caches() -> None:
    assert parse_ldcache(build_new([])) == []
    assert parse_ldcache(build_old([])) == []


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "neither 'ld.so-1.7.0' nor"),
        (b"\x7fELF\x02\x01\x01" + b"\0" * 60, "not a glibc loader cache"),
        (b"ld.so-1.7.0\0", "old-format header is truncated"),
        (b"ld.so-1.7.0\0" + struct.pack("<I", 1000), "claims 1000 entries"),
        (b"glibc-ld.so.cache1.1" + b"\0" * 10, "header at offset 0 is truncated"),
    ],
)
def test_garbage_is_rejected(data: bytes, message: str) -> None:
    with pytest.raises(HostDiscoveryError, match=re.escape(message)):
        parse_ldcache(data)


def test_truncated_new_entries() -> None:
    data = build_new(ITEMS)
    with pytest.raises(HostDiscoveryError, match="claims 4 entries"):
        parse_ldcache(data[: 48 + 24 * 2])


def test_string_offset_out_of_range() -> None:
    data = bytearray(build_new(ITEMS[:1]))
    struct.pack_into("<I", data, 48 + 4, 10_000)  # key offset of entry 0
    with pytest.raises(HostDiscoveryError, match="key string offset 10000 is outside"):
        parse_ldcache(bytes(data))


def test_unterminated_string() -> None:
    data = build_new(ITEMS[:1])
    with pytest.raises(HostDiscoveryError, match="not NUL-terminated"):
        parse_ldcache(data[:-1])


def test_invalid_byte_order_flag() -> None:
    with pytest.raises(HostDiscoveryError, match="byte-order flag 1 is invalid"):
        parse_ldcache(build_new(ITEMS, endian=1))


def test_read_ldcache_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "ld.so.cache"
    bad.write_bytes(b"garbage garbage garbage")
    with pytest.raises(HostDiscoveryError, match=re.escape(str(bad))):
        read_ldcache(str(bad))
    with pytest.raises(HostDiscoveryError, match=r"cannot read ld\.so\.cache"):
        read_ldcache(str(tmp_path / "absent"))


def test_entry_value_type() -> None:
    e = LdCacheEntry(key="k", value="v", flags=0x0303, is_64bit=True, arch="x86-64")
    assert e.is_elf
    assert not LdCacheEntry(key="k", value="v", flags=0x0002, is_64bit=False, arch="i386").is_elf

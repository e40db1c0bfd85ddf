"""Writing ld.so.cache: glibc's comparison, ldconfig's order, and both file layouts, checked against
glibc's own ldconfig (it writes the reference caches and reads ours back with ``ldconfig -p``)."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host import CacheRecord, parse_cache_file, sort_records, write_cache
from nri_plugin.host.ldcache import HWCAP_EXTENSION, compare_records, libcmp
from tests.fakehost.builder import FAKE_LIB_SOURCE, compile_shared

pytestmark = pytest.mark.skipif(shutil.which("ldconfig") is None, reason="needs glibc's ldconfig")
_LINE = re.compile(r"^\t(\S+) \(([^)]*)\) => (\S+)$", re.M)
X86_64 = 0x0303


def _ldconfig_p(cache: Path) -> list[tuple[str, str, str]]:
    out = subprocess.run(["ldconfig", "-p", "-C", str(cache)], capture_output=True, text=True, check=True)
    return _LINE.findall(out.stdout)


@pytest.mark.parametrize(
    ("a", "b", "sign"),
    [
        (b"libz.so.10", b"libz.so.9", 1),  # digit runs compare as numbers
        (b"libz.so.9", b"libz.so.10", -1),
        (b"libz.so.1", b"libz.so.1", 0),
        (b"libz.so.01", b"libz.so.1", 0),  # leading zeros: the same number
        (b"lib9.so", b"libA.so", 1),  # a digit sorts after a non-digit
        (b"libA.so", b"liba.so", -1),
        (b"libc.so", b"libc.so.6", -1),  # a prefix first
        (b"libc.so.6", b"libc.so", 1),
        (b"lib\xe9.so", b"libe.so", -1),  # plain (signed) char, as glibc on x86
    ],
)
def test_libcmp_is_glibcs_comparison(a: bytes, b: bytes, sign: int) -> None:
    got = libcmp(a, b)
    assert (got > 0) - (got < 0) == sign


def test_same_name_entries_order_by_flags_hwcap_and_osversion_and_stay_stable() -> None:
    plain = CacheRecord(b"libx.so.1", b"/a/libx.so.1", X86_64)
    other_dir = CacheRecord(b"libx.so.1", b"/b/libx.so.1", X86_64)
    i386 = CacheRecord(b"libx.so.1", b"/i/libx.so.1", 0x0003)
    hwcap = CacheRecord(b"libx.so.1", b"/h/libx.so.1", X86_64, hwcap=0b11)
    ext = CacheRecord(b"libx.so.1", b"/e/libx.so.1", X86_64, hwcap=HWCAP_EXTENSION)
    newer_os = CacheRecord(b"libx.so.1", b"/o/libx.so.1", X86_64, osversion=7)
    ordered = sort_records([i386, plain, newer_os, other_dir, hwcap, ext])
    assert ordered == [ext, hwcap, newer_os, plain, other_dir, i386]
    assert compare_records(plain, other_dir) == 0  # equal: the first added stays first


def _lib(directory: Path, file_name: str, soname: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(compile_shared(FAKE_LIB_SOURCE, soname, [f"-Wl,-soname,{soname}"]), directory / file_name)


# Names chosen for the comparison's corners: numeric runs, case, '-' and '_', prefixes.
NAMES = [
    "libfoo.so.1", "libfoo.so.2", "libfoo.so.10", "libfoo-bar.so.1", "libfoo_bar.so.1", "libA.so.1",
    "liba.so.1", "lib9.so.1", "libfoo.so.1.2", "libz.so.1", "libzz.so.0",
]  # fmt: skip


@pytest.fixture(scope="module")
def ldconfig_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with libraries in a system directory and an ld.so.conf.d directory, cached by the
    host's ldconfig (-r: chroot into it; only the tree is written)."""
    root = tmp_path_factory.mktemp("ldtree")
    for i, name in enumerate(NAMES):
        _lib(root / ("usr/lib/x86_64-linux-gnu" if i % 2 else "opt/extra"), name, name)
    _lib(root / "opt/extra", "libbar.so.1.2.3", "libbar.so.1")  # ldconfig links libbar.so.1 to it
    _lib(root / "usr/lib/x86_64-linux-gnu", "libfoo.so.1", "libfoo.so.1")  # one name in two dirs
    (root / "etc/ld.so.conf.d").mkdir(parents=True)
    (root / "etc/ld.so.conf").write_text("include /etc/ld.so.conf.d/*.conf\n")
    (root / "etc/ld.so.conf.d/extra.conf").write_text("/opt/extra\n")
    (root / "var/cache/ldconfig").mkdir(parents=True)
    subprocess.run(["ldconfig", "-r", str(root)], check=True, capture_output=True)
    return root


def test_sorting_reproduces_the_order_ldconfig_wrote(ldconfig_tree: Path) -> None:
    reference = parse_cache_file((ldconfig_tree / "etc/ld.so.cache").read_bytes()).records
    assert len(reference) >= len(NAMES)
    for seed in range(5):
        shuffled = list(reference)
        random.Random(seed).shuffle(shuffled)
        got = sort_records(shuffled)
        # same-name, same-flags entries keep their input order, so compare what ldconfig orders
        assert [(r.key, r.flags) for r in got] == [(r.key, r.flags) for r in reference]
    assert sort_records(list(reference)) == list(reference)  # and a sorted cache stays as it is


@pytest.mark.parametrize("old_section", [False, True])
def test_glibc_reads_what_we_write(tmp_path: Path, ldconfig_tree: Path, old_section: bool) -> None:
    reference = parse_cache_file((ldconfig_tree / "etc/ld.so.cache").read_bytes()).records
    extra = [CacheRecord(b"libcuda.so.1", b"/usr/lib64/libcuda.so.1", X86_64)]
    records = sort_records([*extra, *reference])
    data = write_cache(records, old_section=old_section)
    (tmp_path / "c").write_bytes(data)
    rows = _ldconfig_p(tmp_path / "c")
    assert [(k, v) for k, _d, v in rows] == [(r.key.decode(), r.value.decode()) for r in records]
    assert all(d == "libc6,x86-64" for _k, d, _v in rows)
    parsed = parse_cache_file(data)
    assert parsed.records == tuple(records) and parsed.has_old is old_section


def test_an_old_section_holds_an_even_number_of_entries_and_its_own_offsets(tmp_path: Path) -> None:
    records = [CacheRecord(b"liba.so.1", b"/l/liba.so.1", X86_64)] * 3
    data = write_cache(records, old_section=True)
    (tmp_path / "c").write_bytes(data)
    nlibs = int.from_bytes(data[12:16], "little")
    assert nlibs == 4  # padded to even, as ldconfig -c compat does
    strings = 16 + nlibs * 12
    key = int.from_bytes(data[16 + 4 : 16 + 8], "little")
    assert data[strings + key :].startswith(b"liba.so.1\0")  # old offsets count from the old entries' end


def test_parsing_ldconfigs_compat_format(tmp_path: Path, ldconfig_tree: Path) -> None:
    root = tmp_path / "root"
    shutil.copytree(ldconfig_tree, root, symlinks=True)
    subprocess.run(["ldconfig", "-r", str(root), "-c", "compat"], check=True, capture_output=True)
    parsed = parse_cache_file((root / "etc/ld.so.cache").read_bytes())
    assert parsed.has_old
    rows = _ldconfig_p(root / "etc/ld.so.cache")
    assert [(r.key.decode(), r.value.decode()) for r in parsed.records] == [(k, v) for k, _d, v in rows]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=0, max_value=600))
def test_parsing_any_bytes_either_works_or_says_the_cache_is_corrupt(noise: bytes, cut: int) -> None:
    good = write_cache([CacheRecord(b"libx.so.1", b"/l/libx.so.1", X86_64)], old_section=True)
    for data in (noise, good[:cut] + noise, good[:cut], b"glibc-ld.so.cache1.1" + noise):
        try:
            parse_cache_file(data)
        except HostDiscoveryError as exc:
            assert "ld.so.cache" in str(exc)

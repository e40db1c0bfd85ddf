"""The image view over snapshot layers: overlay semantics, symlinks confined to the image, budgets,
and what the image's loader setup is read as (``read_facts``), hostile images included."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nri_plugin.errors import ImageReadError
from nri_plugin.host import CacheRecord, parse_cache_file, write_cache
from nri_plugin.image import Budget, ImageRoot, read_facts
from nri_plugin.image import scan as scan_mod
from tests.fakehost.builder import FAKE_LIB_SOURCE, compile_shared

X86_64 = 0x0303


def root_of(*layers: Path, calls: int = 100_000, seconds: float = 30.0) -> ImageRoot:
    return ImageRoot([str(layer) for layer in layers], Budget.of(calls, seconds))


def put(layer: Path, path: str, data: bytes = b"x") -> Path:
    p = layer / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def link(layer: Path, path: str, target: str) -> None:
    p = layer / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.symlink_to(target)


def whiteout(layer: Path, path: str) -> None:
    p = layer / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(p, 0o600 | 0o020000, os.makedev(0, 0))  # overlayfs' whiteout: char device 0/0


def lib(layer: Path, path: str, soname: str) -> None:
    p = layer / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(compile_shared(FAKE_LIB_SOURCE, soname, [f"-Wl,-soname,{soname}"]), p)


@pytest.fixture
def layers(tmp_path: Path) -> tuple[Path, Path]:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    upper.mkdir()
    lower.mkdir()
    return upper, lower


# --- overlay semantics ---------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are device nodes (mknod needs root)")
def test_whiteouts_hide_lower_entries(layers: tuple[Path, Path]) -> None:
    upper, lower = layers
    put(lower, "/etc/gone", b"lower")
    put(lower, "/etc/gone-oci", b"lower")
    put(lower, "/etc/kept", b"lower")
    whiteout(upper, "/etc/gone")
    put(upper, "/etc/.wh.gone-oci", b"")
    root = root_of(upper, lower)
    assert root.lookup("/etc/gone") is None
    assert root.lookup("/etc/gone-oci") is None
    etc = root.lookup("/etc")
    assert etc is not None and root.listdir(etc) == ["kept"]


def test_an_opaque_directory_hides_the_lower_one(layers: tuple[Path, Path]) -> None:
    upper, lower = layers
    put(lower, "/opt/a/old", b"lower")
    put(upper, "/opt/a/new", b"upper")
    put(upper, "/opt/a/.wh..wh..opq", b"")
    root = root_of(upper, lower)
    node = root.lookup("/opt/a")
    assert node is not None and root.listdir(node) == ["new"]
    assert root.lookup("/opt/a/old") is None


def test_an_upper_file_hides_a_lower_directory_and_the_top_layer_wins(layers: tuple[Path, Path]) -> None:
    upper, lower = layers
    put(lower, "/srv/d/inner", b"lower")
    put(upper, "/srv/d", b"a file now")
    put(lower, "/srv/f", b"lower")
    put(upper, "/srv/f", b"upper")
    root = root_of(upper, lower)
    assert root.lookup("/srv/d/inner") is None
    f = root.lookup("/srv/f")
    assert f is not None and root.read(f, 100) == b"upper"
    srv = root.lookup("/srv")
    assert srv is not None and root.listdir(srv) == ["d", "f"]


def test_symlinks_resolve_inside_the_image_only(layers: tuple[Path, Path], tmp_path: Path) -> None:
    upper, lower = layers
    host_secret = put(tmp_path / "host", "/secret", b"host data")
    put(lower, "/lib/x86_64-linux-gnu/libc.so.6", b"libc")
    link(lower, "/lib64/ld.so", "/lib/x86_64-linux-gnu/libc.so.6")  # absolute: from the image root
    link(upper, "/up", "../../../../../lib/x86_64-linux-gnu/libc.so.6")  # '..' stops at the root
    link(upper, "/escape", str(host_secret))  # a host path the image does not have
    link(upper, "/loop", "/loop")
    root = root_of(upper, lower)
    for path in ("/lib64/ld.so", "/up"):
        node = root.lookup(path)
        assert node is not None and root.read(node, 100) == b"libc", path
        assert node.path == "/lib/x86_64-linux-gnu/libc.so.6"
    assert root.lookup("/escape") is None
    with pytest.raises(ImageReadError, match="too many levels of symbolic links"):
        root.lookup("/loop")


def test_reads_are_bounded(layers: tuple[Path, Path]) -> None:
    upper, _lower = layers
    big = put(upper, "/big", b"")
    os.truncate(big, 9 << 20)  # sparse: costs nothing
    root = root_of(upper)
    node = root.lookup("/big")
    assert node is not None
    with pytest.raises(ImageReadError, match="more than the 1024 this plugin reads"):
        root.read(node, 1024)
    for i in range(50):
        put(upper, f"/many/{i}")
    with pytest.raises(ImageReadError, match="file-system operations"):
        tiny = root_of(upper, calls=20)
        many = tiny.lookup("/many")
        assert many is not None
        tiny.listdir(many)
    with pytest.raises(ImageReadError, match="time budget"):
        root_of(upper, seconds=-1.0)


def test_a_layer_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="not a directory"):
        root_of(tmp_path / "missing")


# --- read_facts ------------------------------------------------------------------------------


def debian_image(layer: Path, *, cache: bool = True) -> None:
    lib(layer, "/lib/x86_64-linux-gnu/libc.so.6", "libc.so.6")
    lib(layer, "/opt/vendor/lib/libvendor.so.1", "libvendor.so.1")
    lib(layer, "/opt/vendor/lib/libreal.so.2.5", "libreal.so.2")  # no SONAME link: the file is listed
    put(layer, "/etc/ld.so.conf", b"# comment\ninclude /etc/ld.so.conf.d/*.conf\n")
    put(layer, "/etc/ld.so.conf.d/vendor.conf", b"/opt/vendor/lib\n")
    (layer / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    if cache:
        put(
            layer,
            "/etc/ld.so.cache",
            write_cache([CacheRecord(b"libc.so.6", b"/lib/x86_64-linux-gnu/libc.so.6", X86_64)]),
        )


def test_an_image_cache_is_read_with_its_format(tmp_path: Path) -> None:
    debian_image(tmp_path)
    facts = read_facts(root_of(tmp_path))
    assert facts.source == "image-cache" and facts.multiarch and not facts.has_old
    assert [r.key for r in facts.records] == [b"libc.so.6"]


def test_without_a_cache_the_conf_directories_are_scanned_like_ldconfig(tmp_path: Path) -> None:
    debian_image(tmp_path, cache=False)
    facts = read_facts(root_of(tmp_path))
    assert facts.source == "image-dirs"
    got = {(r.key, r.value, r.flags) for r in facts.records}
    assert got == {
        (b"libvendor.so.1", b"/opt/vendor/lib/libvendor.so.1", X86_64),
        (b"libreal.so.2", b"/opt/vendor/lib/libreal.so.2.5", X86_64),
        (b"libc.so.6", b"/lib/x86_64-linux-gnu/libc.so.6", X86_64),
    }


@pytest.mark.skipif(shutil.which("ldconfig") is None or os.geteuid() != 0, reason="needs ldconfig -r (root)")
def test_the_directory_scan_finds_what_ldconfig_caches(tmp_path: Path) -> None:
    debian_image(tmp_path, cache=False)
    lib(tmp_path, "/usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1")
    lib(tmp_path, "/usr/lib/x86_64-linux-gnu/libnosoname.so", "libnosoname.so")
    (tmp_path / "var/cache/ldconfig").mkdir(parents=True)
    link(tmp_path, "/opt/vendor/lib/libreal.so.2", "libreal.so.2.5")  # what ldconfig would create
    subprocess.run(["ldconfig", "-r", str(tmp_path), "-X"], check=True, capture_output=True)
    reference = parse_cache_file((tmp_path / "etc/ld.so.cache").read_bytes()).records
    (tmp_path / "etc/ld.so.cache").unlink()
    facts = read_facts(root_of(tmp_path))
    assert {(r.key, r.value) for r in facts.records} == {(r.key, r.value) for r in reference}


def test_compat_libraries_are_found_through_a_symlinked_cuda_dir(tmp_path: Path) -> None:
    debian_image(tmp_path)
    link(tmp_path, "/usr/local/cuda", "cuda-12.8")
    lib(tmp_path, "/usr/local/cuda-12.8/compat/libcuda.so.570.86.10", "libcuda.so.1")
    link(tmp_path, "/usr/local/cuda-12.8/compat/libcuda.so.1", "libcuda.so.570.86.10")
    lib(
        tmp_path,
        "/usr/local/cuda-12.8/compat/libnvidia-ptxjitcompiler.so.570.86.10",
        "libnvidia-ptxjitcompiler.so.1",
    )
    facts = read_facts(root_of(tmp_path))
    assert facts.compat_version == "570.86.10"
    assert {(r.key, r.value) for r in facts.compat_records} == {
        (b"libcuda.so.1", b"/usr/local/cuda-12.8/compat/libcuda.so.1"),
        (
            b"libnvidia-ptxjitcompiler.so.1",
            b"/usr/local/cuda-12.8/compat/libnvidia-ptxjitcompiler.so.570.86.10",
        ),
    }
    lib(tmp_path, "/usr/local/cuda-12.8/compat/libcuda.so.575.1", "libcuda.so.1")
    assert read_facts(root_of(tmp_path)).compat_version == ""  # two candidates: none, as the toolkit


# --- hostile images --------------------------------------------------------------------------


def _valid_cache() -> bytes:
    return write_cache([CacheRecord(b"libc.so.6", b"/lib/x86_64-linux-gnu/libc.so.6", X86_64)])


def _offsets_out_of_range() -> bytes:
    data = bytearray(_valid_cache())
    data[48 + 4 : 48 + 8] = (1 << 20).to_bytes(4, "little")  # the first entry's key offset
    return bytes(data)


def _hostile(kind: str, layer: Path, host: Path) -> None:
    put(layer, "/bin/sh", b"")
    if kind == "etc-is-root":
        link(layer, "/etc", "/")
        put(layer, "/ld.so.cache", _valid_cache())
    elif kind == "cache-links-to-host":
        put(
            host,
            "/ld.so.cache",
            write_cache([CacheRecord(b"libhostsecret.so.1", b"/x/libhostsecret.so.1", X86_64)]),
        )
        link(layer, "/etc/ld.so.cache", str(host / "ld.so.cache"))
    elif kind == "truncated":
        put(layer, "/etc/ld.so.cache", _valid_cache()[:60])
    elif kind == "huge":
        put(layer, "/etc/ld.so.cache", b"")
        os.truncate(layer / "etc/ld.so.cache", scan_mod.MAX_CACHE_BYTES + 1)
    elif kind == "offsets-out-of-range":
        put(layer, "/etc/ld.so.cache", _offsets_out_of_range())
    elif kind == "dotdot-entry":
        put(
            layer,
            "/etc/ld.so.cache",
            write_cache([CacheRecord(b"libc.so.6", b"/lib/../../etc/shadow", X86_64)]),
        )
    elif kind == "relative-entry":
        put(layer, "/etc/ld.so.cache", write_cache([CacheRecord(b"libc.so.6", b"lib/libc.so.6", X86_64)]))
    elif kind == "slash-in-name":
        put(layer, "/etc/ld.so.cache", write_cache([CacheRecord(b"../x", b"/lib/x", X86_64)]))
    elif kind == "hwcaps-entry":
        ext = CacheRecord(b"libc.so.6", b"/lib/glibc-hwcaps/x86-64-v3/libc.so.6", X86_64, hwcap=1 << 62)
        put(layer, "/etc/ld.so.cache", write_cache([ext]))
    elif kind == "cache-is-a-directory":
        (layer / "etc/ld.so.cache").mkdir(parents=True)


HOSTILE = {
    "etc-is-root": "the image's /etc is a symlink, not a directory",
    "cache-links-to-host": "which does not exist inside the image",
    "truncated": "is not usable",
    "huge": "more than the 8388608 this plugin reads",
    "offsets-out-of-range": "outside the",
    "dotdot-entry": "not an absolute, normalized path",
    "relative-entry": "not an absolute, normalized path",
    "slash-in-name": "not a file name",
    "hwcaps-entry": "glibc-hwcaps",
    "cache-is-a-directory": "is a dir, not a regular file",
}


@pytest.fixture
def host_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every path the image code hands to the host's file-system calls."""
    seen: list[str] = []

    def spy(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(path: Any, *args: Any, **kwargs: Any) -> Any:
            seen.append(os.fsdecode(path))
            return fn(path, *args, **kwargs)

        return wrapped

    for name in ("lstat", "open", "readlink", "scandir", "getxattr"):
        monkeypatch.setattr(f"nri_plugin.image.rootfs.os.{name}", spy(getattr(os, name)))
    yield seen


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_a_hostile_image_is_refused_with_a_clear_reason_and_no_host_read(
    tmp_path: Path, host_calls: list[str], kind: str
) -> None:
    layer, host = tmp_path / "layer", tmp_path / "host"
    layer.mkdir()
    _hostile(kind, layer, host)
    host_calls.clear()
    with pytest.raises(ImageReadError) as err:
        read_facts(root_of(layer))
    assert HOSTILE[kind] in str(err.value)
    assert any(p.startswith(str(layer)) for p in host_calls)  # the spy sees the reads
    outside = [p for p in host_calls if not (p == str(layer) or p.startswith(str(layer) + "/"))]
    assert outside == [], "read a host path outside the image's layers"

"""The test images: reproducible archives, and where each layout's loader finds libcuda.so.1.

The placement matrix is the basis of the plugin's library placement decision: a Debian-layout
loader searches /lib/x86_64-linux-gnu and /usr/lib/x86_64-linux-gnu but not /usr/lib64; a
RHEL-layout loader searches /lib64 and /usr/lib64 but not /usr/lib/x86_64-linux-gnu. Neither
needs LD_LIBRARY_PATH or an ld.so.cache for its own directories. So the plugin mounts every
driver library under both /usr/lib/x86_64-linux-gnu and /usr/lib64.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from .containerd import Containerd
from .cri import ContainerRequest, CriClient, CriMount
from .deps import E2EDeps
from .images import (
    BuiltImages,
    build_images,
    build_layer,
    busybox_entries,
    debian_layout_entries,
    rhel_layout_entries,
    unpack_layer,
)

FAKE_CUDA_VERSION = 12040
FAKE_CUDA_SOURCE = f"""
int cuInit(unsigned int flags) {{ (void)flags; return 0; }}
int cuDriverGetVersion(int *v) {{ *v = {FAKE_CUDA_VERSION}; return 0; }}
"""

DEBIAN_LIBDIR = "usr/lib/x86_64-linux-gnu"
RHEL_LIBDIR = "usr/lib64"


@pytest.fixture(scope="module")
def fake_libcuda(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fakecuda")
    src = d / "fakecuda.c"
    src.write_text(FAKE_CUDA_SOURCE)
    out = d / "libcuda.so.1"
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    return out


def test_layers_are_reproducible(e2e_deps: E2EDeps) -> None:
    first = build_layer(busybox_entries(e2e_deps))
    second = build_layer(busybox_entries(e2e_deps))
    assert hashlib.sha256(first).digest() == hashlib.sha256(second).digest()


def test_archives_are_reproducible(e2e_deps: E2EDeps, e2e_images: BuiltImages, tmp_path: Path) -> None:
    again = build_images(e2e_deps, tmp_path)
    for key, archive in e2e_images.archives.items():
        assert archive.read_bytes() == again.archives[key].read_bytes(), key


@pytest.mark.parametrize(
    ("layout", "libdir", "found"),
    [
        ("debian", DEBIAN_LIBDIR, True),
        ("debian", RHEL_LIBDIR, False),
        ("debian", None, False),
        ("rhel", RHEL_LIBDIR, True),
        ("rhel", DEBIAN_LIBDIR, False),
        ("rhel", None, False),
    ],
)
def test_loader_search_dirs_by_layout(
    e2e_deps: E2EDeps,
    e2e_images: BuiltImages,
    fake_libcuda: Path,
    tmp_path: Path,
    layout: str,
    libdir: str | None,
    found: bool,
) -> None:
    make = debian_layout_entries if layout == "debian" else rhel_layout_entries
    root = tmp_path / "rootfs"
    unpack_layer(make(e2e_deps, e2e_images.probe_binary), root)
    assert not (root / "etc" / "ld.so.cache").exists()
    if libdir is not None:
        (root / libdir).mkdir(parents=True, exist_ok=True)
        shutil.copy(fake_libcuda, root / libdir / "libcuda.so.1")
    chroot = shutil.which("chroot", path="/usr/sbin:/usr/bin:/sbin:/bin")
    assert chroot, "chroot not found (coreutils)"
    res = subprocess.run(
        [chroot, str(root), "/usr/bin/gpu-probe"], capture_output=True, text=True, env={"PATH": "/bin"}
    )
    out = res.stdout.strip()
    if found:
        assert res.returncode == 0, out + res.stderr
        expected = rf"PROBE_OK driver_version={FAKE_CUDA_VERSION} path=/\S+/libcuda\.so\.1"
        assert re.fullmatch(expected, out), out
    else:
        assert res.returncode == 1, out + res.stderr
        missing = "PROBE_FAIL dlopen libcuda.so.1: libcuda.so.1: cannot open shared object file"
        assert out.startswith(missing), out


@pytest.mark.parametrize("image", ["debian-layout", "rhel-layout"])
def test_probe_in_container_with_both_placements(
    containerd: Containerd, cri: CriClient, e2e_images: BuiltImages, fake_libcuda: Path, image: str
) -> None:
    # The plugin's placement: the library under both directories; each layout picks its own.
    mounts = [
        CriMount(str(fake_libcuda), f"/{DEBIAN_LIBDIR}/libcuda.so.1", readonly=True),
        CriMount(str(fake_libcuda), f"/{RHEL_LIBDIR}/libcuda.so.1", readonly=True),
    ]
    result = cri.run_container(
        ContainerRequest(image=e2e_images.refs[image], command=["/usr/bin/gpu-probe"], mounts=mounts)
    )
    assert result.exit_code == 0, result.log
    expected_dir = "/usr/lib/x86_64-linux-gnu" if image == "debian-layout" else "/lib64"
    expected = f"PROBE_OK driver_version={FAKE_CUDA_VERSION} path={expected_dir}/libcuda.so.1"
    assert result.log.strip() == expected
    assert "LD_LIBRARY_PATH" not in result.env

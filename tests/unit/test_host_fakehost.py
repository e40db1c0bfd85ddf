"""The fake host itself: real ELF objects with the right SONAMEs, a loadable fake libcuda, real nodes."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
from pathlib import Path

from tests.fakehost import FakeHost, build_fake_host, make_gpus


def _soname(path: Path) -> str:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "(SONAME)" in ln)
    return line.split("[", 1)[1].rstrip("]")


def _host(tmp_path: Path) -> FakeHost:
    return build_fake_host(tmp_path / "r", gpus=make_gpus(2), cuda_version=12030, compat32=True)


def test_libraries_are_elf_with_sonames(tmp_path: Path) -> None:
    host = _host(tmp_path)
    cuda = host.path(f"{host.lib_dir}/libcuda.so.550.54.14")
    assert cuda.read_bytes()[:5] == b"\x7fELF\x02"  # 64-bit
    assert _soname(cuda) == "libcuda.so.1"
    assert os.readlink(host.path(f"{host.lib_dir}/libcuda.so.1")) == "libcuda.so.550.54.14"
    glcore = host.path(f"{host.lib_dir}/libnvidia-glcore.so.550.54.14")
    assert _soname(glcore) == "libnvidia-glcore.so.550.54.14"
    cuda32 = host.path("/usr/lib/i386-linux-gnu/libcuda.so.550.54.14")
    assert cuda32.read_bytes()[:5] == b"\x7fELF\x01"  # 32-bit
    assert f"{host.lib_dir}/libcuda.so.550.54.14" in host.libraries["compute"]


def test_fake_libcuda_answers_a_probe(tmp_path: Path) -> None:
    host = _host(tmp_path)
    lib = ctypes.CDLL(str(host.path(f"{host.lib_dir}/libcuda.so.1")))
    version = ctypes.c_int(0)
    assert lib.cuInit(0) == 0
    assert lib.cuDriverGetVersion(ctypes.byref(version)) == 0
    assert version.value == 12030


def test_device_nodes_and_sockets_are_real(tmp_path: Path) -> None:
    host = _host(tmp_path)
    st = os.stat(host.path("/dev/nvidia1"))
    assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (195, 1)
    uvm = os.stat(host.path("/dev/nvidia-uvm-tools"))
    assert (os.major(uvm.st_rdev), os.minor(uvm.st_rdev)) == (host.uvm_major, 1)
    assert stat.S_ISSOCK(os.stat(host.path("/run/nvidia-persistenced/socket")).st_mode)
    assert host.nvml_config is not None and "driver 550.54.14" in host.nvml_config.read_text()


def test_two_hosts_share_compiled_objects(tmp_path: Path) -> None:
    a = build_fake_host(tmp_path / "a", gpus=make_gpus(1), capabilities_libs=("compute",))
    b = build_fake_host(tmp_path / "b", gpus=make_gpus(1), capabilities_libs=("compute",))
    fa = a.path(f"{a.lib_dir}/libcuda.so.550.54.14")
    fb = b.path(f"{b.lib_dir}/libcuda.so.550.54.14")
    assert fa.read_bytes() == fb.read_bytes()
    assert not os.path.samefile(fa, fb)  # copies: a test may modify its own host freely

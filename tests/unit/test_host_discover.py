"""discover() over fake hosts: NVML path, /proc fallback, no driver, libraries, nodes, IPC, firmware."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.discover import LIBRARY_GROUPS, discover, explain_no_driver, select_libraries
from nri_plugin.host.ldcache import read_ldcache
from nri_plugin.host.model import HostRoots, IpcPath
from nri_plugin.host.nvml import NvmlInfo
from tests.fakehost import FakeGpu, FakeHost, FakeMig, build_fake_host, make_gpus, mig_cap_minor
from tests.fakehost.builder import build_driver_lib


@pytest.fixture(scope="module")
def full_host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    gpus = make_gpus(2)
    gpus[1].mig = [FakeMig(gi=1, ci=0, uuid="MIG-0b0b0b0b-1111-2222-3333-444444444444")]
    return build_fake_host(tmp_path_factory.mktemp("disc") / "root", gpus=gpus, compat32=True)


def test_full_host_via_nvml(full_host: FakeHost) -> None:
    snap = discover(full_host.roots)
    assert snap is not None
    assert (snap.source, snap.driver_version, snap.cuda_version) == ("nvml", "550.54.14", "12.4")
    assert [g.uuid for g in snap.gpus] == [g.uuid for g in full_host.gpus]
    assert snap.gpus[1].mig_enabled and snap.gpus[1].mig_devices[0].gpu_instance_id == 1
    assert snap.gpus[0].brand == "Tesla" and snap.gpus[0].compute_capability == "9.0"
    # Every library the fake driver installed is found, in its group, resolved to the versioned file.
    for group, paths in full_host.libraries.items():
        groups = ("graphics", "graphics-glvnd") if group == "graphics" else (group,)
        found = {lib.host_path for g in groups for lib in snap.libraries.get(g, ())}
        assert {str(full_host.path(p)) for p in paths} == found
    cuda = next(lib for lib in snap.libraries["compute"] if lib.soname == "libcuda.so.1")
    assert cuda.file_name == "libcuda.so.550.54.14" and not cuda.is_32bit
    cuda32 = next(lib for lib in snap.libraries32["compute"] if lib.soname == "libcuda.so.1")
    assert cuda32.host_path == str(full_host.path("/usr/lib/i386-linux-gnu/libcuda.so.550.54.14"))
    assert cuda32.is_32bit
    assert "missing library libnvidia-nscq.so (group utility, driver 550.54.14)" in snap.missing
    # Binaries, IPC, firmware.
    utility_bins = ("nvidia-smi", "nvidia-debugdump", "nvidia-persistenced")
    assert snap.binaries["utility"] == tuple(str(full_host.path(f"/usr/bin/{b}")) for b in utility_bins)
    assert len(snap.binaries["compute"]) == 2
    assert snap.persistenced_socket == IpcPath(
        "/run/nvidia-persistenced/socket", str(full_host.path("/run/nvidia-persistenced/socket"))
    )
    assert snap.fabricmanager_socket == IpcPath(
        "/run/nvidia-fabricmanager/socket", str(full_host.path("/run/nvidia-fabricmanager/socket"))
    )
    assert snap.mps_pipe_dir == IpcPath("/tmp/nvidia-mps", str(full_host.path("/tmp/nvidia-mps")))
    assert [os.path.basename(f) for f in snap.firmware] == ["gsp_ga10x.bin", "gsp_tu10x.bin"]
    # Majors from /proc/devices; MIG minors from mig-minors.
    assert snap.char_majors["nvidia"] == 195
    assert snap.char_majors["nvidia-uvm"] == full_host.uvm_major
    assert snap.char_majors["nvidia-caps"] == full_host.caps_major
    assert snap.mig_minors["config"] == 1 and snap.mig_minors["monitor"] == 2
    assert snap.mig_minors["gpu1/gi1/ci0/access"] == mig_cap_minor(1, 1, 0)


def test_device_nodes_stat(full_host: FakeHost) -> None:
    snap = discover(full_host.roots, use_nvml=False)
    assert snap is not None
    nodes = snap.device_nodes
    expect = {
        "/dev/nvidiactl": (195, 255),
        "/dev/nvidia-modeset": (195, 254),
        "/dev/nvidia-uvm": (full_host.uvm_major, 0),
        "/dev/nvidia-uvm-tools": (full_host.uvm_major, 1),
        "/dev/nvidia0": (195, 0),
        "/dev/nvidia1": (195, 1),
        "/dev/nvidia-caps/nvidia-cap1": (full_host.caps_major, 1),
        "/dev/nvidia-caps/nvidia-cap2": (full_host.caps_major, 2),
    }
    for minor in (mig_cap_minor(1, 1), mig_cap_minor(1, 1, 0)):
        expect[f"/dev/nvidia-caps/nvidia-cap{minor}"] = (full_host.caps_major, minor)
    assert {p: (n.major, n.minor) for p, n in nodes.items()} == expect
    ctl = nodes["/dev/nvidiactl"]
    assert ctl.host_path == str(full_host.path("/dev/nvidiactl")) and ctl.type == "c"
    assert ctl.file_mode == 0o666 and (ctl.uid, ctl.gid) == (0, 0)
    assert nodes["/dev/nvidia-caps/nvidia-cap1"].file_mode == 0o400
    assert any("MIG capability device nodes listed in mig-minors are absent" in m for m in snap.missing)


def test_invalid_and_missing_device_nodes(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "r", gpus=make_gpus(2), capabilities_libs=("utility",))
    os.unlink(host.path("/dev/nvidia1"))
    os.mknod(host.path("/dev/nvidia1"), stat.S_IFCHR | 0o666, os.makedev(195, 7))  # wrong minor
    os.unlink(host.path("/dev/nvidia-modeset"))
    host.path("/dev/nvidia-modeset").write_text("regular file")
    os.unlink(host.path("/dev/nvidia-uvm-tools"))
    snap = discover(host.roots, use_nvml=False)
    assert snap is not None
    assert set(snap.device_nodes) >= {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia-uvm"}
    assert not {"/dev/nvidia1", "/dev/nvidia-modeset", "/dev/nvidia-uvm-tools"} & set(snap.device_nodes)
    assert "invalid device node /dev/nvidia1: is 195:7, expected 195:1" in snap.missing
    not_char = "invalid device node /dev/nvidia-modeset: not a character device (expected 195:254)"
    assert not_char in snap.missing
    assert f"missing device node /dev/nvidia-uvm-tools ({host.uvm_major}:1)" in snap.missing


def test_dev_symlink_cannot_escape_dev_root(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility",))
    os.unlink(host.path("/dev/nvidiactl"))
    os.symlink("/dev/null", host.path("/dev/nvidiactl"))  # would be the host's /dev/null if followed
    snap = discover(host.roots, use_nvml=False)
    assert snap is not None and "/dev/nvidiactl" not in snap.device_nodes
    assert "missing device node /dev/nvidiactl (195:255)" in snap.missing


def test_proc_fallback_without_libnvidia_ml(tmp_path: Path) -> None:
    gpus = make_gpus(3)
    host = build_fake_host(tmp_path / "r", gpus=gpus, with_nvml=False, driver_version="535.104.05")
    snap = discover(host.roots)
    assert snap is not None
    assert (snap.source, snap.driver_version, snap.cuda_version) == ("proc", "535.104.05", None)
    by_bus = sorted(gpus, key=lambda g: g.nvml_bus_id())
    assert [(g.index, g.uuid, g.minor, g.bus_id) for g in snap.gpus] == [
        (i, g.uuid, g.minor, g.nvml_bus_id()) for i, g in enumerate(by_bus)
    ]
    assert all(g.brand is None and g.compute_capability is None for g in snap.gpus)
    assert snap.gpus[0].model == "NVIDIA H100 80GB HBM3"
    note = "libnvidia-ml.so.1 not in the ld.so.cache: using /proc/driver/nvidia for device facts"
    assert note in snap.missing
    assert "utility" not in snap.libraries or all(
        lib.soname != "libnvidia-ml.so.1" for lib in snap.libraries["utility"]
    )


def test_use_nvml_false_matches_proc(full_host: FakeHost) -> None:
    snap = discover(full_host.roots, use_nvml=False)
    assert snap is not None and snap.source == "proc" and snap.driver_version == "550.54.14"
    assert {g.uuid for g in snap.gpus} == {g.uuid for g in full_host.gpus}
    assert not any(g.mig_enabled for g in snap.gpus)


def test_nvml_failure_falls_back_to_proc(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility", "compute"))
    host.write_nvml_config(["init_error 9"])
    snap = discover(host.roots)
    assert snap is not None and snap.source == "proc" and len(snap.gpus) == 1
    assert any(m.startswith("NVML unavailable, using /proc/driver/nvidia instead") for m in snap.missing)


def test_driver_version_from_proc_when_no_libraries(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("video",), with_nvml=False)
    snap = discover(host.roots)
    assert snap is not None and snap.driver_version == "550.54.14" and snap.source == "proc"


def test_injected_nvml_query(full_host: FakeHost) -> None:
    calls: list[str] = []

    def fake(lib: str) -> NvmlInfo:
        calls.append(lib)
        return NvmlInfo(driver_version="550.54.14", cuda_version="12.4", gpus=())

    snap = discover(full_host.roots, nvml_query=fake)
    assert snap is not None and snap.gpus == () and snap.source == "nvml"
    assert calls == [str(full_host.path(f"{full_host.lib_dir}/libnvidia-ml.so.550.54.14"))]
    assert "/dev/nvidia0" not in snap.device_nodes  # only the GPUs NVML reported


def test_no_driver_host_returns_none(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    roots = HostRoots(
        driver_root=str(tmp_path),
        dev_root=str(tmp_path),
        proc_root=str(tmp_path / "proc"),
        run_root=str(tmp_path),
    )
    assert discover(roots) is None
    reason = explain_no_driver(roots)
    assert "no NVIDIA driver found" in reason and str(tmp_path) in reason and "driver root" in reason


def test_no_driver_with_unrelated_ldcache(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r",
        gpus=[],
        capabilities_libs=("video",),
        with_nvml=False,
        with_proc=False,
        device_nodes=False,
    )
    assert discover(host.roots) is None


def test_kernel_module_not_loaded_still_finds_libraries(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r",
        gpus=make_gpus(1),
        with_proc=False,
        device_nodes=False,
        capabilities_libs=("utility", "compute"),
    )
    host.write_nvml_config(["init_error 9"])
    snap = discover(host.roots)
    assert snap is not None and snap.gpus == () and snap.driver_version == "550.54.14"
    assert "compute" in snap.libraries
    assert "missing device node /dev/nvidiactl (195:255)" in snap.missing


def test_corrupt_ldcache_raises(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility",))
    host.path("/etc/ld.so.cache").write_bytes(b"corrupt")
    with pytest.raises(HostDiscoveryError, match=r"ld\.so\.cache"):
        discover(host.roots)


def test_version_suffix_filter_and_later_entry_wins(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility", "compute"), with_nvml=False
    )
    # A stale libcuda from an older driver in a second directory listed first in ld.so.conf ...
    stale_dir = host.path("/usr/lib/stale")
    stale_dir.mkdir()
    obj = build_driver_lib("libcuda.so.1", cuda_version=12020)
    (stale_dir / "libcuda.so.535.104.05").write_bytes(obj.read_bytes())
    (stale_dir / "libcuda.so.1").symlink_to("libcuda.so.535.104.05")
    # ... and a newer-version copy of the current one in a third directory.
    other = host.path("/opt/nvidia/lib")
    other.mkdir(parents=True)
    (other / "libcuda.so.550.54.14").write_bytes(obj.read_bytes())
    (other / "libcuda.so.1").symlink_to("libcuda.so.550.54.14")
    conf = host.path("/etc/ld.so.conf")
    conf.write_text("/usr/lib/stale\n" + conf.read_text() + "/opt/nvidia/lib\n")
    host.run_ldconfig()
    entries = [e for e in read_ldcache(str(host.path("/etc/ld.so.cache"))) if e.key == "libcuda.so.1"]
    assert len(entries) == 3
    libs = select_libraries(entries, host.roots.driver_root, "x86-64", "550.54.14")
    (cuda,) = libs["compute"]
    # The stale one fails the suffix check; of the two passing ones the later cache entry wins.
    passing = [e.value for e in entries if not e.value.startswith("/usr/lib/stale")]
    assert cuda.host_path == str(host.path(passing[-1]).resolve())
    assert cuda.file_name == "libcuda.so.550.54.14"


def test_ldcache_key_with_a_slash_is_never_a_library_name(tmp_path: Path) -> None:
    """The cache key becomes a file name under the container's library directories: a crafted
    cache whose key holds a slash must not steer a mount destination elsewhere."""
    import dataclasses

    host = build_fake_host(
        tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility", "compute"), with_nvml=False
    )
    good = [e for e in read_ldcache(str(host.path("/etc/ld.so.cache"))) if e.key == "libcuda.so.1"]
    assert len(good) == 1
    crafted = dataclasses.replace(good[0], key="libcuda.so/../../../etc/ld.so.preload")
    libs = select_libraries([crafted], host.roots.driver_root, "x86-64", "550.54.14")
    assert "compute" not in libs
    libs = select_libraries([crafted, good[0]], host.roots.driver_root, "x86-64", "550.54.14")
    assert [lib.soname for lib in libs["compute"]] == ["libcuda.so.1"]


def test_library_symlink_escaping_driver_root(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility", "compute"), with_nvml=False
    )
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "libcuda.so.550.54.14").write_text("not in the root")
    link = host.path(f"{host.lib_dir}/libcuda.so.1")
    link.unlink()
    link.symlink_to(outside / "libcuda.so.550.54.14")  # absolute, outside the driver root
    snap = discover(host.roots)
    assert snap is not None
    assert all(lib.soname != "libcuda.so.1" for lib in snap.libraries.get("compute", ()))
    assert "missing library libcuda.so (group compute, driver 550.54.14)" in snap.missing


def test_groups_match_reference_names() -> None:
    assert LIBRARY_GROUPS["utility"] == ("libnvidia-ml.so", "libnvidia-cfg.so", "libnvidia-nscq.so")
    assert "libGL.so" not in {n for names in LIBRARY_GROUPS.values() for n in names}  # non-GLVND skipped
    assert LIBRARY_GROUPS["ngx"] == ("libnvidia-ngx.so",)


def test_no_sockets_no_firmware(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r",
        gpus=make_gpus(1),
        capabilities_libs=("utility",),
        with_sockets=False,
        with_firmware=False,
        with_binaries=False,
    )
    host.path("/run/nvidia-fabricmanager").mkdir(parents=True)
    host.path("/run/nvidia-fabricmanager/socket").write_text("a regular file is not a socket")
    snap = discover(host.roots, use_nvml=False)
    assert snap is not None
    assert (snap.persistenced_socket, snap.fabricmanager_socket, snap.mps_pipe_dir) == (None, None, None)
    assert snap.firmware == () and snap.binaries == {}
    assert "missing ipc path /run/nvidia-persistenced/socket" in snap.missing
    assert "missing binary nvidia-smi (group utility)" in snap.missing


def test_var_run_socket_and_custom_mps_dir(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility",), with_sockets=False
    )
    sock = host.path("/var/run/nvidia-persistenced/socket")
    sock.parent.mkdir(parents=True)
    os.mknod(sock, stat.S_IFSOCK | 0o666)
    host.path("/srv/mps").mkdir(parents=True)
    snap = discover(host.roots, use_nvml=False, mps_pipe_dir="/srv/mps")
    assert snap is not None
    assert snap.persistenced_socket == IpcPath("/var/run/nvidia-persistenced/socket", str(sock))
    assert snap.mps_pipe_dir == IpcPath("/srv/mps", str(host.path("/srv/mps")))


def test_gpu_without_proc_minor_is_an_error(tmp_path: Path) -> None:
    gpu = FakeGpu(minor=0, uuid="GPU-1", bus_id="0000:01:00.0")
    host = build_fake_host(tmp_path / "r", gpus=[gpu], capabilities_libs=("utility",), with_nvml=False)
    info = host.proc(f"driver/nvidia/gpus/{gpu.proc_dir()}/information")
    info.write_text(info.read_text().replace("Device Minor", "Device Mnr"))
    with pytest.raises(HostDiscoveryError, match="has no 'Device Minor' line"):
        discover(host.roots)

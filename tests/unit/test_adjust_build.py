"""build_adjustment: capability filtering, device nodes, MIG, placement, errors, memoization."""

from __future__ import annotations

import dataclasses
import os.path
from collections.abc import Iterable

import pytest

from nri_plugin.adjust.build import (
    LIB_DIRS_32,
    LIB_DIRS_64,
    build_adjustment,
    plan,
    select_for_request,
)
from nri_plugin.adjust.model import IPC_BIND_OPTIONS, RO_BIND_OPTIONS, Adjustment
from nri_plugin.errors import ContainerError, DeviceSelectionError, RequestError
from nri_plugin.host.model import DeviceNode, DriverSnapshot, Gpu, HostRoots, IpcPath, Library, MigDevice
from nri_plugin.request.model import GpuRequest, MigMode

VER = "550.54.14"
ROOT = "/fake"


def _node(path: str, major: int, minor: int, mode: int = 0o666) -> DeviceNode:
    return DeviceNode(path, ROOT + path, "c", major, minor, mode, 0, 0)


def _lib(soname: str, bits32: bool = False) -> Library:
    base = soname.split(".so")[0] + ".so"
    directory = "/usr/lib/i386-linux-gnu" if bits32 else "/usr/lib/x86_64-linux-gnu"
    return Library(soname, f"{ROOT}{directory}/{base}.{VER}", f"{base}.{VER}", bits32)


LIBS = {
    "utility": ("libnvidia-ml.so.1",),
    "compute": ("libcuda.so.1", "libnvidia-ptxjitcompiler.so.1"),
    "video": ("libnvcuvid.so.1", "libnvidia-opticalflow.so.1"),
    "graphics": ("libnvidia-glcore.so." + VER,),
    "graphics-glvnd": ("libGLX_nvidia.so.0", "libEGL_nvidia.so.0"),
    "ngx": ("libnvidia-ngx.so.1",),
}


def snapshot(
    *, gpus: int = 2, mig: bool = False, present: Iterable[str] | None = None, sockets: bool = True
) -> DriverSnapshot:
    gpu_list = []
    for i in range(gpus):
        migs: tuple[MigDevice, ...] = ()
        if mig and i == gpus - 1:
            migs = (
                MigDevice(0, "MIG-11111111-2222-3333-4444-555555555555", 1, 0, i, i),
                MigDevice(1, "MIG-66666666-2222-3333-4444-555555555555", 2, 0, i, i),
            )
        gpu_list.append(
            Gpu(
                index=i,
                uuid=f"GPU-{i:08x}-0000-0000-0000-000000000000",
                minor=i,
                bus_id=f"00000000:{i + 1:02x}:00.0",
                brand="Tesla",
                compute_capability="9.0",
                mig_enabled=bool(migs),
                mig_devices=migs,
            )
        )
    mig_minors = {"config": 1, "monitor": 2}
    for g in range(gpus):
        for gi in (1, 2):
            mig_minors[f"gpu{g}/gi{gi}/access"] = 100 + 10 * g + gi
            mig_minors[f"gpu{g}/gi{gi}/ci0/access"] = 200 + 10 * g + gi
    nodes = {
        "/dev/nvidiactl": _node("/dev/nvidiactl", 195, 255),
        "/dev/nvidia-modeset": _node("/dev/nvidia-modeset", 195, 254),
        "/dev/nvidia-uvm": _node("/dev/nvidia-uvm", 510, 0),
        "/dev/nvidia-uvm-tools": _node("/dev/nvidia-uvm-tools", 510, 1),
    }
    for g in range(gpus):
        nodes[f"/dev/nvidia{g}"] = _node(f"/dev/nvidia{g}", 195, g)
    for minor in set(mig_minors.values()):
        path = f"/dev/nvidia-caps/nvidia-cap{minor}"
        nodes[path] = _node(path, 235, minor, 0o444)
    if present is not None:
        nodes = {k: v for k, v in nodes.items() if k in set(present)}
    return DriverSnapshot(
        roots=HostRoots(driver_root=ROOT, dev_root=ROOT, proc_root=ROOT + "/proc", run_root=ROOT),
        driver_version=VER,
        cuda_version="12.4",
        gpus=tuple(gpu_list),
        source="nvml",
        char_majors={"nvidia-uvm": 510, "nvidia-caps": 235},
        mig_minors=mig_minors,
        libraries={g: tuple(_lib(s) for s in names) for g, names in LIBS.items()},
        libraries32={g: tuple(_lib(s, True) for s in names) for g, names in LIBS.items() if g != "ngx"},
        binaries={
            "utility": (ROOT + "/usr/bin/nvidia-smi", ROOT + "/usr/bin/nvidia-debugdump"),
            "compute": (ROOT + "/usr/bin/nvidia-cuda-mps-control",),
        },
        persistenced_socket=_ipc("/run/nvidia-persistenced/socket") if sockets else None,
        fabricmanager_socket=_ipc("/run/nvidia-fabricmanager/socket") if sockets else None,
        mps_pipe_dir=_ipc("/tmp/nvidia-mps") if sockets else None,
        firmware=(f"{ROOT}/lib/firmware/nvidia/{VER}/gsp_ga10x.bin",),
        device_nodes=nodes,
    )


def _ipc(path: str) -> IpcPath:
    return IpcPath(container_path=path, host_path=ROOT + path)


def request(
    devices: str = "0", caps: str = "utility,compute", config: str = "", monitor: str = ""
) -> GpuRequest:
    return GpuRequest(devices, config, monitor, caps, (), False)


SNAP = snapshot()


def dev_paths(adj: Adjustment) -> list[str]:
    return [d.path for d in adj.devices]


def dests(adj: Adjustment) -> set[str]:
    return {m.destination for m in adj.mounts}


def test_default_request_one_gpu() -> None:
    adj = build_adjustment(request("0"), SNAP)
    assert dev_paths(adj) == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools", "/dev/nvidia0"]
    assert adj.env == () and adj.create_container_hooks == ()
    d = dests(adj)
    for directory in LIB_DIRS_64:
        for name in ("libcuda.so.1", f"libcuda.so.{VER}", "libcuda.so", "libnvidia-ml.so.1"):
            assert f"{directory}/{name}" in d
    assert not any(os.path.dirname(x) in LIB_DIRS_32 for x in d)
    assert "/usr/bin/nvidia-smi" in d and "/usr/bin/nvidia-cuda-mps-control" in d
    assert f"/lib/firmware/nvidia/{VER}/gsp_ga10x.bin" in d
    assert not any("/proc" in x.split("/")[1:2] for x in d)


def test_sources_are_host_paths_and_options() -> None:
    adj = build_adjustment(request("0"), SNAP)
    by_dest = {m.destination: m for m in adj.mounts}
    cuda = by_dest["/usr/lib64/libcuda.so"]
    assert cuda.source == f"{ROOT}/usr/lib/x86_64-linux-gnu/libcuda.so.{VER}"
    assert cuda.options == RO_BIND_OPTIONS and cuda.type == "bind"
    sock = by_dest["/run/nvidia-persistenced/socket"]
    assert sock.source == ROOT + "/run/nvidia-persistenced/socket"
    assert sock.options == IPC_BIND_OPTIONS and "ro" not in sock.options
    assert by_dest["/tmp/nvidia-mps"].options == IPC_BIND_OPTIONS
    assert len(by_dest) == len(adj.mounts)  # destinations unique


def test_host_root_is_stripped_from_mount_sources_only() -> None:
    # A DaemonSet pod sees the host's / at ROOT (host-root); containerd needs the host's own paths.
    snap = dataclasses.replace(SNAP, roots=dataclasses.replace(SNAP.roots, host_root=ROOT))
    adj = build_adjustment(request("0"), snap)
    by_dest = {m.destination: m for m in adj.mounts}
    assert by_dest["/usr/lib64/libcuda.so.1"].source == f"/usr/lib/x86_64-linux-gnu/libcuda.so.{VER}"
    assert by_dest["/usr/bin/nvidia-smi"].source == "/usr/bin/nvidia-smi"
    assert by_dest["/run/nvidia-persistenced/socket"].source == "/run/nvidia-persistenced/socket"
    assert by_dest[f"/lib/firmware/nvidia/{VER}/gsp_ga10x.bin"].source == (
        f"/lib/firmware/nvidia/{VER}/gsp_ga10x.bin"
    )
    assert not any(m.source.startswith(ROOT + "/") for m in adj.mounts)
    # Device nodes are described by path and major:minor, never by the pod's view of them.
    assert dev_paths(adj) == dev_paths(build_adjustment(request("0"), SNAP))


def test_host_roots_to_host() -> None:
    roots = HostRoots(host_root="/host")
    assert roots.to_host("/host/usr/lib/x.so") == "/usr/lib/x.so"
    assert roots.to_host("/host") == "/"
    assert roots.to_host("/hostile/x") == "/hostile/x"  # a path boundary, not a string prefix
    assert HostRoots().to_host("/usr/lib/x.so") == "/usr/lib/x.so"


def _names(adj: Adjustment) -> set[str]:
    return {os.path.basename(m.destination) for m in adj.mounts}


@pytest.mark.parametrize(
    ("caps", "want", "unwanted"),
    [
        ("utility", {"libnvidia-ml.so.1", "nvidia-smi", "socket"},
            {"libcuda.so.1", "nvidia-mps", "nvidia-cuda-mps-control"}),
        ("compute", {"libcuda.so.1", "libcuda.so", "nvidia-cuda-mps-control", "nvidia-mps"},
            {"libnvidia-ml.so.1", "socket", "nvidia-smi"}),
        ("video", {"libnvcuvid.so.1", "libcuda.so.1", "libnvidia-opticalflow.so", "nvidia-mps"},
            {"nvidia-cuda-mps-control", "socket"}),
        ("graphics", {f"libnvidia-glcore.so.{VER}", "libGLX_nvidia.so.0", "libGLX_indirect.so.0"},
            {"libcuda.so.1", "nvidia-mps"}),
        ("display", {"libEGL_nvidia.so.0", "libGLX_indirect.so.0"}, {"libcuda.so.1"}),
        ("ngx", {"libnvidia-ngx.so.1"}, {"libcuda.so.1", "libnvidia-ml.so.1"}),
        ("compat32", {"gsp_ga10x.bin"}, {"libcuda.so.1", "libnvidia-ml.so.1"}),
    ],
)  # fmt: skip
def test_capability_filtering(caps: str, want: set[str], unwanted: set[str]) -> None:
    names = _names(build_adjustment(request("0", caps), SNAP))
    assert want <= names
    assert not (unwanted & names)


@pytest.mark.parametrize(
    ("caps", "control"),
    [
        ("utility", ["/dev/nvidiactl"]),
        ("compute", ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]),
        ("video", ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]),
        ("graphics", ["/dev/nvidiactl"]),
        ("display", ["/dev/nvidiactl", "/dev/nvidia-modeset"]),
        ("ngx", ["/dev/nvidiactl"]),
        ("", ["/dev/nvidiactl"]),
    ],
)
def test_control_nodes_per_capability(caps: str, control: list[str]) -> None:
    assert dev_paths(build_adjustment(request("1", caps), SNAP)) == [*control, "/dev/nvidia1"]


def test_compat32_adds_32bit_variants_of_selected_groups_only() -> None:
    adj = build_adjustment(request("0", "compute,compat32"), SNAP)
    d = dests(adj)
    for directory in LIB_DIRS_32:
        assert f"{directory}/libcuda.so.1" in d and f"{directory}/libcuda.so" in d
        assert f"{directory}/libnvidia-ml.so.1" not in d
    i386 = next(m for m in adj.mounts if m.destination == "/usr/lib/libcuda.so.1")
    assert "/i386-linux-gnu/" in i386.source


def test_file_mode_is_permission_bits_and_nodes_come_from_snapshot() -> None:
    adj = build_adjustment(request("all"), SNAP)
    for node in adj.devices:
        assert node == SNAP.device_nodes[node.path]
        assert node.file_mode == node.file_mode & 0o7777


def test_none_gives_control_nodes_and_driver_files_but_no_gpu() -> None:
    adj = build_adjustment(request(""), SNAP)
    assert dev_paths(adj) == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    assert "/usr/lib64/libcuda.so.1" in dests(adj)


def test_missing_gpu_node_fails_with_fix() -> None:
    snap = snapshot(present=["/dev/nvidiactl", "/dev/nvidia0"])
    with pytest.raises(
        ContainerError,
        match=r"GPU 1 \(GPU-00000001.*\): device node /dev/nvidia1 is missing.*nvidia-modprobe",
    ):
        build_adjustment(request("1"), snap)
    # UVM is skipped (like CDI), the present GPU works
    assert dev_paths(build_adjustment(request("0"), snap)) == ["/dev/nvidiactl", "/dev/nvidia0"]


def test_missing_nvidiactl_fails() -> None:
    snap = snapshot(present=["/dev/nvidia0"])
    with pytest.raises(ContainerError, match="/dev/nvidiactl is missing under the dev root '/fake'"):
        build_adjustment(request("0"), snap)


def test_missing_sockets_are_skipped() -> None:
    d = dests(build_adjustment(request("0", "utility,compute,video"), snapshot(sockets=False)))
    assert not any("socket" in x or "nvidia-mps" in x for x in d)


MIG_SNAP = snapshot(mig=True)


def test_mig_device_gets_parent_and_its_own_access_caps() -> None:
    adj = build_adjustment(request("1:1"), MIG_SNAP)
    # gpu1/gi2/access = 112, gpu1/gi2/ci0/access = 212
    assert dev_paths(adj)[-3:] == [
        "/dev/nvidia1",
        "/dev/nvidia-caps/nvidia-cap112",
        "/dev/nvidia-caps/nvidia-cap212",
    ]
    assert "/dev/nvidia-caps/nvidia-cap1" not in dev_paths(adj)
    assert not any(x.startswith("/proc") for x in dests(adj))


def test_mig_config_all_with_all_devices() -> None:
    adj = build_adjustment(request("all", config="ALL"), MIG_SNAP)
    paths = dev_paths(adj)
    caps = [p for p in paths if "nvidia-caps" in p]
    # config cap, then every GI/CI access cap of the MIG-enabled GPU 1 (none of GPU 0)
    # selected MIG devices' own caps first, then the config cap and the rest of GPU 1's caps
    assert caps == [f"/dev/nvidia-caps/nvidia-cap{m}" for m in (111, 211, 112, 212, 1)]
    assert "/dev/nvidia0" in paths and "/dev/nvidia1" in paths


def test_mig_monitor_all_on_gpu_without_mig() -> None:
    adj = build_adjustment(request("0", monitor="all"), MIG_SNAP)
    assert [p for p in dev_paths(adj) if "caps" in p] == ["/dev/nvidia-caps/nvidia-cap2"]


def test_mig_monitor_skips_absent_cap_nodes() -> None:
    snap = snapshot(present=["/dev/nvidiactl", "/dev/nvidia0"])
    assert dev_paths(build_adjustment(request("0", monitor="all"), snap)) == [
        "/dev/nvidiactl",
        "/dev/nvidia0",
    ]


def test_mig_config_errors() -> None:
    with pytest.raises(
        ContainerError, match=r"^NVIDIA_MIG_CONFIG_DEVICES=0: 0: only 'all' devices are currently supported"
    ):
        build_adjustment(request("all", config="0"), MIG_SNAP)
    with pytest.raises(ContainerError, match="cannot enable mig-monitor with specific MIG devices selected"):
        build_adjustment(request("1:0", monitor="all"), MIG_SNAP)
    # specific full GPUs are fine
    assert build_adjustment(request("1", config="all"), MIG_SNAP).devices


@pytest.mark.parametrize(
    ("value", "mode"),
    [
        ("", MigMode()),
        (",,", MigMode()),
        ("all", MigMode(all=True)),
        ("ALL,0", MigMode(all=True)),  # the first element decides (libnvidia-container)
        (",0,all", MigMode(unsupported="0")),
    ],
)
def test_mig_modes_are_parsed_once_in_the_request(value: str, mode: MigMode) -> None:
    req = request("all", config=value, monitor=value)
    assert req.mig_config == req.mig_monitor == mode
    if mode.unsupported is not None:
        with pytest.raises(ContainerError, match=r"^NVIDIA_MIG_CONFIG_DEVICES=',0,all': 0: only 'all'"):
            build_adjustment(req, MIG_SNAP)
    else:
        caps = [
            p
            for p in dev_paths(build_adjustment(req, MIG_SNAP))
            if p in ("/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2")
        ]
        assert caps == (["/dev/nvidia-caps/nvidia-cap1", "/dev/nvidia-caps/nvidia-cap2"] if mode.all else [])


def test_mig_device_missing_cap_node_or_minor() -> None:
    snap = snapshot(mig=True, present=["/dev/nvidiactl", "/dev/nvidia1"])
    with pytest.raises(
        ContainerError,
        match=r"nvidia-cap111 \(gpu1/gi1/access\) is missing.*"
        r"nvidia-modprobe -f /proc/driver/nvidia/capabilities/gpu1/mig/gi1/access",
    ):
        build_adjustment(request("1:0"), snap)
    no_minors = dataclasses.replace(MIG_SNAP, mig_minors={})
    with pytest.raises(
        ContainerError, match="'gpu1/gi1/access' is not listed in /proc/driver/nvidia-caps/mig-minors"
    ):
        build_adjustment(request("1:0"), no_minors)


def test_unknown_capability_and_device() -> None:
    with pytest.raises(RequestError, match="unknown driver capability 'bogus'"):
        build_adjustment(request("0", "compute,bogus"), SNAP)
    with pytest.raises(DeviceSelectionError, match=r"^NVIDIA_VISIBLE_DEVICES=.5.: 5: unknown device"):
        build_adjustment(request("5"), SNAP)


def test_memoized_per_snapshot_identity() -> None:
    SNAP.cache.clear()
    first = build_adjustment(request("0,1"), SNAP)
    assert build_adjustment(request("0,1"), SNAP) is first
    assert select_for_request(request("0,1"), SNAP) is plan(request("0,1"), SNAP).selection
    other = snapshot()
    rebuilt = build_adjustment(request("0,1"), other)
    assert rebuilt == first and rebuilt is not first
    assert build_adjustment(request("0"), SNAP) != first


def test_deterministic_order() -> None:
    SNAP.cache.clear()
    a = build_adjustment(request("1,0", "video,utility,graphics"), SNAP)
    b = build_adjustment(request("0,1", "graphics,video,utility"), snapshot())
    assert a == b


def test_long_request_strings_do_not_stay_in_the_memo() -> None:
    """The memo is keyed by container-controlled strings; valid but huge ones (repeated ids,
    repeated capabilities, ``all`` followed by anything) must not be kept in it: 512 entries of
    a few MB each would be gigabytes."""
    SNAP.cache.clear()
    small = build_adjustment(request("0"), SNAP)
    long_and_short = [
        (request(",".join(["0"] * 20_000)), request("0")),
        (request("0", ",".join(["compute"] * 5_000)), request("0", "compute")),
        (request("all", config="all," + "x" * 20_000), request("all", config="all")),
        (request(",".join(["1", "0"] * 10_000), "utility"), request("0,1", "utility")),
    ]
    for long, short in long_and_short:
        expected = (build_adjustment(short, SNAP), select_for_request(short, SNAP))
        size = len(SNAP.cache)
        for _ in range(2):
            assert (build_adjustment(long, SNAP), select_for_request(long, SNAP)) == expected
        assert len(SNAP.cache) == size
    assert build_adjustment(request("0"), SNAP) is small  # short ones are still memoized

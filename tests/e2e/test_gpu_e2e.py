"""GPU end-to-end: the real ``nvidia-nri-plugin run`` daemon against containerd 1.7 and 2.1.

One daemon (a subprocess of the real CLI, NVML path through the fake ``libnvidia-ml.so.1``) and one
pod per containerd version serve every test of this module; the fake host has 8 GPUs. Each test
checks the final OCI spec (``ContainerStatus(verbose).runtimeSpec``) and what the container sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakehost import FakeHost

from .containerd import Containerd
from .cri import ContainerRequest, ContainerResult, CriClient, CriError, Pod
from .gpu_plugin_runner import (
    CTL_MINOR,
    NVIDIA_MAJOR,
    GpuPluginProcess,
    build_e2e_host,
    device_rule_for,
    driver_mounts,
    nvidia_devices,
    run_in_pod,
    spec_device_rules,
    spec_devices,
)
from .images import BuiltImages

GPU_COUNT = 8
CONTROL_NODES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")
PROBE_RE = re.compile(r"^PROBE_OK driver_version=(\d+) path=(\S+)$", re.M)

# Inside the container: the device nodes, the mounted libcuda files, then the probe (no
# LD_LIBRARY_PATH: the loader's own search path must find libcuda.so.1).
GPU_SCRIPT = (
    "ls -l /dev/ | grep ' nvidia'; "
    'echo "LD_LIBRARY_PATH=${{LD_LIBRARY_PATH-unset}}"; '
    "for f in {files}; do test -f $f && echo FILE_OK $f || echo FILE_MISSING $f; done; "
    "/usr/bin/gpu-probe"
)


@pytest.fixture(scope="module")
def gpu_host(e2e_base: Path) -> FakeHost:
    return build_e2e_host(e2e_base, GPU_COUNT)


@pytest.fixture(scope="module")
def gpu_plugin(containerd: Containerd, gpu_host: FakeHost, e2e_base: Path) -> Iterator[GpuPluginProcess]:
    containerd.ensure_running()
    plugin = GpuPluginProcess(gpu_host, containerd.nri_socket, e2e_base / f"gpu-plugin-{containerd.version}")
    try:
        plugin.start()
        # Device facts came through the NVML child process against the fake libnvidia-ml.so.1.
        discovered = plugin.wait_for("host driver discovered")
        assert discovered.fields["source"] == "nvml", discovered.line
        assert discovered.fields["gpus"] == [g.uuid for g in gpu_host.gpus], discovered.line
        yield plugin
    finally:
        try:
            assert plugin.stop() == 0, plugin.diagnostics()
        finally:
            plugin.kill()


@pytest.fixture(scope="module")
def gpu_pod(containerd: Containerd, gpu_plugin: GpuPluginProcess) -> Iterator[Pod]:
    pod = containerd.cri.run_pod("gpu-e2e")
    try:
        yield pod
    finally:
        containerd.ensure_running()
        containerd.cri.remove_pod(pod)


def _run(
    cri: CriClient, pod: Pod, image: str, env: dict[str, str], script: str, name: str
) -> ContainerResult:
    return run_in_pod(
        cri, pod, ContainerRequest(image=image, command=["sh", "-c", script], env=env, name=name)
    )


def _library_files(host: FakeHost) -> list[str]:
    """The in-container paths of libcuda that must exist (real file, SONAME link, dev link)."""
    return [
        f"{host.lib_dir}/libcuda.so.{host.driver_version}",
        f"{host.lib_dir}/libcuda.so.1",
        f"{host.lib_dir}/libnvidia-ml.so.1",
    ]


def _assert_device(spec: dict[str, Any], path: str, major: int, minor: int) -> None:
    devices = nvidia_devices(spec)
    assert path in devices, f"{path} not in linux.devices: {sorted(devices)}"
    dev = devices[path]
    assert (dev["type"], dev["major"], dev["minor"]) == ("c", major, minor), dev
    assert dev.get("fileMode") == 0o666, dev  # permission bits only (fake nodes are 0666)
    rule = device_rule_for(spec, "c", major, minor)
    assert rule is not None, f"no cgroup rule for c {major}:{minor} in {spec_device_rules(spec)}"
    assert rule["allow"] is True and set(rule["access"]) >= {"r", "w"}, rule


def _ls_majors_minors(log: str) -> dict[str, tuple[int, int]]:
    """``ls -l /dev`` lines of char devices -> {name: (major, minor)}."""
    out: dict[str, tuple[int, int]] = {}
    for line in log.splitlines():
        m = re.match(r"^c\S+\s+\d+\s+\S+\s+\S+\s+(\d+),\s+(\d+)\s.*\s(nvidia\S*)$", line)
        if m:
            out[m.group(3)] = (int(m.group(1)), int(m.group(2)))
    return out


def _assert_probe_ok(result: ContainerResult, host: FakeHost) -> str:
    assert result.exit_code == 0, result.log
    match = PROBE_RE.search(result.log)
    assert match, f"gpu-probe did not print PROBE_OK:\n{result.log}"
    assert int(match.group(1)) == host.cuda_version, result.log
    return match.group(2)


def test_all_gpus_debian_layout(
    containerd: Containerd,
    gpu_plugin: GpuPluginProcess,
    gpu_pod: Pod,
    gpu_host: FakeHost,
    e2e_images: BuiltImages,
) -> None:
    files = _library_files(gpu_host)
    result = _run(
        containerd.cri,
        gpu_pod,
        e2e_images.refs["debian-layout"],
        {"NVIDIA_VISIBLE_DEVICES": "all"},
        GPU_SCRIPT.format(files=" ".join(files)),
        "all-debian",
    )
    spec = result.spec
    # Final OCI spec: every node with type/major:minor/mode and its allow rule.
    _assert_device(spec, "/dev/nvidiactl", NVIDIA_MAJOR, CTL_MINOR)
    _assert_device(spec, "/dev/nvidia-uvm", gpu_host.uvm_major, 0)
    _assert_device(spec, "/dev/nvidia-uvm-tools", gpu_host.uvm_major, 1)
    for gpu in gpu_host.gpus:
        _assert_device(spec, f"/dev/nvidia{gpu.minor}", NVIDIA_MAJOR, gpu.minor)
    expected_nodes = {*CONTROL_NODES, *(f"/dev/nvidia{g.minor}" for g in gpu_host.gpus)}
    assert set(nvidia_devices(spec)) == expected_nodes
    # Driver library mounts: read-only binds from the fake driver root.
    mounts = driver_mounts(spec, gpu_host)
    for dest in files:
        assert dest in mounts, f"{dest} not mounted; driver mounts: {sorted(mounts)}"
        m = mounts[dest]
        assert m["type"] == "bind" and "ro" in m["options"], m
        assert Path(m["source"]).resolve() == gpu_host.path(dest).resolve(), m
    # Every 64-bit library of the default capabilities (utility, compute) at its host path.
    for lib in (*gpu_host.libraries["utility"], *gpu_host.libraries["compute"]):
        assert lib in mounts and Path(mounts[lib]["source"]) == gpu_host.path(lib), lib
    assert "LD_LIBRARY_PATH" not in result.env
    # No OCI hook of any kind: nothing runs on the host for this container (no NVIDIAScape class).
    assert not any((spec.get("hooks") or {}).values()), spec.get("hooks")
    # Inside the container.
    seen = _ls_majors_minors(result.log)
    for path in expected_nodes:
        dev = nvidia_devices(spec)[path]
        assert seen.get(path.removeprefix("/dev/")) == (dev["major"], dev["minor"]), result.log
    assert "LD_LIBRARY_PATH=unset" in result.log.splitlines(), result.log
    for f in files:
        assert f"FILE_OK {f}" in result.log.splitlines(), result.log
    path = _assert_probe_ok(result, gpu_host)
    assert path.endswith("/libcuda.so.1") and "x86_64-linux-gnu" in path, result.log
    # The daemon's own account of it.
    record = gpu_plugin.wait_for("GPU container adjusted", container="all-debian")
    assert record.fields["gpus"] == [g.uuid for g in gpu_host.gpus], record.line
    assert record.fields["device_nodes"] == len(expected_nodes), record.line
    # Every mount the plugin added has its source in the (fake) host driver tree: as many such
    # mounts are in the final spec as the daemon says it injected, none from anywhere else.
    assert record.fields["mounts"] == len(mounts), (record.line, sorted(mounts))


def test_probe_rhel_layout(
    containerd: Containerd,
    gpu_plugin: GpuPluginProcess,
    gpu_pod: Pod,
    gpu_host: FakeHost,
    e2e_images: BuiltImages,
) -> None:
    result = _run(
        containerd.cri,
        gpu_pod,
        e2e_images.refs["rhel-layout"],
        {"NVIDIA_VISIBLE_DEVICES": "all"},
        "cat /etc/redhat-release; test -e /usr/lib/x86_64-linux-gnu/libc.so.6 || echo NO_DEBIAN_LIBC; "
        "/usr/bin/gpu-probe",
        "all-rhel",
    )
    assert "Red Hat" in result.log and "NO_DEBIAN_LIBC" in result.log, result.log
    path = _assert_probe_ok(result, gpu_host)
    # The RHEL loader searches /lib64 and /usr/lib64 only: libcuda must have been found there.
    assert re.fullmatch(r"/(usr/)?lib64/libcuda\.so\.1", path), result.log


def test_device_list_index_and_uuid(
    containerd: Containerd,
    gpu_plugin: GpuPluginProcess,
    gpu_pod: Pod,
    gpu_host: FakeHost,
    e2e_images: BuiltImages,
) -> None:
    gpu3 = next(g for g in gpu_host.gpus if g.minor == 3)
    result = _run(
        containerd.cri,
        gpu_pod,
        e2e_images.refs["debian-layout"],
        {"NVIDIA_VISIBLE_DEVICES": f"1,{gpu3.uuid}"},
        "ls -l /dev/ | grep ' nvidia'; /usr/bin/gpu-probe",
        "two-gpus",
    )
    assert set(nvidia_devices(result.spec)) == {*CONTROL_NODES, "/dev/nvidia1", "/dev/nvidia3"}
    _assert_device(result.spec, "/dev/nvidia1", NVIDIA_MAJOR, 1)
    _assert_device(result.spec, "/dev/nvidia3", NVIDIA_MAJOR, 3)
    seen = _ls_majors_minors(result.log)
    assert {n for n in seen if re.fullmatch(r"nvidia\d+", n)} == {"nvidia1", "nvidia3"}, result.log
    _assert_probe_ok(result, gpu_host)


def test_unmet_requirement_fails_create(
    containerd: Containerd, gpu_plugin: GpuPluginProcess, gpu_pod: Pod, e2e_images: BuiltImages
) -> None:
    with pytest.raises(CriError) as info:
        _run(
            containerd.cri,
            gpu_pod,
            e2e_images.refs["debian-layout"],
            {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_REQUIRE_CUDA": "cuda>=99.0"},
            "true",
            "too-new-cuda",
        )
    assert info.value.method == "CreateContainer", info.value
    assert "failed to get NRI adjustment" in info.value.message, info.value.message
    assert "unsatisfied condition: cuda>=99.0" in info.value.message, info.value.message
    record = gpu_plugin.wait_for("GPU container refused", container="too-new-cuda")
    assert record.fields["reason"] == "RequirementError", record.line


def test_unknown_device_then_daemon_still_serves(
    containerd: Containerd,
    gpu_plugin: GpuPluginProcess,
    gpu_pod: Pod,
    gpu_host: FakeHost,
    e2e_images: BuiltImages,
) -> None:
    pid = gpu_plugin.pid
    with pytest.raises(CriError) as info:
        _run(
            containerd.cri,
            gpu_pod,
            e2e_images.refs["debian-layout"],
            {"NVIDIA_VISIBLE_DEVICES": "GPU-does-not-exist"},
            "true",
            "bad-device",
        )
    assert info.value.method == "CreateContainer", info.value
    assert "GPU-does-not-exist: unknown device" in info.value.message, info.value.message
    # Same daemon process, still registered: the next GPU container works.
    assert gpu_plugin.pid == pid and pid is not None
    result = _run(
        containerd.cri,
        gpu_pod,
        e2e_images.refs["debian-layout"],
        {"NVIDIA_VISIBLE_DEVICES": "0"},
        "/usr/bin/gpu-probe",
        "after-bad-device",
    )
    assert set(nvidia_devices(result.spec)) == {*CONTROL_NODES, "/dev/nvidia0"}
    _assert_probe_ok(result, gpu_host)
    assert len(gpu_plugin.find("registered")) == gpu_plugin.starts, "the daemon re-registered"


def test_visible_devices_none(
    containerd: Containerd,
    gpu_plugin: GpuPluginProcess,
    gpu_pod: Pod,
    gpu_host: FakeHost,
    e2e_images: BuiltImages,
) -> None:
    result = _run(
        containerd.cri,
        gpu_pod,
        e2e_images.refs["debian-layout"],
        {"NVIDIA_VISIBLE_DEVICES": "none"},
        "ls /dev/; /usr/bin/gpu-probe",
        "none",
    )
    assert set(nvidia_devices(result.spec)) == set(CONTROL_NODES)
    _assert_device(result.spec, "/dev/nvidiactl", NVIDIA_MAJOR, CTL_MINOR)
    assert f"{gpu_host.lib_dir}/libcuda.so.1" in driver_mounts(result.spec, gpu_host)
    assert not re.search(r"^nvidia\d+$", result.log, re.M), result.log
    _assert_probe_ok(result, gpu_host)


def _comparable(spec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a spec an adjustment could touch, minus per-container names and paths."""
    return {
        "devices": spec_devices(spec),
        "rules": spec_device_rules(spec),
        "mounts": sorted((m["destination"], m.get("type", "")) for m in spec.get("mounts") or []),
        "env": sorted(spec["process"]["env"]),
        "hooks": spec.get("hooks") or {},
    }


def test_no_gpu_variables_untouched(
    containerd: Containerd,
    gpu_plugin: GpuPluginProcess,
    gpu_pod: Pod,
    gpu_host: FakeHost,
    e2e_images: BuiltImages,
) -> None:
    image = e2e_images.refs["debian-layout"]
    env = {"SOME_VAR": "x"}
    with_plugin = _run(containerd.cri, gpu_pod, image, env, "ls /dev/", "plain-with-plugin")
    # The daemon saw the container (debug record) and answered with no adjustment.
    gpu_plugin.wait_for("no GPU requested", container="plain-with-plugin")
    assert not nvidia_devices(with_plugin.spec)
    assert not driver_mounts(with_plugin.spec, gpu_host)
    assert "nvidia" not in with_plugin.log, with_plugin.log
    # Same container with no plugin connected: identical devices, rules, mounts, env, hooks.
    assert gpu_plugin.stop() == 0, gpu_plugin.diagnostics()
    try:
        without_plugin = _run(containerd.cri, gpu_pod, image, env, "ls /dev/", "plain-without-plugin")
    finally:
        gpu_plugin.start()
    assert _comparable(with_plugin.spec) == _comparable(without_plugin.spec)
    assert with_plugin.log == without_plugin.log

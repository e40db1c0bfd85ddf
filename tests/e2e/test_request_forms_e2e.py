"""Today's request forms and driver features end to end, on containerd 1.7 and 2.1.

One daemon per containerd version, configured as a secure GPU-operator node would be:
device-list volume mounts accepted, ``cdi.k8s.io/*`` annotations accepted, and unprivileged
env-var requests not accepted (so every env-var case below runs privileged, except the one that
checks that policy). The fake host has 2 GPUs and every feature's device nodes and files. Each test
checks the final OCI spec and what the container sees.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakehost import FakeHost
from tests.fakehost.builder import DRM_MAJOR, FS_MAJOR, IB_VERBS_MAJOR, IMEX_MAJOR, drm_card, drm_render

from .containerd import Containerd
from .cri import ContainerRequest, ContainerResult, CriClient, CriDevice, CriMount, Pod
from .gpu_plugin_runner import GpuPluginProcess, build_e2e_host, nvidia_devices, run_in_pod, spec_devices
from .images import BuiltImages

VOLUME_ROOT = "/var/run/nvidia-container-devices"
CONFIG = """\
accept-nvidia-visible-devices-envvar-when-unprivileged = false
accept-nvidia-visible-devices-as-volume-mounts = true

[nri-plugin]
accept-cdi-annotations = true
"""


@pytest.fixture(scope="module")
def host(e2e_base: Path) -> FakeHost:
    return build_e2e_host(e2e_base, 2)


@pytest.fixture(scope="module")
def plugin(containerd: Containerd, host: FakeHost, e2e_base: Path) -> Iterator[GpuPluginProcess]:
    containerd.ensure_running()
    workdir = e2e_base / f"forms-plugin-{containerd.version}"
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "config.toml"
    config.write_text(CONFIG)
    proc = GpuPluginProcess(host, containerd.nri_socket, workdir, config=config)
    try:
        proc.start()
        yield proc
        assert proc.stop() == 0, proc.diagnostics()
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def pod(containerd: Containerd, plugin: GpuPluginProcess) -> Iterator[Pod]:
    pod = containerd.cri.run_pod("forms-e2e", privileged=True)
    try:
        yield pod
    finally:
        containerd.ensure_running()
        containerd.cri.remove_pod(pod)


def run(
    cri: CriClient,
    pod: Pod,
    images: BuiltImages,
    name: str,
    script: str,
    *,
    env: dict[str, str] | None = None,
    privileged: bool = True,
    mounts: tuple[CriMount, ...] = (),
    devices: tuple[CriDevice, ...] = (),
    annotations: dict[str, str] | None = None,
) -> ContainerResult:
    request = ContainerRequest(
        image=images.refs["debian-layout"],
        command=["sh", "-c", script],
        env=env or {},
        name=name,
        privileged=privileged,
        mounts=mounts,
        devices=devices,
        annotations=annotations or {},
    )
    result = run_in_pod(cri, pod, request)
    assert result.exit_code == 0, result.log
    return result


def host_devices(host: FakeHost, *paths: str) -> tuple[CriDevice, ...]:
    """CRI devices: the fake host's nodes at the same paths in the container (what CDI or another
    injector would have added)."""
    return tuple(CriDevice(str(host.path(path)), path) for path in paths)


def gpu_nodes(result: ContainerResult) -> set[str]:
    return {p for p in nvidia_devices(result.spec) if re.fullmatch(r"/dev/nvidia[0-9]+", p)}


def node(result: ContainerResult, path: str) -> tuple[int, int]:
    found = {d["path"]: d for d in spec_devices(result.spec)}
    assert path in found, f"{path} not in linux.devices: {sorted(found)}"
    return found[path]["major"], found[path]["minor"]


def seen(result: ContainerResult, path: str) -> tuple[int, int]:
    """(major, minor) of ``path`` as ``ls -l`` printed it inside the container."""
    match = re.search(rf"^c\S+\s+\d+\s+\S+\s+\S+\s+(\d+),\s+(\d+)\s.*\s{re.escape(path)}$", result.log, re.M)
    assert match, f"{path} not listed inside the container:\n{result.log}"
    return int(match.group(1)), int(match.group(2))


def test_cdi_name_in_visible_devices(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": f"nvidia.com/gpu={host.gpus[1].uuid},example.com/nic=eth1"}
    result = run(
        containerd.cri, pod, e2e_images, "cdi-name", "ls -l /dev/nvidia1; /usr/bin/gpu-probe", env=env
    )
    assert gpu_nodes(result) == {"/dev/nvidia1"}
    assert seen(result, "/dev/nvidia1") == (195, 1) and "PROBE_OK" in result.log
    record = plugin.wait_for("GPU container adjusted", container="cdi-name")
    assert record.fields["gpus"] == [host.gpus[1].uuid], record.line
    warning = plugin.wait_for("GPU request warning", container="cdi-name")
    assert warning.fields["detail"].endswith(
        "leaving CDI devices of other kinds to the runtime: example.com/nic=eth1"
    )


def test_cdi_annotation(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    # The device plugin's cdi-annotations strategy (names of its own kind); unprivileged container.
    # (containerd's own CDI support, enable_cdi, must be off for these: it would resolve
    # cdi.k8s.io annotations itself and fail without a spec file. The test containerd has it off.)
    ann = {"cdi.k8s.io/nvidia-device-plugin_0a1b": "k8s.device-plugin.nvidia.com/gpu=0"}
    result = run(
        containerd.cri, pod, e2e_images, "cdi-ann", "ls -l /dev/nvidia0", privileged=False, annotations=ann
    )
    assert gpu_nodes(result) == {"/dev/nvidia0"} and seen(result, "/dev/nvidia0") == (195, 0)


def test_device_plugin_volume_mounts(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, e2e_images: BuiltImages
) -> None:
    # The device plugin's volume-mount strategy: a CDI name and an IMEX channel, unprivileged.
    mounts = (
        CriMount("/dev/null", f"{VOLUME_ROOT}/cdi/nvidia.com/gpu=1", readonly=True),
        CriMount("/dev/null", f"{VOLUME_ROOT}/imex/0", readonly=True),
    )
    script = "ls -l /dev/nvidia1 /dev/nvidia-caps-imex-channels/channel0"
    result = run(containerd.cri, pod, e2e_images, "vol-cdi", script, privileged=False, mounts=mounts)
    assert gpu_nodes(result) == {"/dev/nvidia1"}
    assert node(result, "/dev/nvidia-caps-imex-channels/channel0") == (IMEX_MAJOR, 0)
    assert seen(result, "/dev/nvidia-caps-imex-channels/channel0") == (IMEX_MAJOR, 0)


def test_management_pod(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, e2e_images: BuiltImages
) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "management.nvidia.com/gpu=all", "NVIDIA_DRIVER_CAPABILITIES": "utility"}
    script = (
        "ls -l /dev/nvidia0 /dev/nvidia1 /dev/nvidia-modeset /dev/nvidia-caps/nvidia-cap1 "
        "/dev/nvidia-caps-imex-channels/channel1; nvidia-smi"
    )
    result = run(containerd.cri, pod, e2e_images, "management", script, env=env)
    assert gpu_nodes(result) == {"/dev/nvidia0", "/dev/nvidia1"}
    for path in (
        "/dev/nvidia-modeset",
        "/dev/nvidia-caps/nvidia-cap1",
        "/dev/nvidia-caps-imex-channels/channel1",
    ):
        assert seen(result, path) == node(result, path)
    assert "fake nvidia-smi" in result.log, result.log
    assert not [d for d in spec_devices(result.spec) if "nvidia-fs" in d["path"]]


def test_imex_channel(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, e2e_images: BuiltImages
) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "0", "NVIDIA_IMEX_CHANNELS": "1"}
    result = run(containerd.cri, pod, e2e_images, "imex", "ls -l /dev/nvidia-caps-imex-channels/", env=env)
    assert node(result, "/dev/nvidia-caps-imex-channels/channel1") == (IMEX_MAJOR, 1)
    assert re.search(rf"^c\S+.*\s{IMEX_MAJOR},\s+1\s.*channel1$", result.log, re.M), result.log
    assert "channel0" not in result.log, result.log


def test_gds_and_mofed(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, e2e_images: BuiltImages
) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "0", "NVIDIA_GDS": "enabled", "NVIDIA_MOFED": "enabled"}
    script = (
        "ls -l /dev/nvidia-fs0 /dev/infiniband/uverbs0 /dev/infiniband/rdma_cm; "
        "cat /etc/cufile.json; ls -d /run/udev"
    )
    result = run(containerd.cri, pod, e2e_images, "gds-mofed", script, env=env)
    assert seen(result, "/dev/nvidia-fs0") == node(result, "/dev/nvidia-fs0") == (FS_MAJOR, 0)
    assert seen(result, "/dev/infiniband/uverbs0") == (IB_VERBS_MAJOR, 192)
    assert seen(result, "/dev/infiniband/rdma_cm") == node(result, "/dev/infiniband/rdma_cm")
    assert '"logging"' in result.log and "/run/udev" in result.log, result.log


def test_vulkan_container(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "1", "NVIDIA_DRIVER_CAPABILITIES": "graphics"}
    script = (
        "cat /usr/share/vulkan/icd.d/nvidia_icd.json; ls -l /dev/dri/; "
        "ls /usr/lib/x86_64-linux-gnu/libGLX_nvidia.so.0"
    )
    result = run(containerd.cri, pod, e2e_images, "vulkan", script, env=env)
    assert '"library_path": "libGLX_nvidia.so.0"' in result.log, result.log
    render, card = f"/dev/dri/{drm_render(1)}", f"/dev/dri/{drm_card(1)}"
    assert node(result, render) == (DRM_MAJOR, 129) and node(result, card) == (DRM_MAJOR, 2)
    assert re.search(rf"^c\S+.*\s{DRM_MAJOR},\s+129\s.*{drm_render(1)}$", result.log, re.M), result.log
    assert drm_render(0) not in result.log, result.log  # only the selected GPU's nodes


def test_container_with_gpus_from_elsewhere_is_left_alone(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    # As another injector would have: GPU 0's nodes and the driver's libcuda, in an unprivileged
    # container that also carries the device plugin's request for GPU 0.
    devices = host_devices(host, "/dev/nvidia0", "/dev/nvidiactl")
    libcuda = f"{host.lib_dir}/libcuda.so.{host.driver_version}"
    mounts = (
        CriMount(str(host.path(libcuda)), "/usr/lib/x86_64-linux-gnu/libcuda.so.1", readonly=True),
        CriMount("/dev/null", f"{VOLUME_ROOT}/0", readonly=True),
    )
    result = run(
        containerd.cri, pod, e2e_images, "served", "ls -l /dev/nvidia0", privileged=False,
        devices=devices, mounts=mounts,
    )  # fmt: skip
    assert set(nvidia_devices(result.spec)) == {"/dev/nvidia0", "/dev/nvidiactl"}  # nothing added
    ours = [m for m in result.spec.get("mounts") or [] if str(host.root) in str(m.get("source", ""))]
    assert [m["destination"] for m in ours] == ["/usr/lib/x86_64-linux-gnu/libcuda.so.1"], ours
    record = plugin.wait_for("GPU container left alone", container="served")
    assert "/dev/nvidia" in record.fields["reason"] and "libcuda" in record.fields["reason"], record.line
    assert not plugin.find("GPU container refused", container="served")


def test_cdi_applied_by_the_runtime_is_not_a_request(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    # nvidia-ctk's CDI specs set NVIDIA_VISIBLE_DEVICES=void next to the nodes they add: untouched.
    devices = host_devices(host, "/dev/nvidia1")
    env = {"NVIDIA_VISIBLE_DEVICES": "void"}
    result = run(
        containerd.cri, pod, e2e_images, "cdi-void", "true", env=env, privileged=False, devices=devices
    )
    assert set(nvidia_devices(result.spec)) == {"/dev/nvidia1"}
    plugin.wait_for("no GPU requested", container="cdi-void")


def test_pass_device_specs_pod_still_gets_the_driver(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    # The device plugin with --pass-device-specs adds the GPU's nodes (and the volume mount), but
    # no driver: device nodes alone are no sign of another injector.
    devices = host_devices(host, "/dev/nvidia1", "/dev/nvidiactl")
    mounts = (CriMount("/dev/null", f"{VOLUME_ROOT}/1", readonly=True),)
    result = run(
        containerd.cri, pod, e2e_images, "pass-specs", "/usr/bin/gpu-probe", privileged=False,
        devices=devices, mounts=mounts,
    )  # fmt: skip
    assert gpu_nodes(result) == {"/dev/nvidia1"} and "PROBE_OK" in result.log, result.log


def test_unprivileged_env_request_gets_no_gpus_and_a_warning(
    containerd: Containerd, plugin: GpuPluginProcess, pod: Pod, e2e_images: BuiltImages
) -> None:
    # A CPU-only pod from a CUDA base image: NVIDIA_VISIBLE_DEVICES=all from the image, unprivileged.
    env = {"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VERSION": "12.4.1"}
    result = run(
        containerd.cri, pod, e2e_images, "cpu-only", "ls /dev; echo STARTED", env=env, privileged=False
    )
    assert "STARTED" in result.log and not nvidia_devices(result.spec)
    record = plugin.wait_for("GPU request warning", container="cpu-only")
    assert record.level.lower().startswith("warn"), record.line
    assert record.fields["detail"].startswith("ignoring the GPU request of an unprivileged container"), (
        record.line
    )
    assert "gets no GPUs" in record.fields["detail"], record.line

"""A node without an NVIDIA driver: the real daemon still registers, leaves non-GPU containers
untouched, and fails only GPU containers, with a message that says no driver was found."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .containerd import Containerd
from .cri import ContainerRequest, CriError
from .gpu_plugin_runner import GpuPluginProcess, build_e2e_host, nvidia_devices
from .images import BuiltImages


@pytest.fixture()
def nodriver_plugin(containerd: Containerd, e2e_base: Path, tmp_path: Path) -> Iterator[GpuPluginProcess]:
    containerd.ensure_running()
    # The fake host only provides the command line's shape; every root then points at an empty
    # tree (argparse keeps the last value), so discovery finds no driver at all.
    host = build_e2e_host(e2e_base, 1)
    empty = tmp_path / "empty-host"
    (empty / "proc").mkdir(parents=True)
    roots = ["--driver-root", str(empty), "--dev-root", str(empty), "--proc-root", str(empty / "proc")]
    roots += ["--run-root", str(empty)]
    plugin = GpuPluginProcess(host, containerd.nri_socket, tmp_path / "plugin", extra_args=roots)
    try:
        plugin.start()
        yield plugin
    finally:
        try:
            assert plugin.stop() == 0, plugin.diagnostics()
        finally:
            plugin.kill()


def test_no_driver_fails_gpu_containers_only(
    containerd: Containerd, nodriver_plugin: GpuPluginProcess, e2e_images: BuiltImages
) -> None:
    image = e2e_images.refs["busybox"]
    plain = containerd.cri.run_container(ContainerRequest(image=image, command=["true"], name="plain"))
    assert plain.exit_code == 0 and nvidia_devices(plain.spec) == {}

    with pytest.raises(CriError) as info:
        containerd.cri.run_container(
            ContainerRequest(image=image, command=["true"], env={"NVIDIA_VISIBLE_DEVICES": "all"}, name="gpu")
        )
    assert "failed to get NRI adjustment" in info.value.message, info.value.message
    assert "no NVIDIA driver was found" in info.value.message, info.value.message
    assert nodriver_plugin.find("GPU container refused", reason="DriverNotFoundError"), (
        nodriver_plugin.diagnostics()
    )
    # Still registered and serving: the next non-GPU container is created normally.
    again = containerd.cri.run_container(ContainerRequest(image=image, command=["true"], name="plain2"))
    assert again.exit_code == 0
    assert len(nodriver_plugin.find("registered")) == 1

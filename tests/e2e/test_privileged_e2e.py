"""Privileged derivation against reality, on containerd 1.7 and 2.1.

NRI before v0.11 carries no process capabilities; ``nri_plugin.request.nri.is_privileged`` infers
"privileged" from the device cgroup rules CRI writes for ``privileged: true``. Here a recording
plugin (our wire stub) captures the NRI ``Container`` containerd really sends for a privileged
container, a plain one and a plain one with an extra CRI device, and ``is_privileged`` must be
true for the first only. Then the real daemon, configured with
``accept-nvidia-visible-devices-envvar-when-unprivileged = false`` (and the seed's behaviour,
``fail-unprivileged-envvar-requests = true``), must refuse the unprivileged
``NVIDIA_VISIBLE_DEVICES=all`` container and serve the privileged one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nri_plugin.request.nri import is_allow_all_rule, is_privileged
from nri_plugin.wire._gen import api_pb2 as api

from .containerd import Containerd
from .cri import ContainerRequest, CriClient, CriDevice, CriError
from .gpu_plugin_runner import CTL_MINOR, NVIDIA_MAJOR, GpuPluginProcess, build_e2e_host, nvidia_devices
from .images import BuiltImages
from .nri_test_plugin import AdjustSpec, PluginThread, RecordingPlugin

REFUSAL = "insufficient privileges to read device list from NVIDIA_VISIBLE_DEVICES envvar"


class ContainerCapture(RecordingPlugin):
    """Records every NRI ``Container`` of CreateContainer (a copy), by container name."""

    def __init__(self) -> None:
        super().__init__(AdjustSpec())
        self.containers: dict[str, api.Container] = {}

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        copy = api.Container()
        copy.CopyFrom(container)
        self.containers[container.name] = copy
        return await super().create_container(pod, container)


def _describe(container: api.Container) -> str:
    rules = [
        f"{'allow' if r.allow else 'deny'} {r.type or '-'} "
        f"{r.major.value if r.HasField('major') else '*'}:{r.minor.value if r.HasField('minor') else '*'} "
        f"{r.access}"
        for r in container.linux.resources.devices
    ]
    return f"{container.name}: {len(container.linux.devices)} linux.devices; device rules {rules}"


def test_is_privileged_matches_cri(
    containerd: Containerd,
    cri: CriClient,
    e2e_images: BuiltImages,
    nri_test_device: Path,
    record_property: Callable[[str, object], None],
) -> None:
    capture = ContainerCapture()
    image = e2e_images.refs["busybox"]
    with PluginThread(capture, containerd.nri_socket, name="capture") as runner:
        runner.wait_registered()
        with cri.pod("priv", privileged=True) as pod:
            cri.create_container(pod, ContainerRequest(image=image, name="privileged", privileged=True))
        with cri.pod("plain") as pod:
            cri.create_container(pod, ContainerRequest(image=image, name="plain"))
            cri.create_container(
                pod,
                ContainerRequest(
                    image=image,
                    name="with-device",
                    devices=[CriDevice(str(nri_test_device), "/dev/extra0", "rwm")],
                ),
            )
    priv, plain, with_dev = (capture.containers[n] for n in ("privileged", "plain", "with-device"))
    for c in (priv, plain, with_dev):
        record_property(f"nri_container_{c.name}", _describe(c))
        print(f"containerd {containerd.package_version}: {_describe(c)}")

    assert is_privileged(priv), _describe(priv)
    assert not is_privileged(plain), _describe(plain)
    assert not is_privileged(with_dev), _describe(with_dev)
    # What the derivation rests on, seen on the wire: only the privileged container has an
    # allow-all rule; the others start from deny-all; the CRI device shows up with its own rule.
    assert any(is_allow_all_rule(r) for r in priv.linux.resources.devices), _describe(priv)
    for c in (plain, with_dev):
        rules = list(c.linux.resources.devices)
        assert not any(is_allow_all_rule(r) for r in rules), _describe(c)
        assert rules and not rules[0].allow and rules[0].access == "rwm", _describe(c)
    assert [d.path for d in with_dev.linux.devices] == ["/dev/extra0"], _describe(with_dev)
    assert (with_dev.linux.devices[0].major, with_dev.linux.devices[0].minor) == (1, 3)
    assert any(
        r.allow and r.type == "c" and r.major.value == 1 and r.minor.value == 3
        for r in with_dev.linux.resources.devices
    ), _describe(with_dev)
    assert not plain.linux.devices, _describe(plain)
    # CRI privileged mode hands the host's devices to the container.
    assert len(priv.linux.devices) > 0, _describe(priv)


@pytest.fixture
def strict_plugin(containerd: Containerd, e2e_base: Path, tmp_path: Path) -> Iterator[GpuPluginProcess]:
    host = build_e2e_host(e2e_base, 2)
    config = tmp_path / "config.toml"
    # The seed's behaviour (fail the unprivileged env request) is behind a key since deviation 6;
    # the default (no GPUs, a warning) is tested in test_request_forms_e2e.py.
    config.write_text(
        "accept-nvidia-visible-devices-envvar-when-unprivileged = false\n"
        "[nri-plugin]\nfail-unprivileged-envvar-requests = true\n"
    )
    containerd.ensure_running()
    plugin = GpuPluginProcess(host, containerd.nri_socket, tmp_path / "plugin", config=config)
    try:
        plugin.start()
        yield plugin
        assert plugin.stop() == 0, plugin.diagnostics()
    finally:
        plugin.kill()


def test_unprivileged_envvar_refused_privileged_served(
    containerd: Containerd, cri: CriClient, e2e_images: BuiltImages, strict_plugin: GpuPluginProcess
) -> None:
    image = e2e_images.refs["debian-layout"]
    env = {"NVIDIA_VISIBLE_DEVICES": "all"}
    with pytest.raises(CriError) as info:
        cri.run_container(ContainerRequest(image=image, env=env, name="unpriv", command=["true"]))
    assert info.value.method == "CreateContainer", info.value
    assert REFUSAL in info.value.message, info.value.message
    strict_plugin.wait_for("GPU container refused", container="unpriv")

    result = cri.run_container(
        ContainerRequest(
            image=image,
            env=env,
            name="priv",
            privileged=True,
            command=["sh", "-c", "ls -l /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl; /usr/bin/gpu-probe"],
        )
    )
    assert result.exit_code == 0, result.log
    devices = nvidia_devices(result.spec)
    for minor in (0, 1):
        dev = devices[f"/dev/nvidia{minor}"]
        assert (dev["type"], dev["major"], dev["minor"]) == ("c", NVIDIA_MAJOR, minor), dev
    assert (devices["/dev/nvidiactl"]["major"], devices["/dev/nvidiactl"]["minor"]) == (
        NVIDIA_MAJOR,
        CTL_MINOR,
    )
    assert "PROBE_OK" in result.log, result.log
    record = strict_plugin.wait_for("GPU container adjusted", container="priv")
    assert record.fields["gpus"] == [g.uuid for g in strict_plugin.host.gpus], record.line

"""GpuPlugin glue: CreateContainer over a fake host, Configure, registration notifications."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_plugin import config as cfg
from nri_plugin import logs
from nri_plugin import plugin as plugin_mod
from nri_plugin.adjust.pipeline import decide
from nri_plugin.adjust.proto import to_proto
from nri_plugin.errors import ConfigError, DeviceSelectionError, DriverNotFoundError
from nri_plugin.metrics import NullMetrics
from nri_plugin.notify import Notifier
from nri_plugin.plugin import GpuPlugin, InternalError
from nri_plugin.request.nri import request_inputs
from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire.stub import event_bit, event_mask
from tests.fakehost.builder import FakeHost, build_fake_host, make_gpus, root_flags
from tests.fakemetrics import RecordingMetrics


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    return build_fake_host(tmp_path_factory.mktemp("fakehost") / "root", gpus=make_gpus(2))


def host_flags(root: str, **extra: object) -> cfg.Layer:
    values: dict[str, object | None] = {
        **root_flags(root),
        "nri-plugin.use-nvml": False,
        # the generated ld.so.cache has its own tests (test_image_loader.py); here the exact
        # adjustment of the pipeline is checked
        "nri-plugin.container-ldcache": "off",
    }
    values.update(extra)
    return cfg.layer_from_flags(values)


class Harness:
    def __init__(
        self, root: str, *, roots_in_file: bool = False, flags: dict[str, object] | None = None
    ) -> None:
        self.buf = io.StringIO()
        self.log = logs.Logger(logs.StreamSink(self.buf, "json"), logs.Level.INFO)
        self.metrics = RecordingMetrics()
        roots = host_flags(root, **(flags or {}))
        self.plugin = GpuPlugin(
            file_layer=cfg.Layer("test file", roots.values) if roots_in_file else cfg.Layer("test file"),
            flag_layer=cfg.Layer("command line") if roots_in_file else roots,
            logger=self.log,
            metrics=self.metrics,
        )

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.buf.getvalue().splitlines()]

    def clear(self) -> None:
        self.buf.seek(0)
        self.buf.truncate()


@pytest.fixture
def harness(host: FakeHost) -> Iterator[Harness]:
    h = Harness(str(host.root))
    asyncio.run(h.plugin.discover())
    h.clear()
    yield h


POD = api.PodSandbox(id="pod-id", name="trainer-0", namespace="ml")


def container(*env: str, name: str = "cuda") -> api.Container:
    return api.Container(id=f"{name}-id", pod_sandbox_id="pod-id", name=name, env=list(env))


def create(h: Harness, c: api.Container) -> api.CreateContainerResponse:
    return asyncio.run(h.plugin.create_container(POD, c))


def test_subscribes_to_create_stop_and_remove_container_only() -> None:
    h = Harness("/nonexistent")
    # Stop/Remove: the container's generated ld.so.cache is removed with it
    wanted = event_bit(api.CREATE_CONTAINER) | event_bit(api.STOP_CONTAINER) | event_bit(api.REMOVE_CONTAINER)
    assert event_mask(h.plugin) == wanted


def test_gpu_container_gets_the_pipeline_adjustment(harness: Harness, host: FakeHost) -> None:
    c = container("NVIDIA_VISIBLE_DEVICES=1", "NVIDIA_DRIVER_CAPABILITIES=compute,utility", "PATH=/bin")
    rsp = create(harness, c)
    env, mounts, privileged = request_inputs(c)
    expected = decide(env, mounts, privileged, harness.plugin.settings.hook, harness.plugin.driver.snapshot())
    assert rsp == api.CreateContainerResponse(adjust=to_proto(expected.adjustment))
    paths = {d.path for d in rsp.adjust.linux.devices}
    assert "/dev/nvidia1" in paths and "/dev/nvidia0" not in paths
    assert any(m.destination.endswith("libcuda.so.550.54.14") for m in rsp.adjust.mounts)
    assert harness.metrics.events == [("adjusted", "")]
    [line] = harness.records()
    assert line["level"] == "info" and line["msg"] == "GPU container adjusted"
    assert line["container"] == "cuda" and line["container_id"] == "cuda-id"
    assert line["pod"] == "trainer-0" and line["pod_namespace"] == "ml"
    assert line["devices"] == "1" and line["capabilities"] == "compute,utility"
    assert line["gpus"] == [host.gpus[1].uuid]
    assert line["device_nodes"] == len(rsp.adjust.linux.devices)
    assert line["mounts"] == len(rsp.adjust.mounts)
    assert isinstance(line["ms"], float | int) and line["ms"] >= 0


def test_non_gpu_container_is_empty_and_silent(harness: Harness) -> None:
    rsp = create(harness, container("PATH=/bin", "HOME=/root"))
    assert rsp == api.CreateContainerResponse()
    assert rsp.SerializeToString() == b""
    assert harness.buf.getvalue() == ""
    assert harness.metrics.events == [("skipped", "")]


def test_non_gpu_container_logs_at_debug(harness: Harness) -> None:
    harness.log.reconfigure(level=logs.Level.DEBUG)
    create(harness, container("PATH=/bin"))
    [line] = harness.records()
    assert line["level"] == "debug" and line["container"] == "cuda"


def test_container_error_is_logged_and_reraised(harness: Harness) -> None:
    with pytest.raises(DeviceSelectionError) as info:
        create(harness, container("NVIDIA_VISIBLE_DEVICES=7"))
    assert "7" in str(info.value)
    [line] = harness.records()
    assert line["level"] == "error" and line["reason"] == "DeviceSelectionError"
    assert line["error"] == str(info.value)
    assert harness.metrics.events == [("failed", "device_selection")]


def test_unexpected_exception_becomes_internal_container_error(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("surprise")

    monkeypatch.setattr(plugin_mod, "decide", broken)
    with pytest.raises(InternalError, match=r"^internal error: KeyError: 'surprise'") as info:
        create(harness, container("NVIDIA_VISIBLE_DEVICES=all"))
    assert isinstance(info.value.__cause__, KeyError)
    [line] = harness.records()
    assert line["level"] == "error" and "Traceback" in str(line["traceback"])
    assert harness.metrics.events == [("failed", "internal")]


def test_without_driver_only_gpu_containers_fail(tmp_path: Path) -> None:
    h = Harness(str(tmp_path))
    asyncio.run(h.plugin.discover())
    assert any(str(r["msg"]).startswith("no usable NVIDIA driver") for r in h.records())
    assert create(h, container("PATH=/bin")) == api.CreateContainerResponse()
    with pytest.raises(DriverNotFoundError):
        create(h, container("NVIDIA_VISIBLE_DEVICES=all"))


def test_configure_applies_the_nri_config_under_the_flags(harness: Harness) -> None:
    p = harness.plugin
    asyncio.run(
        p.configure(
            'swarm-resource = "DOCKER_RESOURCE_GPU"\n[nri-plugin]\nlog-level = "debug"\n',
            "containerd",
            "1.7.24",
        )
    )
    assert p.settings.hook.swarm_resource == "DOCKER_RESOURCE_GPU"
    assert p.settings.log_level == "debug"
    assert harness.log.enabled(logs.Level.DEBUG)
    rsp = create(harness, container("DOCKER_RESOURCE_GPU=0"))
    assert "/dev/nvidia0" in {d.path for d in rsp.adjust.linux.devices}
    configured = [r for r in harness.records() if r["msg"] == "configured"]
    assert configured and configured[0]["runtime"] == "containerd 1.7.24"
    # A command-line flag beats the NRI config.
    h2 = Harness(str(harness.plugin.settings.driver_root), flags={"nri-plugin.log-level": "error"})
    asyncio.run(h2.plugin.configure('[nri-plugin]\nlog-level = "debug"\n', "containerd", "2.1"))
    assert h2.plugin.settings.log_level == "error"


def test_bad_nri_config_fails_configure_loudly(harness: Harness) -> None:
    with pytest.raises(ConfigError, match=r"NRI config: unknown key 'nri-plugin\.colour'"):
        asyncio.run(harness.plugin.configure('[nri-plugin]\ncolour = "red"\n', "containerd", "1.7.24"))
    [line] = harness.records()
    assert line["level"] == "error" and "drop this plugin" in str(line["msg"])
    assert harness.plugin.settings.log_level == "info"  # unchanged


def test_toolkit_warnings_of_the_nri_config_are_logged_once(harness: Harness) -> None:
    text = '[nvidia-container-runtime]\nmode = "cdi"\n[nvidia-container-cli]\nfuture-key = 1\n'
    for _ in range(3):  # Configure comes again at every reconnect
        asyncio.run(harness.plugin.configure(text, "containerd", "2.1.9"))
    warned = [r for r in harness.records() if r["msg"] == "toolkit configuration not applied"]
    assert [r["level"] for r in warned] == ["warning", "warning"]
    details = " ".join(str(r["detail"]) for r in warned)
    assert "mode = 'cdi'" in details and "nvidia-container-cli.future-key" in details


def test_a_loader_setting_at_configure_rebuilds_the_loader_and_a_request_setting_does_not(
    harness: Harness,
) -> None:
    p = harness.plugin
    first = p.loader
    asyncio.run(p.configure('swarm-resource = "DOCKER_RESOURCE_GPU"\n', "containerd", "1.7.24"))
    assert p.settings.swarm_resource == "DOCKER_RESOURCE_GPU" and p.loader is first  # REQUEST only
    native = '[nri-plugin]\nsnapshotter = "native"\n'
    asyncio.run(p.configure(native, "containerd", "1.7.24"))
    assert p.loader is not first and p.loader.config.snapshotter == "native"  # LOADER
    second = p.loader
    mount = native + '[nvidia-container-runtime.modes.legacy]\ncuda-compat-mode = "mount"\n'
    asyncio.run(p.configure(mount, "containerd", "1.7.24"))  # LOADER, but the same loader config
    assert p.settings.cuda_compat_mode == "mount" and p.loader is second
    assert p.loader.config == second.config


def test_configure_with_new_roots_rediscovers(tmp_path: Path, host: FakeHost) -> None:
    h = Harness(str(tmp_path), roots_in_file=True)  # no driver here; the NRI config may override
    asyncio.run(h.plugin.discover())
    assert h.plugin.driver.snapshot() is None
    root = str(host.root)
    text = (
        f'[nvidia-container-cli]\nroot = "{root}"\n[nri-plugin]\ndev-root = "{root}"\n'
        f'proc-root = "{root}/proc"\nrun-root = "{root}"\n'
    )
    asyncio.run(h.plugin.configure(text, "containerd", "1.7.24"))
    snap = h.plugin.driver.snapshot()
    assert snap is not None and len(snap.gpus) == 2
    rsp = create(h, container("NVIDIA_VISIBLE_DEVICES=all"))
    assert {"/dev/nvidia0", "/dev/nvidia1"} <= {d.path for d in rsp.adjust.linux.devices}


def test_registration_notifies_systemd(tmp_path: Path, host: FakeHost) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        h = Harness(str(host.root))
        h.plugin.notifier = Notifier({"NOTIFY_SOCKET": path})

        async def scenario() -> None:
            await h.plugin.discover()
            await h.plugin.configure("", "containerd", "1.7.24")
            await h.plugin.on_registered()
            await h.plugin.on_disconnected()
            await h.plugin.on_registered()

        asyncio.run(scenario())
        first = server.recv(4096).decode()
        assert "READY=1" in first and "2 GPU(s), driver 550.54.14" in first and "10-nvidia-gpu" in first
        assert server.recv(4096) == b"STATUS=reconnecting to the NRI socket"
        again = server.recv(4096).decode()
        assert again.startswith("STATUS=registered") and "READY=1" not in again


def test_metrics_endpoint_follows_settings(host: FakeHost) -> None:
    h = Harness(str(host.root), flags={"nri-plugin.metrics-address": "127.0.0.1:0"})
    h.plugin.metrics = NullMetrics()

    async def scenario() -> str:
        await h.plugin.discover()
        h.plugin.start_background()
        address = h.plugin.metrics.address
        await h.plugin.close()
        return address

    assert asyncio.run(scenario()) == "127.0.0.1:0"

"""Wire end-to-end: our NRI stub against a real containerd 1.7.24 and 2.1.x.

Every test runs on both versions (``containerd`` fixture ids ``ctrd17`` / ``ctrd21``) and checks
the final OCI spec (``ContainerStatus(verbose)``) and the running container.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from .containerd import Containerd
from .cri import ContainerRequest, ContainerResult, CriClient, CriError
from .images import BuiltImages
from .nri_test_plugin import ADJUST_MARKER, FAIL_MARKER, AdjustSpec, PluginThread, RecordingPlugin

# Runs inside the container; every line is checked by _assert_adjusted_inside.
PROBE_SCRIPT = (
    "ls -l /dev/nri-test0; "
    'echo "ENV=$NRI_TEST_INJECTED"; '
    'echo "FILE=$(cat /nri-test/hostfile)"; '
    "echo data > /dev/nri-test0 && echo DEV_WRITE_OK; "
    "(echo x > /nri-test/hostfile) 2>/dev/null || echo MOUNT_RO_OK"
)


@pytest.fixture
def host_file(tmp_path: Path) -> Path:
    f = tmp_path / "hostfile"
    f.write_text("hello from the host\n")
    return f


@pytest.fixture
def adjust_spec(nri_test_device: Path, host_file: Path) -> AdjustSpec:
    return AdjustSpec(
        env_value="nri-e2e-value",
        device_host_path=str(nri_test_device),
        mount_source=str(host_file),
    )


def upstream_version(package_version: str) -> str:
    """'1.7.24~ds1-6+deb13u1' -> '1.7.24'; '2.1.9+ds1-5' -> '2.1.9'."""
    match = re.match(r"\d+\.\d+\.\d+", package_version)
    assert match, f"cannot parse containerd package version {package_version!r}"
    return match.group(0)


def _run_probe(cri: CriClient, images: BuiltImages, env: dict[str, str]) -> ContainerResult:
    return cri.run_container(
        ContainerRequest(image=images.refs["busybox"], command=["sh", "-c", PROBE_SCRIPT], env=env)
    )


def _spec_devices(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("linux", {}).get("devices") or [])


def _spec_device_rules(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("linux", {}).get("resources", {}).get("devices") or [])


def _assert_adjusted_spec(spec: dict[str, Any], adjust: AdjustSpec) -> None:
    env = [e for e in spec["process"]["env"] if e.startswith(adjust.env_name + "=")]
    assert env == [f"{adjust.env_name}={adjust.env_value}"], spec["process"]["env"]
    devices = [d for d in _spec_devices(spec) if d["path"] == adjust.device_path]
    assert len(devices) == 1, _spec_devices(spec)
    dev = devices[0]
    assert (dev["type"], dev["major"], dev["minor"]) == ("c", 1, 3), dev
    assert dev.get("fileMode") == adjust.device_mode, dev
    rules = [
        r
        for r in _spec_device_rules(spec)
        if r.get("allow") and r.get("type") == "c" and r.get("major") == 1 and r.get("minor") == 3
    ]
    assert rules, f"no cgroup allow rule for c 1:3 in {_spec_device_rules(spec)}"
    assert set(rules[-1]["access"]) >= {"r", "w"}, rules
    mounts = [m for m in spec["mounts"] if m["destination"] == adjust.mount_destination]
    assert len(mounts) == 1, spec["mounts"]
    assert mounts[0]["source"] == adjust.mount_source
    assert "ro" in mounts[0]["options"], mounts[0]


def _assert_adjusted_inside(result: ContainerResult, adjust: AdjustSpec, host_file_text: str) -> None:
    assert result.exit_code == 0, result.log
    lines = result.log.splitlines()
    ls_line = lines[0]
    assert re.match(r"^crw-rw-rw-\s+1\s+root\s+root\s+1,\s+3\s.*/dev/nri-test0$", ls_line), result.log
    assert f"ENV={adjust.env_value}" in lines, result.log
    assert f"FILE={host_file_text.strip()}" in lines, result.log
    assert "DEV_WRITE_OK" in lines, result.log
    assert "MOUNT_RO_OK" in lines, result.log


def _assert_not_adjusted(result: ContainerResult, adjust: AdjustSpec) -> None:
    assert adjust.env_name not in result.env
    assert not [d for d in _spec_devices(result.spec) if d["path"] == adjust.device_path]
    assert not [m for m in result.spec["mounts"] if m["destination"] == adjust.mount_destination]
    assert "ENV=\n" in result.log or "ENV=" in result.log.splitlines(), result.log


def test_registers_configure_and_synchronize(
    containerd: Containerd, cri: CriClient, e2e_images: BuiltImages, adjust_spec: AdjustSpec
) -> None:
    # A container that exists before the plugin connects must show up in Synchronize.
    with cri.pod("pre-existing") as pod:
        cid = cri.create_container(pod, ContainerRequest(image=e2e_images.refs["busybox"], name="before"))
        plugin = RecordingPlugin(adjust_spec)
        with PluginThread(plugin, containerd.nri_socket) as runner:
            runner.wait_registered()
            assert runner.stub.registered.is_set()
            assert len(plugin.records.configures) == 1
            config, name, version = plugin.records.configures[0]
            assert config == ""  # external plugins get no config
            assert name == "containerd"
            assert version.startswith(upstream_version(containerd.package_version)), (
                version,
                containerd.package_version,
            )
            assert runner.stub.runtime_name == name and runner.stub.runtime_version == version
            assert len(plugin.records.syncs) == 1
            pods, containers = plugin.records.syncs[0]
            assert pod.id in {p.id for p in pods}
            synced = {c.id: c for c in containers}
            assert cid in synced and synced[cid].name == "before"
            assert synced[cid].pod_sandbox_id == pod.id


def test_adjustment_env_device_mount(
    containerd: Containerd,
    cri: CriClient,
    e2e_images: BuiltImages,
    adjust_spec: AdjustSpec,
    host_file: Path,
) -> None:
    plugin = RecordingPlugin(adjust_spec)
    with PluginThread(plugin, containerd.nri_socket) as runner:
        runner.wait_registered()
        result = _run_probe(cri, e2e_images, {ADJUST_MARKER: "1"})
        _assert_adjusted_spec(result.spec, adjust_spec)
        _assert_adjusted_inside(result, adjust_spec, host_file.read_text())
        # Without the marker the same plugin leaves the container alone.
        plain = _run_probe(cri, e2e_images, {})
        _assert_not_adjusted(plain, adjust_spec)
        assert len(plugin.records.adjusted) == 1
        assert len(plugin.records.creates) == 2


def test_synchronize_larger_than_4k(
    containerd: Containerd, cri: CriClient, e2e_images: BuiltImages, adjust_spec: AdjustSpec
) -> None:
    count = 40
    with cri.pod("many") as pod:
        ids = {
            cri.create_container(
                pod,
                ContainerRequest(
                    image=e2e_images.refs["busybox"],
                    name=f"sync-{i:02d}",
                    env={"FILLER": "x" * 64, "INDEX": str(i)},
                    labels={"nri-e2e/index": str(i)},
                ),
            )
            for i in range(count)
        }
        plugin = RecordingPlugin(adjust_spec)
        with PluginThread(plugin, containerd.nri_socket) as runner:
            runner.wait_registered()
            assert len(plugin.records.syncs) == 1
            pods, containers = plugin.records.syncs[0]
            synced = {c.id for c in containers}
            assert ids <= synced, f"missing from Synchronize: {sorted(ids - synced)}"
            size = sum(p.ByteSize() for p in pods) + sum(c.ByteSize() for c in containers)
            assert size > 4096, f"Synchronize payload only {size} bytes: the test does not exercise >4 KiB"
            # The connection stays usable after the big message.
            result = _run_probe(cri, e2e_images, {ADJUST_MARKER: "1"})
            _assert_adjusted_spec(result.spec, adjust_spec)


def test_handler_error_fails_create_container(
    containerd: Containerd, cri: CriClient, e2e_images: BuiltImages, adjust_spec: AdjustSpec
) -> None:
    plugin = RecordingPlugin(adjust_spec)
    with PluginThread(plugin, containerd.nri_socket) as runner:
        runner.wait_registered()
        reason = "requested-failure-7f3a"
        with pytest.raises(CriError) as info:
            _run_probe(cri, e2e_images, {FAIL_MARKER: reason})
        err = info.value
        assert err.method == "CreateContainer"
        assert "failed to get NRI adjustment" in err.message, err.message
        assert "nri-e2e plugin refuses container" in err.message and reason in err.message, err.message
        # The error failed that container only: the plugin stays registered and still adjusts.
        assert runner.stub.registrations == 1 and runner.stub.registered.is_set()
        result = _run_probe(cri, e2e_images, {ADJUST_MARKER: "1"})
        _assert_adjusted_spec(result.spec, adjust_spec)
        assert result.exit_code == 0, result.log


def test_containerd_restart_reregisters(
    containerd: Containerd,
    cri: CriClient,
    e2e_images: BuiltImages,
    adjust_spec: AdjustSpec,
    host_file: Path,
) -> None:
    plugin = RecordingPlugin(adjust_spec)
    with PluginThread(plugin, containerd.nri_socket) as runner:
        runner.wait_registered()
        containerd.restart(kill=True)  # SIGKILL: the plugin only sees EOF
        runner.wait_registered(count=2)
        assert runner.stub.reconnects >= 1
        assert len(plugin.records.configures) == 2
        assert len(plugin.records.syncs) == 2
        result = _run_probe(containerd.cri, e2e_images, {ADJUST_MARKER: "1"})
        _assert_adjusted_spec(result.spec, adjust_spec)
        _assert_adjusted_inside(result, adjust_spec, host_file.read_text())


LAUNCHED_BODY = """\
from tests.e2e.nri_test_plugin import launched_main
launched_main({log_file!r})
"""


def test_runtime_launched_plugin(
    containerd: Containerd,
    make_containerd: Any,
    e2e_images: BuiltImages,
    adjust_spec: AdjustSpec,
    host_file: Path,
    tmp_path: Path,
) -> None:
    log_file = tmp_path / "launched-plugin.log"
    launched_spec = AdjustSpec(
        env_value="from-the-plugin-config-file",
        device_host_path=adjust_spec.device_host_path,
        mount_source=adjust_spec.mount_source,
    )

    def install(ctrd: Containerd) -> None:
        ctrd.install_plugin(
            "10", "e2e", LAUNCHED_BODY.format(log_file=str(log_file)), config=launched_spec.to_json()
        )

    ctrd = make_containerd(containerd.version, setup=install)
    result = _run_probe(ctrd.cri, e2e_images, {ADJUST_MARKER: "1"})
    log = log_file.read_text()
    _assert_adjusted_spec(result.spec, launched_spec)
    _assert_adjusted_inside(result, launched_spec, host_file.read_text())
    # The plugin ran with containerd's empty environment and got its config through Configure.
    started = re.search(r"started pid=\d+ env=(\[.*\])", log)
    assert started, log
    env_names = set(json.loads(started.group(1).replace("'", '"')))
    # Python itself may add LC_CTYPE (PEP 538 locale coercion); nothing else may be there.
    assert env_names - {"LC_CTYPE"} == {"NRI_PLUGIN_NAME", "NRI_PLUGIN_IDX", "NRI_PLUGIN_SOCKET"}, log
    assert "configure runtime=containerd" in log and "from-the-plugin-config-file" in log, log
    assert "adjusting container" in log, log

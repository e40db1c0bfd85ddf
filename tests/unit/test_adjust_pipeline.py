"""decide(): fast path, driver-less host, requirements per selected device, the composition."""

from __future__ import annotations

from pathlib import Path

import pytest

from nri_plugin.adjust import pipeline
from nri_plugin.adjust.build import build_adjustment
from nri_plugin.adjust.model import EMPTY_ADJUSTMENT
from nri_plugin.adjust.pipeline import NO_GPU, decide, may_request_gpus
from nri_plugin.errors import DeviceSelectionError, DriverNotFoundError, RequestError, RequirementError
from nri_plugin.host.discover import discover
from nri_plugin.host.model import DriverSnapshot
from nri_plugin.request.model import HookConfig, Mount
from nri_plugin.request.requirements import HostFacts
from tests.fakehost import BRAND_GEFORCE, FakeMig, build_fake_host, make_gpus

CFG = HookConfig()
VOLUMES = HookConfig(accept_volume_mounts=True)
MIG_UUID = "MIG-0f0e0d0c-0b0a-0908-0706-050403020100"


@pytest.fixture(scope="module")
def snap(tmp_path_factory: pytest.TempPathFactory) -> DriverSnapshot:
    """GPU 0: Tesla, compute capability 9.0. GPU 1: GeForce, 8.6, with one MIG device."""
    gpus = make_gpus(2)
    gpus[1].brand = BRAND_GEFORCE
    gpus[1].cc = (8, 6)
    gpus[1].mig = [FakeMig(gi=1, ci=0, uuid=MIG_UUID)]
    host = build_fake_host(Path(tmp_path_factory.mktemp("pipeline")) / "host", gpus=gpus)
    snapshot = discover(host.roots)
    assert snapshot is not None and snapshot.cuda_version == "12.4"
    return snapshot


@pytest.mark.parametrize(
    "env",
    [
        [],
        ["PATH=/usr/bin", "HOME=/root"],
        ["NVIDIA_DRIVER_CAPABILITIES=all", "NVIDIA_REQUIRE_CUDA=cuda>=99", "NVIDIA_MIG_CONFIG_DEVICES=all"],
        ["NVIDIA_VISIBLE_DEVICESX=0", "XNVIDIA_VISIBLE_DEVICES=0", "no-equals-sign"],
    ],
)
def test_fast_path_returns_the_shared_empty_decision(
    env: list[str], snap: DriverSnapshot, monkeypatch: pytest.MonkeyPatch
) -> None:
    def must_not_run(*args: object) -> None:
        raise AssertionError("resolve_request ran on the fast path")

    monkeypatch.setattr(pipeline, "resolve_request", must_not_run)
    mounts = [Mount("/dev/null", "/var/run/nvidia-container-devices/0")]  # ignored: volume mounts off
    assert decide(env, mounts, False, CFG, snap) is NO_GPU
    assert decide(env, [], True, CFG, None) is NO_GPU
    assert NO_GPU.request is None and NO_GPU.selection is None and NO_GPU.adjustment is EMPTY_ADJUSTMENT


@pytest.mark.parametrize(
    ("env", "mounts", "config", "expected"),
    [
        (["NVIDIA_VISIBLE_DEVICES=0"], [], CFG, True),
        (["NVIDIA_VISIBLE_DEVICES="], [], CFG, True),
        (["CUDA_VERSION=12.4"], [], CFG, True),
        (["GPUS=0"], [], HookConfig(swarm_resource="DOCKER_RESOURCE_GPU, GPUS"), True),
        (["GPUS=0"], [], CFG, False),
        ([], [Mount("/dev/null", "/var/run/nvidia-container-devices/0")], VOLUMES, True),
        ([], [Mount("/dev/null", "/var/run/other/0")], VOLUMES, False),
    ],
)  # fmt: skip
def test_may_request_gpus(env: list[str], mounts: list[Mount], config: HookConfig, expected: bool) -> None:
    assert may_request_gpus(env, mounts, config) is expected


@pytest.mark.parametrize("value", ["", "void"])
def test_not_a_gpu_container_after_resolution(value: str, snap: DriverSnapshot) -> None:
    assert decide([f"NVIDIA_VISIBLE_DEVICES={value}"], [], False, CFG, snap) is NO_GPU


def test_gpu_container_composition(snap: DriverSnapshot) -> None:
    decision = decide(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=compute"], [], False, CFG, snap
    )
    assert decision.request is not None and decision.request.devices == "0"
    assert decision.selection is not None and decision.selection.gpus == (snap.gpus[0],)
    assert decision.adjustment is build_adjustment(decision.request, snap)
    assert "/dev/nvidia0" in [d.path for d in decision.adjustment.devices]


def test_volume_mount_request(snap: DriverSnapshot) -> None:
    mounts = [
        Mount("/dev/null", "/var/run/nvidia-container-devices/GPU-00000001-1111-2222-3333-000000000001")
    ]
    decision = decide([], mounts, False, HookConfig(accept_volume_mounts=True), snap)
    assert decision.selection is not None and decision.selection.gpus == (snap.gpus[1],)


def test_legacy_cuda_image_gets_all_devices(snap: DriverSnapshot) -> None:
    decision = decide(["CUDA_VERSION=11.0"], [], False, CFG, snap)
    assert decision.selection is not None
    assert decision.selection.gpus == snap.gpus and len(decision.selection.mig_devices) == 1


def test_no_driver_message() -> None:
    with pytest.raises(DriverNotFoundError, match=r"^no NVIDIA driver was found on this host") as exc:
        decide(["NVIDIA_VISIBLE_DEVICES=GPU-x"], [], False, CFG, None)
    assert "NVIDIA_VISIBLE_DEVICES='GPU-x'" in str(exc.value)
    assert "driver root" in str(exc.value)
    with pytest.raises(DriverNotFoundError, match="NVIDIA_VISIBLE_DEVICES='none'"):
        decide(["NVIDIA_VISIBLE_DEVICES=none"], [], False, CFG, None)


def test_unmet_requirement_message(snap: DriverSnapshot) -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=12.6 brand=tesla,driver>=999"]
    with pytest.raises(
        RequirementError, match=r"unsatisfied condition: cuda>=12\.6, please update your driver"
    ):
        decide(env, [], False, CFG, snap)
    assert decide([*env, "NVIDIA_DISABLE_REQUIRE=true"], [], False, CFG, snap).adjustment.devices
    assert decide(env, [], False, HookConfig(disable_require=True), snap).adjustment.devices
    ok = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=12.4"]
    assert decide(ok, [], False, CFG, snap).request is not None


@pytest.mark.parametrize(
    ("devices", "ok"),
    [("0", True), ("1", False), ("all", False), ("none", True), (MIG_UUID, False), ("1:0", False)],
)
def test_requirements_per_selected_device(devices: str, ok: bool, snap: DriverSnapshot) -> None:
    env = [
        f"NVIDIA_VISIBLE_DEVICES={devices}",
        "NVIDIA_REQUIRE_ARCH=arch>=9.0",
        "NVIDIA_REQUIRE_BRAND=brand=tesla",
    ]
    if ok:
        assert decide(env, [], False, CFG, snap).request is not None
    else:
        with pytest.raises(RequirementError, match=r"unsatisfied condition: arch>=9\.0"):
            decide(env, [], False, CFG, snap)


def test_requirement_facts(snap: DriverSnapshot, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[HostFacts] = []
    monkeypatch.setattr(pipeline, "check_requirements", lambda reqs, facts: seen.append(facts))
    env = ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_REQUIRE_X=driver>=1"]
    decide(env, [], False, CFG, snap)
    tesla = HostFacts(cuda="12.4", driver="550.54.14", arch="9.0", brand="Tesla")
    geforce = HostFacts(cuda="12.4", driver="550.54.14", arch="8.6", brand="GeForce")
    assert seen == [tesla, geforce]  # the MIG device's facts are its parent's: checked once
    seen.clear()
    decide(["NVIDIA_VISIBLE_DEVICES=none", "NVIDIA_REQUIRE_X=driver>=1"], [], False, CFG, snap)
    assert seen == [HostFacts(cuda="12.4", driver="550.54.14", arch=None, brand=None)]
    seen.clear()
    decide(["NVIDIA_VISIBLE_DEVICES=1:0", "NVIDIA_REQUIRE_X=driver>=1"], [], False, CFG, snap)
    assert seen == [geforce]
    seen.clear()
    decide(["NVIDIA_VISIBLE_DEVICES=0"], [], False, CFG, snap)  # no requirements: nothing to check
    assert seen == []


def test_request_errors_pass_through(snap: DriverSnapshot) -> None:
    with pytest.raises(DeviceSelectionError) as info:
        decide(["NVIDIA_VISIBLE_DEVICES=0,7"], [], False, CFG, snap)
    # The variable and value at fault, the id, this node's devices, where to look.
    message = str(info.value)
    assert message.startswith("NVIDIA_VISIBLE_DEVICES='0,7': 7: unknown device; this node has GPUs 0-1 (")
    assert snap.gpus[0].uuid in message and "nvidia-nri-plugin info" in message
    with pytest.raises(RequestError, match="cannot set MIG_CONFIG_DEVICES in non privileged container"):
        decide(["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES=all"], [], False, CFG, snap)
    decision = decide(["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES=all"], [], True, CFG, snap)
    assert "/dev/nvidia-caps/nvidia-cap1" in [d.path for d in decision.adjustment.devices]

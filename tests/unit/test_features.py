"""The driver features beyond the core and the host facts as libnvidia-container reads them.

Each feature on a fake host that has it (``build_fake_host(with_features=True)``, the default):
what ``decide`` gives for it, that it is given only when asked, what a node without it says, and
the refusals (a planted node with another major, an IMEX channel the node does not have).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nri_plugin.adjust.pipeline import Decision, decide
from nri_plugin.errors import ContainerError, RequirementError
from nri_plugin.host.discover import discover
from nri_plugin.host.model import DriverSnapshot
from nri_plugin.request.model import HookConfig, Mount
from tests.fakehost import BRAND_GEFORCE, BRAND_NVIDIA, FakeHost, FakeMig, build_fake_host, make_gpus
from tests.fakehost.builder import DRM_MAJOR, FS_MAJOR, drm_card, drm_render

CFG = HookConfig()
MIG_UUID = "MIG-0f0e0d0c-0b0a-0908-0706-050403020100"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    """GPU 0: Tesla 9.0; GPU 1: GeForce 8.6; GPU 2: brand "NVIDIA" (14), in MIG mode."""
    gpus = make_gpus(3)
    gpus[1].brand, gpus[1].cc = BRAND_GEFORCE, (8, 6)
    gpus[2].brand = BRAND_NVIDIA
    gpus[2].mig = [FakeMig(gi=1, ci=0, uuid=MIG_UUID)]
    return build_fake_host(Path(tmp_path_factory.mktemp("features")) / "host", gpus=gpus)


@pytest.fixture(scope="module")
def snap(host: FakeHost) -> DriverSnapshot:
    snapshot = discover(host.roots)
    assert snapshot is not None and snapshot.source == "nvml"
    return snapshot


@pytest.fixture(scope="module")
def proc_snap(host: FakeHost) -> DriverSnapshot:
    snapshot = discover(host.roots, use_nvml=False)
    assert snapshot is not None and snapshot.source == "proc"
    return snapshot


def run(snap: DriverSnapshot, *env: str, privileged: bool = False, **kw: object) -> Decision:
    return decide(list(env), [], privileged, CFG, snap, **kw)  # type: ignore[arg-type]


def nodes(decision: Decision) -> list[str]:
    return [d.path for d in decision.adjustment.devices]


def mounts(decision: Decision) -> dict[str, str]:
    return {m.destination: m.source for m in decision.adjustment.mounts}


# --- IMEX ----------------------------------------------------------------------------------------


def test_imex_channel(snap: DriverSnapshot) -> None:
    decision = run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=1")
    imex = [d for d in decision.adjustment.devices if "imex" in d.path]
    assert [(d.path, d.major, d.minor) for d in imex] == [("/dev/nvidia-caps-imex-channels/channel1", 234, 1)]
    assert not [p for p in nodes(run(snap, "NVIDIA_VISIBLE_DEVICES=0")) if "imex" in p]


def test_imex_all_and_cdi_name(snap: DriverSnapshot) -> None:
    every = run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=all", privileged=True)
    assert [p for p in nodes(every) if "imex" in p] == [
        "/dev/nvidia-caps-imex-channels/channel0",
        "/dev/nvidia-caps-imex-channels/channel1",
    ]
    # Deviation 7: all channels only for a privileged container (the toolkit: for none).
    unprivileged = run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=all")
    assert not [p for p in nodes(unprivileged) if "imex" in p]
    assert "NVIDIA_IMEX_CHANNELS=all in an unprivileged container: ignored" in unprivileged.warnings[0]
    cdi = run(snap, "NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu=0,nvidia.com/imex-channel=0")
    assert [p for p in nodes(cdi) if "imex" in p] == ["/dev/nvidia-caps-imex-channels/channel0"]


def test_imex_channel_the_node_lacks(snap: DriverSnapshot) -> None:
    with pytest.raises(ContainerError) as info:
        run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=7")
    message = str(info.value)
    assert "IMEX channel 7" in message and "its channels: 0, 1" in message
    assert "nvidia-modprobe -i 7" in message


# --- gated features --------------------------------------------------------------------------


def test_gds_and_mofed_only_when_enabled(snap: DriverSnapshot) -> None:
    plain = run(snap, "NVIDIA_VISIBLE_DEVICES=0")
    assert not [p for p in nodes(plain) if "nvidia-fs" in p or "infiniband" in p]
    assert "/run/udev" not in mounts(plain)
    both = run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_GDS=enabled", "NVIDIA_MOFED=enabled")
    got = nodes(both)
    for path in ("/dev/nvidia-fs0", "/dev/nvidia-fs1", "/dev/infiniband/uverbs0", "/dev/infiniband/rdma_cm"):
        assert path in got, got
    assert {"/run/udev", "/etc/cufile.json"} <= set(mounts(both))
    assert both.warnings == ()


def test_gdrcopy_and_nvswitch(snap: DriverSnapshot) -> None:
    # compute only (no utility): NVSWITCH brings fabricmanager's socket all the same
    decision = run(
        snap,
        "NVIDIA_VISIBLE_DEVICES=0",
        "NVIDIA_DRIVER_CAPABILITIES=compute",
        "NVIDIA_GDRCOPY=enabled",
        "NVIDIA_NVSWITCH=enabled",
    )
    got = nodes(decision)
    assert {"/dev/gdrdrv", "/dev/nvidia-nvswitchctl", "/dev/nvidia-nvswitch0"} <= set(got)
    assert "/run/nvidia-fabricmanager/socket" in mounts(decision)


def test_feature_the_node_lacks_is_a_warning(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "h", gpus=make_gpus(1), with_features=False)
    snapshot = discover(host.roots)
    assert snapshot is not None
    decision = run(snapshot, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_GDS=enabled")
    assert decision.request is not None and not [p for p in nodes(decision) if "nvidia-fs" in p]
    assert len(decision.warnings) == 1 and decision.warnings[0].startswith("NVIDIA_GDS=enabled, but")


@pytest.mark.parametrize(
    ("name", "numbers", "feature"),
    [
        ("nvidia-nvswitchctl", (240, 3), "NVIDIA_NVSWITCH"),  # the control node is minor 255
        ("nvidia-nvswitch7", (240, 0), "NVIDIA_NVSWITCH"),  # nvswitch<N> is minor N
        ("infiniband/uverbs5", (231, 7), "NVIDIA_MOFED"),  # uverbs<N> is minor 192 + N
        ("infiniband/rdma_cm", (10, 232), "NVIDIA_MOFED"),  # /dev/kvm's numbers, not rdma_cm's
    ],
)
def test_feature_node_with_the_wrong_minor_is_refused(
    tmp_path: Path, name: str, numbers: tuple[int, int], feature: str
) -> None:
    host = build_fake_host(tmp_path / "h", gpus=make_gpus(1))
    planted = host.path(f"/dev/{name}")
    planted.unlink(missing_ok=True)
    os.mknod(planted, 0o20666, os.makedev(*numbers))
    snapshot = discover(host.roots)
    assert snapshot is not None
    got = nodes(run(snapshot, "NVIDIA_VISIBLE_DEVICES=0", f"{feature}=enabled"))
    assert f"/dev/{name}" not in got
    prefix = f"refused device node /dev/{name}: is {numbers[0]}:{numbers[1]}"
    assert any(m.startswith(prefix) for m in snapshot.missing), snapshot.missing


def test_planted_node_with_another_major_is_refused(tmp_path: Path) -> None:
    host = build_fake_host(tmp_path / "h", gpus=make_gpus(1))
    planted = host.path("/dev/nvidia-fs5")
    os.mknod(planted, 0o20666, os.makedev(1, 1))  # /dev/mem's numbers under an nvidia-fs name
    snapshot = discover(host.roots)
    assert snapshot is not None
    got = nodes(run(snapshot, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_GDS=enabled"))
    assert "/dev/nvidia-fs5" not in got and "/dev/nvidia-fs0" in got
    assert any(
        f"refused device node /dev/nvidia-fs5: is 1:1 ({FS_MAJOR}:5 expected)" in m for m in snapshot.missing
    )


# --- graphics and display ---------------------------------------------------------------------


def test_graphics_gets_icd_files_and_the_selected_gpus_drm_nodes(snap: DriverSnapshot) -> None:
    decision = run(snap, "NVIDIA_VISIBLE_DEVICES=1", "NVIDIA_DRIVER_CAPABILITIES=graphics")
    got = {d.path: (d.major, d.minor) for d in decision.adjustment.devices}
    assert got[f"/dev/dri/{drm_card(1)}"] == (DRM_MAJOR, 2)
    assert got[f"/dev/dri/{drm_render(1)}"] == (DRM_MAJOR, 129)
    assert f"/dev/dri/{drm_card(0)}" not in got  # GPU 0 was not selected
    files = mounts(decision)
    for path in (
        "/usr/share/vulkan/icd.d/nvidia_icd.json",
        "/etc/vulkan/implicit_layer.d/nvidia_layers.json",
        "/usr/share/glvnd/egl_vendor.d/10_nvidia.json",
        "/usr/share/egl/egl_external_platform.d/15_nvidia_gbm.json",
        "/usr/lib/x86_64-linux-gnu/libnvidia-egl-gbm.so.1",
        "/usr/lib64/gbm/nvidia-drm_gbm.so",
    ):
        assert path in files, path
    assert files["/usr/lib64/gbm/nvidia-drm_gbm.so"].endswith("libnvidia-allocator.so.550.54.14")
    assert not [p for p in files if "xorg" in p]  # X.Org modules: display only


def test_display_gets_xorg_modules(snap: DriverSnapshot) -> None:
    files = mounts(run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=display"))
    assert "/usr/lib/xorg/modules/drivers/nvidia_drv.so" in files
    assert "/usr/lib/xorg/modules/extensions/libglxserver_nvidia.so.550.54.14" in files
    assert "/usr/lib/xorg/modules/extensions/libglxserver_nvidia.so" in files  # the name X.Org loads
    assert "/usr/share/X11/xorg.conf.d/10-nvidia.conf" in files


def test_compute_gets_the_opencl_icd_but_no_graphics(snap: DriverSnapshot) -> None:
    decision = run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=compute")
    files = mounts(decision)
    assert "/etc/OpenCL/vendors/nvidia.icd" in files
    assert not [p for p in files if "vulkan" in p or "egl" in p]
    assert not [p for p in nodes(decision) if p.startswith("/dev/dri/")]


def test_gpu_in_mig_mode_gets_no_drm_nodes(snap: DriverSnapshot) -> None:
    decision = run(snap, "NVIDIA_VISIBLE_DEVICES=2", "NVIDIA_DRIVER_CAPABILITIES=graphics")
    assert not [p for p in nodes(decision) if p.startswith("/dev/dri/")]


# --- management, CDI names, left alone ------------------------------------------------------


def test_management_gets_every_nvidia_node(snap: DriverSnapshot) -> None:
    decision = run(snap, "NVIDIA_VISIBLE_DEVICES=management.nvidia.com/gpu=all", privileged=True)
    got = set(nodes(decision))
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2", "/dev/nvidia-modeset"} <= got
    assert "/dev/nvidia-caps/nvidia-cap1" in got and "/dev/nvidia-caps-imex-channels/channel0" in got
    assert not [p for p in got if "nvidia-fs" in p or "nvswitch" in p]  # their features bring them
    assert decision.warnings == ()


def test_management_unprivileged_withholds_mig_config_monitor_and_imex(snap: DriverSnapshot) -> None:
    # NVIDIA_MIG_CONFIG_DEVICES needs privilege; a device name must not get around that.
    decision = run(snap, "NVIDIA_VISIBLE_DEVICES=management.nvidia.com/gpu=all")
    got = set(nodes(decision))
    assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia2"} <= got
    assert "/dev/nvidia-caps/nvidia-cap1" not in got and "/dev/nvidia-caps/nvidia-cap2" not in got
    assert not [p for p in got if "imex" in p]
    assert [p for p in got if p.startswith("/dev/nvidia-caps/")]  # MIG access capabilities stay
    assert "management.nvidia.com/gpu=all in an unprivileged container" in decision.warnings[0]


def test_cdi_name_selects_like_the_plain_id(snap: DriverSnapshot) -> None:
    by_name = run(snap, f"NVIDIA_VISIBLE_DEVICES=nvidia.com/gpu={snap.gpus[1].uuid}")
    by_id = run(snap, "NVIDIA_VISIBLE_DEVICES=1")
    assert by_name.adjustment == by_id.adjustment and by_name.selection == by_id.selection


LIB_MOUNT = Mount("/host/libcuda.so.550.54.14", "/usr/lib/x86_64-linux-gnu/libcuda.so.1")


def test_container_served_by_another_injector_is_left_alone(snap: DriverSnapshot) -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=all"]
    decision = decide(env, [LIB_MOUNT], False, CFG, snap, device_paths=("/dev/null", "/dev/nvidia0"))
    assert decision.request is not None and decision.left_alone
    assert "/dev/nvidia0" in decision.left_alone and "libcuda.so.1" in decision.left_alone
    assert not decision.adjustment.devices and not decision.adjustment.mounts


@pytest.mark.parametrize(
    ("privileged", "spec_mounts", "paths"),
    [
        (True, [LIB_MOUNT], ("/dev/nvidia0", "/dev/nvidiactl")),  # privileged: every host device
        (False, [], ("/dev/nvidiactl", "/dev/nvidia0")),  # the device plugin's --pass-device-specs
        (False, [LIB_MOUNT], ("/dev/fuse",)),  # no NVIDIA node
    ],
)
def test_device_nodes_alone_are_no_evidence(
    snap: DriverSnapshot, privileged: bool, spec_mounts: list[Mount], paths: tuple[str, ...]
) -> None:
    decision = decide(["NVIDIA_VISIBLE_DEVICES=0"], spec_mounts, privileged, CFG, snap, device_paths=paths)
    assert not decision.left_alone and "/dev/nvidia0" in nodes(decision)
    assert "/usr/lib64/libcuda.so.1" in mounts(decision)


def test_annotations_need_the_key(snap: DriverSnapshot) -> None:
    ann = {"cdi.k8s.io/nvidia-device-plugin_abc": "nvidia.com/gpu=1"}
    assert decide([], [], False, CFG, snap, annotations=ann).request is None
    config = HookConfig(accept_cdi_annotations=True)
    decision = decide([], [], False, config, snap, annotations=ann)
    assert decision.selection is not None and [g.index for g in decision.selection.gpus] == [1]


def test_unprivileged_env_ignored_decision_carries_the_warning(snap: DriverSnapshot) -> None:
    config = HookConfig(accept_envvar_unprivileged=False)
    decision = decide(["NVIDIA_VISIBLE_DEVICES=all"], [], False, config, snap)
    assert decision.request is None and "gets no GPUs" in decision.warnings[0]


# --- host facts and requirements --------------------------------------------------------------


def test_brand_nvidia_requirement_on_a_data_centre_brand(snap: DriverSnapshot) -> None:
    assert snap.gpus[2].brand == "Nvidia"
    run(snap, "NVIDIA_VISIBLE_DEVICES=2", "NVIDIA_REQUIRE_CUDA=brand=nvidia,driver>=550")
    with pytest.raises(RequirementError, match="unsatisfied condition: brand=unknown"):
        run(snap, "NVIDIA_VISIBLE_DEVICES=2", "NVIDIA_REQUIRE_CUDA=brand=unknown")


def test_requirement_on_a_fact_discovery_lacks_fails_clearly(proc_snap: DriverSnapshot) -> None:
    with pytest.raises(RequirementError) as info:
        run(proc_snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=12.0")
    message = str(info.value)
    assert message.startswith(
        "NVIDIA_REQUIRE_CUDA='cuda>=12.0': cannot check the requirement term 'cuda>=12.0'"
    )
    assert "CUDA version the driver supports" in message and "NVIDIA_DISABLE_REQUIRE=true" in message
    with pytest.raises(RequirementError, match="GPU's brand"):
        run(proc_snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_BRAND=brand=tesla")
    # facts /proc has (the driver version) still work; so does switching requirements off
    run(proc_snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_DRIVER=driver>=550")
    run(
        proc_snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=12.0", "NVIDIA_DISABLE_REQUIRE=true"
    )
    # without a device (none), arch and brand terms hold as in the CLI
    run(proc_snap, "NVIDIA_VISIBLE_DEVICES=none", "NVIDIA_REQUIRE_ARCH=arch>=9.0")


def test_requirements_walk_devices_in_request_order(snap: DriverSnapshot) -> None:
    # A fails on GPU 0 (Tesla) only, B on GPU 1 (GeForce) only: the first device listed decides.
    env = ("NVIDIA_REQUIRE_A=brand=geforce", "NVIDIA_REQUIRE_B=brand=tesla")
    with pytest.raises(RequirementError, match=r"^NVIDIA_REQUIRE_A='brand=geforce': unsatisfied"):
        run(snap, "NVIDIA_VISIBLE_DEVICES=0,1", *env)
    with pytest.raises(RequirementError, match=r"^NVIDIA_REQUIRE_B='brand=tesla': unsatisfied"):
        run(snap, "NVIDIA_VISIBLE_DEVICES=1,0", *env)


def test_unknown_fact_in_one_alternative_does_not_decide_the_or(proc_snap: DriverSnapshot) -> None:
    # Alternatives are ORed: a later one that holds satisfies it, in either order.
    for requirement in ("cuda>=12.0 driver>=500", "driver>=500 cuda>=12.0"):
        run(proc_snap, "NVIDIA_VISIBLE_DEVICES=0", f"NVIDIA_REQUIRE_X={requirement}")
    # A definitely false term ends its alternative whatever the unknown one would say.
    with pytest.raises(RequirementError, match="unsatisfied condition: driver>=999"):
        run(proc_snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_X=driver>=999,cuda>=12.0")
    with pytest.raises(RequirementError, match=r"cannot check the requirement term 'cuda>=12\.0'"):
        run(proc_snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_X=cuda>=12.0 driver>=999")


def test_unmet_condition_says_what_the_node_offers(snap: DriverSnapshot) -> None:
    with pytest.raises(RequirementError) as info:
        run(snap, "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_REQUIRE_CUDA=cuda>=99.0")
    message = str(info.value)
    assert "unsatisfied condition: cuda>=99.0, please update your driver" in message  # the CLI's text
    assert message.endswith(
        "this node offers CUDA 12.4, driver 550.54.14, brand GeForce/Nvidia/Tesla, arch 8.6/9.0"
    ), message
    legacy = pytest.raises(
        RequirementError, match=r"^CUDA_VERSION \(legacy image\)='cuda>=99.1': unsatisfied"
    )
    with legacy:
        run(snap, "CUDA_VERSION=99.1")

"""The request forms of today's NVIDIA stack beyond the seed hook, table by table.

CDI device names in device lists, ``cdi.k8s.io/*`` annotations, the device plugin's ``cdi/`` and
``imex/`` volume mounts, ``NVIDIA_IMEX_CHANNELS``, the gated features, and deviation 6 (an
unprivileged env request under ``accept-nvidia-visible-devices-envvar-when-unprivileged = false``).
"""

from __future__ import annotations

import pytest

from nri_plugin.errors import RequestError
from nri_plugin.request import HookConfig, Mount, resolve_request
from nri_plugin.request.devices import parse_device_list

ROOT = "/var/run/nvidia-container-devices"
VOL = HookConfig(accept_volume_mounts=True)
ANN = HookConfig(accept_cdi_annotations=True)


# --- CDI names in a device list --------------------------------------------------------------

ListCase = tuple[str, tuple[str, ...], bool, tuple[str, ...], tuple[str, ...]]
DEVICE_LISTS: dict[str, ListCase] = {
    # name: (NVIDIA_VISIBLE_DEVICES, device ids, management, imex channels, foreign names)
    "plain ids unchanged": ("0,GPU-1,MIG-2,1:0", ("0", "GPU-1", "MIG-2", "1:0"), False, (), ()),
    "cdi index": ("nvidia.com/gpu=0", ("0",), False, (), ()),
    "cdi uuid": ("nvidia.com/gpu=GPU-8a0b", ("GPU-8a0b",), False, (), ()),
    "cdi all": ("nvidia.com/gpu=all", ("all",), False, (), ()),
    "cdi mig uuid": ("nvidia.com/gpu=MIG-4b1c", ("MIG-4b1c",), False, (), ()),
    "cdi mig index pair": ("nvidia.com/gpu=1:0", ("1:0",), False, (), ()),
    "cdi type-index names": ("nvidia.com/gpu=gpu3,nvidia.com/gpu=mig1:2", ("3", "1:2"), False, (), ()),
    "jit-cdi kind": ("runtime.nvidia.com/gpu=2", ("2",), False, (), ()),
    "device plugin kind": ("k8s.device-plugin.nvidia.com/gpu=GPU-7", ("GPU-7",), False, (), ()),
    "management": ("management.nvidia.com/gpu=all", (), True, (), ()),
    "imex kind": ("nvidia.com/imex-channel=3,nvidia.com/imex-channel=channel4", (), False, ("3", "4"), ()),
    "mixed with plain ids": ("0, nvidia.com/gpu=1 ,GPU-5", ("0", "1", "GPU-5"), False, (), ()),
    "other vendor left alone": (
        "vendor.com/fpga=0,nvidia.com/gpu=1",
        ("1",),
        False,
        (),
        ("vendor.com/fpga=0",),
    ),
    "other nvidia kind left alone": ("nvidia.com/mofed=all", (), False, (), ("nvidia.com/mofed=all",)),
    "not a cdi name stays an id": ("a=b", ("a=b",), False, (), ()),
}


@pytest.mark.parametrize("case", list(DEVICE_LISTS.values()), ids=list(DEVICE_LISTS))
def test_cdi_names_in_visible_devices(case: ListCase) -> None:
    value, ids, management, imex, foreign = case
    request = resolve_request([f"NVIDIA_VISIBLE_DEVICES={value}"], [], True)
    if not (ids or management or imex):
        assert request is None  # only names we do not own: not our container at all
        return
    assert request is not None
    assert request.devices == value  # the raw value is kept as the seed keeps it
    assert (request.device_ids, request.management, request.imex_ids, request.foreign_devices) == (
        ids,
        management,
        imex,
        foreign,
    )
    assert request.all_devices == ("all" in ids)


def test_cdi_none_is_a_gpu_container_without_gpus() -> None:
    for value in ("runtime.nvidia.com/gpu=none", "nvidia.com/gpu=none"):
        request = resolve_request([f"NVIDIA_VISIBLE_DEVICES={value}"], [], True)
        assert request is not None and request.device_ids == () and request.devices_ours


def test_foreign_only_list_with_imex_env_is_not_ours() -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=vendor.com/x=1", "NVIDIA_IMEX_CHANNELS=0"]
    assert resolve_request(env, [], True) is None


def test_foreign_names_are_noted_not_failed() -> None:
    notes: list[str] = []
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=0,example.com/net=a"], [], True, notes=notes)
    assert request is not None and request.device_ids == ("0",)
    assert notes == [
        "NVIDIA_VISIBLE_DEVICES: leaving CDI devices of other kinds to the runtime: example.com/net=a"
    ]


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("management.nvidia.com/gpu=0", "the management kind has one device, 'all'"),
        ("nvidia.com/imex-channel=x", "'x' is not an IMEX channel"),
        ("nvidia.com/imex-channel=2000000", "'2000000' is not an IMEX channel"),
    ],
)
def test_invalid_names_of_our_kinds_fail_with_the_variable(value: str, fragment: str) -> None:
    with pytest.raises(RequestError) as info:
        resolve_request([f"NVIDIA_VISIBLE_DEVICES={value}"], [], True)
    assert str(info.value).startswith("NVIDIA_VISIBLE_DEVICES: "), info.value
    assert fragment in str(info.value)


def test_parse_is_linear_on_a_long_list() -> None:
    parsed = parse_device_list([f"nvidia.com/gpu={i}" for i in range(5000)], "X")
    assert len(parsed.ids) == 5000 and parsed.ids[-1] == "4999"


# --- cdi.k8s.io annotations ---------------------------------------------------------------------


def test_annotations_ignored_by_default() -> None:
    ann = {"cdi.k8s.io/nvidia-device-plugin": "nvidia.com/gpu=1"}
    assert resolve_request([], [], False, annotations=ann) is None
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=0"], [], False, annotations=ann)
    assert request is not None and request.device_ids == ("0",)


def test_annotations_read_first_when_enabled_keys_sorted() -> None:
    ann = {
        "cdi.k8s.io/z": "nvidia.com/gpu=2",
        "cdi.k8s.io/a": "nvidia.com/gpu=0,nvidia.com/gpu=1",
        "other.io/x": "nvidia.com/gpu=7",
    }
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=5"], [], False, ANN, annotations=ann)
    assert request is not None
    assert request.device_ids == ("0", "1", "2")
    assert request.devices_source == "cdi.k8s.io annotations"


def test_annotations_with_only_foreign_names_fall_back_to_env() -> None:
    ann = {"cdi.k8s.io/net": "example.com/net=eth1"}
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=3"], [], True, ANN, annotations=ann)
    assert request is not None and request.device_ids == ("3",)


def test_annotation_value_over_the_limit_is_refused() -> None:
    ann = {"cdi.k8s.io/x": "nvidia.com/gpu=0," * 2000}
    with pytest.raises(RequestError, match=r"annotation cdi\.k8s\.io/x=.*over the NVIDIA NRI plugin's limit"):
        resolve_request([], [], True, ANN, annotations=ann)


def test_annotations_not_subject_to_the_envvar_privilege_rule() -> None:
    # Like the device plugin's volume mounts, annotations are written by the device plugin (through
    # kubelet), so the unprivileged env-var policy does not apply to them.
    config = HookConfig(accept_cdi_annotations=True, accept_envvar_unprivileged=False)
    request = resolve_request([], [], False, config, annotations={"cdi.k8s.io/dp": "nvidia.com/gpu=1"})
    assert request is not None and request.device_ids == ("1",)


# --- the device plugin's volume-mount strategy -----------------------------------------------

MOUNT_FORMS: dict[str, tuple[list[str], tuple[str, ...], tuple[str, ...]]] = {
    # name: (destinations under ROOT, device ids, imex channels)
    "plain id": (["/0", "/GPU-1"], ("0", "GPU-1"), ()),
    "cdi name with =": (["/cdi/nvidia.com/gpu=0"], ("0",), ()),
    "cdi name as path": (["/cdi/nvidia.com/gpu/GPU-9"], ("GPU-9",), ()),
    "cdi management": (["/cdi/management.nvidia.com/gpu=all"], (), ()),
    "imex channel": (["/0", "/imex/3"], ("0",), ("3",)),
    "imex channel name": (["/0", "/imex/channel5"], ("0",), ("5",)),
}


@pytest.mark.parametrize("case", list(MOUNT_FORMS.values()), ids=list(MOUNT_FORMS))
def test_volume_mount_forms(case: tuple[list[str], tuple[str, ...], tuple[str, ...]]) -> None:
    destinations, ids, imex = case
    mounts = [Mount("/dev/null", ROOT + d) for d in destinations]
    request = resolve_request([], mounts, False, VOL)
    assert request is not None
    assert request.device_ids == ids and request.imex_ids == imex
    assert request.management == any("management" in d for d in destinations)


def test_malformed_cdi_mount_is_skipped_with_a_note() -> None:
    notes: list[str] = []
    mounts = [Mount("/dev/null", ROOT + "/cdi/foo"), Mount("/dev/null", ROOT + "/1")]
    request = resolve_request([], mounts, True, VOL, notes=notes)
    assert request is not None and request.device_ids == ("1",)
    assert notes == [f"ignoring a device-list mount: {ROOT}/cdi/foo is not a CDI device name"]


def test_annotations_total_size_is_bounded() -> None:
    ann = {f"cdi.k8s.io/k{i}": "nvidia.com/gpu=0," * 900 for i in range(8)}
    with pytest.raises(RequestError, match=r"the 8 cdi\.k8s\.io/\* annotations are .* together"):
        resolve_request([], [], True, ANN, annotations=ann)


def test_imex_mounts_alone_are_not_a_device_list() -> None:
    mounts = [Mount("/dev/null", ROOT + "/imex/1")]
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=0"], mounts, True, VOL)
    assert request is not None and request.device_ids == ("0",) and request.imex_ids == ("1",)


def test_invalid_imex_mount_names_the_mounts() -> None:
    with pytest.raises(RequestError, match=r"device-list mounts under .*'abc' is not an IMEX channel"):
        mounts = [Mount("/dev/null", ROOT + "/0"), Mount("/dev/null", ROOT + "/imex/abc")]
        resolve_request([], mounts, True, VOL)


# --- NVIDIA_IMEX_CHANNELS and the gated features ---------------------------------------------


def test_imex_channels_from_env() -> None:
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=0, channel2,0"], [], True)
    assert request is not None and request.imex_ids == ("0", "2")
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=all"], [], True)
    assert request is not None and request.imex_ids == ("all",)


def test_imex_channels_alone_do_not_make_a_gpu_container() -> None:
    assert resolve_request(["NVIDIA_IMEX_CHANNELS=0"], [], True) is None


def test_imex_env_follows_the_envvar_privilege_rule() -> None:
    config = HookConfig(accept_envvar_unprivileged=False, accept_volume_mounts=True)
    mounts = [Mount("/dev/null", ROOT + "/0")]
    request = resolve_request(["NVIDIA_IMEX_CHANNELS=1"], mounts, False, config)
    assert request is not None and request.device_ids == ("0",) and request.imex_ids == ()
    request = resolve_request(["NVIDIA_IMEX_CHANNELS=1"], mounts, True, config)
    assert request is not None and request.imex_ids == ("1",)


def test_invalid_imex_env_names_variable_and_value() -> None:
    with pytest.raises(RequestError) as info:
        resolve_request(["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=0,ch1"], [], True)
    assert str(info.value).startswith("NVIDIA_IMEX_CHANNELS='0,ch1': 'ch1' is not an IMEX channel")


@pytest.mark.parametrize(
    ("env", "features"),
    [
        (["NVIDIA_GDS=enabled", "NVIDIA_MOFED=enabled"], {"gds", "mofed"}),
        (["NVIDIA_GDRCOPY=enabled", "NVIDIA_NVSWITCH=enabled"], {"gdrcopy", "nvswitch"}),
        (["NVIDIA_GDS=true", "NVIDIA_MOFED=Enabled", "NVIDIA_NVSWITCH= enabled"], set()),  # exactly "enabled"
    ],
)
def test_gated_features(env: list[str], features: set[str]) -> None:
    request = resolve_request(["NVIDIA_VISIBLE_DEVICES=0", *env], [], True)
    assert request is not None and request.features == frozenset(features)
    assert resolve_request(env, [], True) is None  # only for GPU containers


# --- deviation 6: unprivileged env requests when the node does not accept them -----------------

STRICT = HookConfig(accept_envvar_unprivileged=False)


@pytest.mark.parametrize(
    "env",
    [
        ["NVIDIA_VISIBLE_DEVICES=all"],
        ["CUDA_VERSION=12.4.1"],  # a CUDA base image used for a CPU-only pod
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_IMEX_CHANNELS=0"],
    ],
)
def test_deviation_6_unprivileged_env_request_gets_no_gpus_and_a_warning(env: list[str]) -> None:
    notes: list[str] = []
    assert resolve_request(env, [], False, STRICT, notes=notes) is None
    assert len(notes) == 1 and "gets no GPUs" in notes[0], notes
    assert "accept-nvidia-visible-devices-envvar-when-unprivileged = false" in notes[0]


def test_deviation_6_seed_behaviour_behind_a_key() -> None:
    config = HookConfig(accept_envvar_unprivileged=False, fail_unprivileged_envvar=True)
    with pytest.raises(RequestError, match="insufficient privileges to read device list"):
        resolve_request(["NVIDIA_VISIBLE_DEVICES=all"], [], False, config)


def test_deviation_6_privileged_and_mount_requests_unaffected() -> None:
    assert resolve_request(["NVIDIA_VISIBLE_DEVICES=all"], [], True, STRICT) is not None
    config = HookConfig(accept_envvar_unprivileged=False, accept_volume_mounts=True)
    request = resolve_request(
        ["NVIDIA_VISIBLE_DEVICES=all"], [Mount("/dev/null", ROOT + "/1")], False, config
    )
    assert request is not None and request.device_ids == ("1",)

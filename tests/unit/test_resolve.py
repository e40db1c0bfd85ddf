"""Request resolution: every branch and panic of the seed hook, the listed deviations, and
hypothesis properties.  Expected values of the Go tables were produced by running the seed's
own Go functions (Go 1.19) on the same inputs."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nri_plugin.errors import RequestError
from nri_plugin.request.model import (
    ALL_DRIVER_CAPABILITIES,
    DEFAULT_DRIVER_CAPABILITIES,
    GpuRequest,
    HookConfig,
    Mount,
)
from nri_plugin.request.resolve import (
    env_map,
    go_clean_path,
    parse_cuda_version,
    parse_go_bool,
    resolve_request,
)

ROOT = "/var/run/nvidia-container-devices"
# The seed's behaviour for unprivileged env requests is behind fail_unprivileged_envvar (deviation 6).
PRIV = HookConfig(accept_envvar_unprivileged=False, fail_unprivileged_envvar=True)
VOL = HookConfig(accept_volume_mounts=True)
VOL_STRICT = HookConfig(
    accept_volume_mounts=True, accept_envvar_unprivileged=False, fail_unprivileged_envvar=True
)


@dataclass(frozen=True)
class Case:
    env: list[str]
    privileged: bool = True
    config: HookConfig = field(default_factory=HookConfig)
    mounts: list[Mount] = field(default_factory=list)
    # expected: None (not a GPU container), a dict of GpuRequest fields, or an error text
    devices: str | None = None
    error: str | None = None
    fields: dict[str, object] = field(default_factory=dict)


def _run(case: Case) -> GpuRequest | None:
    return resolve_request(case.env, case.mounts, case.privileged, case.config)


SEED_BRANCHES: dict[str, Case] = {
    # getEnvMap
    "env_split_at_first_equals": Case(["NVIDIA_VISIBLE_DEVICES=a=b"], devices="a=b"),
    "env_later_duplicate_wins": Case(["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1"], devices="1"),
    "env_empty_list": Case([], devices=None),
    # isLegacyCUDAImage + getDevicesFromEnvvar
    "envvar_unset_legacy_defaults_to_all": Case(["CUDA_VERSION=10.1"], devices="all"),
    "envvar_unset_not_legacy_when_require_cuda_set": Case(
        ["CUDA_VERSION=10.1", "NVIDIA_REQUIRE_CUDA=cuda>=10.1"], devices=None
    ),
    "envvar_unset_not_legacy_when_cuda_version_empty": Case(["CUDA_VERSION="], devices=None),
    "envvar_unset_is_not_gpu_container": Case(["PATH=/bin"], devices=None),
    "envvar_empty_is_not_gpu_container": Case(["NVIDIA_VISIBLE_DEVICES="], devices=None),
    "envvar_empty_legacy_is_not_gpu_container": Case(
        ["NVIDIA_VISIBLE_DEVICES=", "CUDA_VERSION=10.1"], devices=None
    ),
    "envvar_void_is_not_gpu_container": Case(["NVIDIA_VISIBLE_DEVICES=void"], devices=None),
    "envvar_none_is_gpu_container_without_gpus": Case(["NVIDIA_VISIBLE_DEVICES=none"], devices=""),
    "envvar_value_kept_raw": Case(["NVIDIA_VISIBLE_DEVICES= 0, 1,"], devices=" 0, 1,"),
    "envvar_special_values_are_case_sensitive": Case(["NVIDIA_VISIBLE_DEVICES=None"], devices="None"),
    "envvar_swarm_variable_alone": Case(
        ["DOCKER_RESOURCE_GPU=2"], config=HookConfig(swarm_resource="DOCKER_RESOURCE_GPU"), devices="2"
    ),
    # getDevices: privilege check on envvar devices
    "envvar_unprivileged_rejected_when_not_accepted": Case(
        ["NVIDIA_VISIBLE_DEVICES=0"],
        privileged=False,
        config=PRIV,
        error="insufficient privileges to read device list from NVIDIA_VISIBLE_DEVICES envvar",
    ),
    "envvar_legacy_all_unprivileged_rejected_when_not_accepted": Case(
        ["CUDA_VERSION=10.1"],
        privileged=False,
        config=PRIV,
        error="insufficient privileges to read device list from NVIDIA_VISIBLE_DEVICES envvar",
    ),
    "envvar_unprivileged_no_request_is_not_an_error": Case(
        ["NVIDIA_VISIBLE_DEVICES=void"], privileged=False, config=PRIV, devices=None
    ),
    "envvar_privileged_accepted": Case(["NVIDIA_VISIBLE_DEVICES=0"], config=PRIV, devices="0"),
    "envvar_unprivileged_accepted_by_default": Case(
        ["NVIDIA_VISIBLE_DEVICES=0"], privileged=False, devices="0"
    ),
    # getDevicesFromMounts
    "mounts_ignored_unless_accepted": Case([], mounts=[Mount("/dev/null", ROOT + "/0")], devices=None),
    "mounts_request_devices": Case(
        [],
        config=VOL,
        mounts=[Mount("/dev/null", ROOT + "/0"), Mount("/dev/null", ROOT + "/GPU-1")],
        devices="0,GPU-1",
    ),
    "mounts_source_must_be_dev_null": Case(
        [], config=VOL, mounts=[Mount("/dev/zero", ROOT + "/0")], devices=None
    ),
    "mounts_source_is_cleaned": Case(
        [], config=VOL, mounts=[Mount("/dev/../dev//./null", ROOT + "/0")], devices="0"
    ),
    "mounts_destination_is_cleaned": Case(
        [],
        config=VOL,
        mounts=[Mount("/dev/null", "/var/run//x/../nvidia-container-devices/./1/")],
        devices="1",
    ),
    "mounts_destination_shorter_than_root": Case(
        [], config=VOL, mounts=[Mount("/dev/null", "/var/run")], devices=None
    ),
    "mounts_destination_outside_root": Case(
        [], config=VOL, mounts=[Mount("/dev/null", "/var/lib/nvidia-container-devices/0")], devices=None
    ),
    "mounts_destination_equal_to_root_is_skipped": Case(
        [], config=VOL, mounts=[Mount("/dev/null", ROOT + "/")], devices=None
    ),
    "mounts_keep_subpaths": Case(
        [],
        config=VOL,
        mounts=[Mount("/dev/null", ROOT + "/some/sub/path")],
        devices="some/sub/path",  # (the device plugin's cdi/ and imex/ forms: test_request_forms.py)
    ),
    "mounts_take_precedence_over_envvar": Case(
        ["NVIDIA_VISIBLE_DEVICES=all"], config=VOL, mounts=[Mount("/dev/null", ROOT + "/3")], devices="3"
    ),
    "mounts_bypass_privilege_check": Case(
        ["NVIDIA_VISIBLE_DEVICES=all"],
        privileged=False,
        config=VOL_STRICT,
        mounts=[Mount("/dev/null", ROOT + "/3")],
        devices="3",
    ),
    "mounts_without_match_fall_back_to_envvar": Case(
        ["NVIDIA_VISIBLE_DEVICES=all"], config=VOL, mounts=[Mount("/tmp", "/data")], devices="all"
    ),
    "mounts_fallback_envvar_privilege_check_applies": Case(
        ["NVIDIA_VISIBLE_DEVICES=all"],
        privileged=False,
        config=VOL_STRICT,
        error="insufficient privileges to read device list from NVIDIA_VISIBLE_DEVICES envvar",
    ),
    # MIG config / monitor
    "mig_config_unprivileged_rejected": Case(
        ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES=all"],
        privileged=False,
        error="cannot set MIG_CONFIG_DEVICES in non privileged container",
    ),
    "mig_config_empty_unprivileged_allowed": Case(
        ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES="],
        privileged=False,
        devices="all",
        fields={"mig_config_devices": ""},
    ),
    "mig_config_privileged_kept": Case(
        ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES=all"],
        devices="all",
        fields={"mig_config_devices": "all"},
    ),
    "mig_monitor_unprivileged_rejected": Case(
        ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_MONITOR_DEVICES=all"],
        privileged=False,
        error="cannot set MIG_MONITOR_DEVICES in non privileged container",
    ),
    "mig_monitor_privileged_kept": Case(
        ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_MONITOR_DEVICES=0"],
        devices="all",
        fields={"mig_monitor_devices": "0"},
    ),
    # check order: devices, then MIG config, then MIG monitor, then requirements
    "order_devices_checked_before_mig": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_MIG_CONFIG_DEVICES=all"],
        privileged=False,
        config=PRIV,
        error="insufficient privileges to read device list from NVIDIA_VISIBLE_DEVICES envvar",
    ),
    "order_mig_config_checked_before_mig_monitor": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_MIG_MONITOR_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES=all"],
        privileged=False,
        error="cannot set MIG_CONFIG_DEVICES in non privileged container",
    ),
    "order_mig_monitor_checked_before_cuda_version": Case(
        ["CUDA_VERSION=x", "NVIDIA_MIG_MONITOR_DEVICES=all"],
        privileged=False,
        error="cannot set MIG_MONITOR_DEVICES in non privileged container",
    ),
    "order_not_gpu_container_skips_every_check": Case(
        ["CUDA_VERSION=x", "NVIDIA_VISIBLE_DEVICES=void", "NVIDIA_MIG_CONFIG_DEVICES=all"],
        privileged=False,
        devices=None,
    ),
    # getDriverCapabilities
    "caps_unset_legacy_all": Case(
        ["CUDA_VERSION=10.1"], devices="all", fields={"driver_capabilities": ALL_DRIVER_CAPABILITIES}
    ),
    "caps_unset_default": Case(
        ["NVIDIA_VISIBLE_DEVICES=0"], devices="0", fields={"driver_capabilities": "utility,compute"}
    ),
    "caps_empty_default": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES="],
        devices="0",
        fields={"driver_capabilities": DEFAULT_DRIVER_CAPABILITIES},
    ),
    "caps_empty_legacy_default": Case(
        ["CUDA_VERSION=10.1", "NVIDIA_DRIVER_CAPABILITIES="],
        devices="all",
        fields={"driver_capabilities": DEFAULT_DRIVER_CAPABILITIES},
    ),
    "caps_all": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=all"],
        devices="0",
        fields={"driver_capabilities": ALL_DRIVER_CAPABILITIES},
    ),
    "caps_value_kept_raw": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=video, graphics"],
        devices="0",
        fields={"driver_capabilities": "video, graphics"},
    ),
    # getRequirements
    "requirements_every_require_variable_sorted_by_name": Case(
        [
            "NVIDIA_VISIBLE_DEVICES=0",
            "NVIDIA_REQUIRE_B=arch>=7.0",
            "NVIDIA_REQUIRE_=",
            "NVIDIA_REQUIRE_A=x",
            "NVIDIA_REQUIRE_JETPACK=j",
            "NVIDIA_REQUIRED=y",
            "nvidia_require_c=z",
        ],
        devices="0",
        fields={"requirements": ("", "x", "arch>=7.0", "j")},
    ),
    "requirements_legacy_adds_cuda_major_minor_last": Case(
        ["CUDA_VERSION=11.0.3", "NVIDIA_REQUIRE_ZZ=driver>=400"],
        devices="all",
        fields={"requirements": ("driver>=400", "cuda>=11.0")},
    ),
    "requirements_legacy_major_only": Case(
        ["CUDA_VERSION=9"], devices="all", fields={"requirements": ("cuda>=9.0",)}
    ),
    "requirements_none": Case(["NVIDIA_VISIBLE_DEVICES=0"], devices="0", fields={"requirements": ()}),
    "requirements_invalid_cuda_version_panics": Case(
        ["CUDA_VERSION=10.x"], error="invalid CUDA version: 10.x"
    ),
    "requirements_cuda_version_checked_even_when_disabled": Case(
        ["CUDA_VERSION=v10", "NVIDIA_DISABLE_REQUIRE=true"], error="invalid CUDA version: v10"
    ),
    # NVIDIA_DISABLE_REQUIRE
    "disable_require_true": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DISABLE_REQUIRE=T"],
        devices="0",
        fields={"disable_require": True},
    ),
    "disable_require_unparsable_is_false": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DISABLE_REQUIRE=yes"],
        devices="0",
        fields={"disable_require": False},
    ),
    "disable_require_unset_is_false": Case(
        ["NVIDIA_VISIBLE_DEVICES=0"], devices="0", fields={"disable_require": False}
    ),
    "disable_require_forced_by_config": Case(
        ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DISABLE_REQUIRE=false"],
        config=HookConfig(disable_require=True),
        devices="0",
        fields={"disable_require": True},
    ),
}


@pytest.mark.parametrize("case", list(SEED_BRANCHES.values()), ids=list(SEED_BRANCHES))
def test_seed_branch(case: Case) -> None:
    if case.error is not None:
        with pytest.raises(RequestError) as info:
            _run(case)
        # The seed's text, after the variable and value at fault (and before the fix).
        message = str(info.value)
        assert case.error in message, message
        assert re.match(r"^[A-Z_]+(\s\(legacy image: all GPUs\))?='", message) or message.startswith(
            "CUDA_VERSION (a legacy"
        ), message
        return
    result = _run(case)
    if case.devices is None:
        assert result is None
        return
    assert result is not None
    assert result.devices == case.devices
    for name, expected in case.fields.items():
        assert getattr(result, name) == expected, name


def test_full_request_shape() -> None:
    env = [
        "NVIDIA_VISIBLE_DEVICES=GPU-1",
        "NVIDIA_MIG_CONFIG_DEVICES=all",
        "NVIDIA_MIG_MONITOR_DEVICES=all",
        "NVIDIA_DRIVER_CAPABILITIES=compute,video",
        "NVIDIA_REQUIRE_CUDA=cuda>=12.0",
        "NVIDIA_DISABLE_REQUIRE=1",
    ]
    assert resolve_request(env, [], True) == GpuRequest(
        devices="GPU-1",
        mig_config_devices="all",
        mig_monitor_devices="all",
        driver_capabilities="compute,video",
        requirements=("cuda>=12.0",),
        disable_require=True,
        privileged=True,
    )


# ------------------------------------------------------------------------------------------
# Deviations
# ------------------------------------------------------------------------------------------

SWARM = HookConfig(swarm_resource="DOCKER_RESOURCE_GPU")


def test_deviation_1_swarm_variable_takes_precedence() -> None:
    env = ["DOCKER_RESOURCE_GPU=1", "NVIDIA_VISIBLE_DEVICES=all"]
    result = resolve_request(env, [], True, SWARM)
    assert result is not None and result.devices == "1"
    # order in the environment does not matter
    result = resolve_request(list(reversed(env)), [], True, SWARM)
    assert result is not None and result.devices == "1"


def test_deviation_1_empty_swarm_variable_means_no_gpu() -> None:
    assert resolve_request(["DOCKER_RESOURCE_GPU=", "NVIDIA_VISIBLE_DEVICES=all"], [], True, SWARM) is None


def test_deviation_1_first_present_of_several_swarm_variables_wins() -> None:
    config = HookConfig(swarm_resource=" A_GPU , ,B_GPU ")
    result = resolve_request(["B_GPU=2", "A_GPU=1", "NVIDIA_VISIBLE_DEVICES=0"], [], True, config)
    assert result is not None and result.devices == "1"
    result = resolve_request(["B_GPU=none", "NVIDIA_VISIBLE_DEVICES=0"], [], True, config)
    assert result is not None and result.devices == ""
    result = resolve_request(["NVIDIA_VISIBLE_DEVICES=0"], [], True, config)
    assert result is not None and result.devices == "0"


def test_deviation_1_swarm_variable_subject_to_privilege_check() -> None:
    config = HookConfig(
        swarm_resource="DOCKER_RESOURCE_GPU", accept_envvar_unprivileged=False, fail_unprivileged_envvar=True
    )
    with pytest.raises(RequestError, match="insufficient privileges"):
        resolve_request(["DOCKER_RESOURCE_GPU=1"], [], False, config)


@pytest.mark.parametrize(
    "destination",
    [ROOT + "X/0", ROOT + "-other/1", ROOT + "0"],
)
def test_deviation_2_volume_mount_prefix_needs_path_boundary(destination: str) -> None:
    assert resolve_request([], [Mount("/dev/null", destination)], True, VOL) is None
    # …and such a mount does not hide a real request next to it
    mounts = [Mount("/dev/null", destination), Mount("/dev/null", ROOT + "/7")]
    result = resolve_request([], mounts, True, VOL)
    assert result is not None and result.devices == "7"


def test_deviation_3_entries_without_equals_are_ignored() -> None:
    notes: list[str] = []
    result = resolve_request(["GARBAGE", "NVIDIA_VISIBLE_DEVICES=0", ""], [], True, notes=notes)
    assert result is not None and result.devices == "0"
    assert notes == [
        "ignoring 2 environment entries without '=': 'GARBAGE', '' (containerd drops such entries; "
        "write them as NAME=value)"
    ]
    skipped: list[str] = []
    assert env_map(["A", "B=1", "=x"], skipped) == {"B": "1", "": "x"}
    assert skipped == ["A"]


def test_deviation_3_warning_is_one_bounded_line() -> None:
    """A pod controls how many such entries it has and how long they are: one note per container,
    at most three of them shown, each cut to a prefix with its size."""
    notes: list[str] = []
    env = ["NVIDIA_VISIBLE_DEVICES=0", *(f"{'x' * (1 << 20)}{i}" for i in range(1000))]
    assert resolve_request(env, [], True, notes=notes) is not None
    assert len(notes) == 1 and len(notes[0]) < 500, len(notes[0])
    assert "ignoring 1000 environment entries without '='" in notes[0]
    assert "(1048577 characters in all)" in notes[0] and "and 997 more" in notes[0]


def test_deviation_5_values_over_their_limit_are_refused_before_parsing() -> None:
    huge = " " * 300
    with pytest.raises(RequestError, match=r"^CUDA_VERSION=.* 300 characters long, over .* limit of 256"):
        resolve_request([f"CUDA_VERSION={huge}"], [], True)
    # the seed would have parsed it (and failed with "invalid CUDA version")
    with pytest.raises(RequestError, match="invalid CUDA version"):
        parse_cuda_version(huge)
    assert resolve_request(["NVIDIA_VISIBLE_DEVICES=" + ",".join(["0"] * 8000)], [], True) is not None


def test_deviation_4_unsupported_capability_rejected() -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=compute,profile,utility"]
    with pytest.raises(RequestError) as info:
        resolve_request(env, [], True)
    message = str(info.value)
    assert message.startswith(
        "NVIDIA_DRIVER_CAPABILITIES='compute,profile,utility': "
        "unsupported capabilities found in 'compute,profile,utility' (allowed '"
    )
    assert "'profile'" in message
    assert "compat32,compute,display,graphics,ngx,utility,video" in message


def test_deviation_4_restricted_supported_set() -> None:
    config = HookConfig(supported_driver_capabilities="utility,compute")
    with pytest.raises(RequestError, match="'graphics'"):
        resolve_request(["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=graphics"], [], True, config)
    # "all" and the legacy default resolve to the supported set, in the seed's order
    for env in (["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=all"], ["CUDA_VERSION=12.1"]):
        result = resolve_request(env, [], True, config)
        assert result is not None and result.driver_capabilities == "compute,utility"
    # the default is intersected with the supported set
    compute_only = HookConfig(supported_driver_capabilities="compute")
    result = resolve_request(["NVIDIA_VISIBLE_DEVICES=0"], [], True, compute_only)
    assert result is not None and result.driver_capabilities == "compute"


def test_deviation_4_all_inside_a_list_means_all() -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=compute, all"]
    result = resolve_request(env, [], True)
    assert result is not None and result.driver_capabilities == ALL_DRIVER_CAPABILITIES


def test_deviation_4_supported_all_allows_anything() -> None:
    config = HookConfig(supported_driver_capabilities="all")
    env = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=compute,future"]
    result = resolve_request(env, [], True, config)
    assert result is not None and result.driver_capabilities == "compute,future"


def test_deviation_4_checked_after_mig_and_before_cuda_version() -> None:
    env = ["CUDA_VERSION=bad", "NVIDIA_DRIVER_CAPABILITIES=bogus"]
    with pytest.raises(RequestError, match=r"^NVIDIA_DRIVER_CAPABILITIES=.*: unsupported capabilities"):
        resolve_request(env, [], True)
    with pytest.raises(RequestError, match="MIG_CONFIG"):
        resolve_request([*env, "NVIDIA_MIG_CONFIG_DEVICES=all"], [], False)


# ------------------------------------------------------------------------------------------
# Go library behaviour
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *((v, True) for v in ("1", "t", "T", "TRUE", "true", "True")),
        *((v, False) for v in ("0", "f", "F", "FALSE", "false", "False")),
        *((v, None) for v in ("", "yes", "tRUE", " true", "true ", "2", "on", "y")),
    ],
)
def test_parse_go_bool(value: str, expected: bool | None) -> None:
    assert parse_go_bool(value) is expected


# Produced by the seed's parseCudaVersion compiled with Go 1.19 (None = it panicked).
GO_SSCANF_TABLE: list[tuple[str, tuple[int, int, int] | None]] = [
    ("10.1", (10, 1, 0)),
    ("11.0.3", (11, 0, 3)),
    ("12", (12, 0, 0)),
    (" 9.2 ", (9, 2, 0)),
    ("+1", None),
    ("-1", None),
    ("1_0", None),
    ("10.2\nxyz", (10, 2, 0)),
    ("10\n.2", (10, 0, 0)),
    ("1.2.3.4", None),
    ("4294967295", (4294967295, 0, 0)),
    ("4294967296", None),
    ("10. 2", (10, 2, 0)),
    ("10 .2", None),
    ("\xa010.1", (10, 1, 0)),
    ("\n10", None),
    ("10.1\r\n", (10, 1, 0)),
    ("010.02", (10, 2, 0)),
    ("", None),
    ("10.", None),
    ("10.1 x", None),
    ("0x10", None),
    ("10.1.", None),
    ("\t12.4.1\t", (12, 4, 1)),
    ("12.4.1\n\n", (12, 4, 1)),
    ("12..4", None),
    ("1e3", None),
    ("١٢", None),
    ("99999999999999999999", None),
    ("12.4.4294967296", None),
    ("12 ", (12, 0, 0)),
    ("12\r\n", (12, 0, 0)),
    ("\r\n12", None),
    ("12.-1", None),
    ("12.+1", None),
    ("12.4-rc1", None),
    ("v12.4", None),
    ("12,4", None),
    ("\u300012.4\u3000", (12, 4, 0)),
    ("\u202812", (12, 0, 0)),
    ("12.\n4", None),
]


@pytest.mark.parametrize(("value", "expected"), GO_SSCANF_TABLE, ids=[repr(v) for v, _ in GO_SSCANF_TABLE])
def test_parse_cuda_version_matches_go_sscanf(value: str, expected: tuple[int, int, int] | None) -> None:
    if expected is None:
        with pytest.raises(RequestError) as info:
            parse_cuda_version(value)
        assert str(info.value) == f"invalid CUDA version: {value}"
    else:
        assert parse_cuda_version(value) == expected


def test_legacy_requirement_uses_sscanf_result() -> None:
    result = resolve_request(["CUDA_VERSION= 10. 2\ngarbage"], [], True)
    assert result is not None and result.requirements == ("cuda>=10.2",)


# Produced by Go's path/filepath.Clean.
@pytest.mark.parametrize(
    ("path", "cleaned"),
    [
        ("", "."),
        ("/", "/"),
        ("//", "/"),
        ("//a//b/", "/a/b"),
        ("/../..", "/"),
        ("/a/../../b", "/b"),
        ("a/..", "."),
        ("../a/..", ".."),
        ("a/../../b", "../b"),
        ("./", "."),
        ("/./a/./", "/a"),
        ("..", ".."),
        ("/dev/null/", "/dev/null"),
    ],
)
def test_go_clean_path(path: str, cleaned: str) -> None:
    assert go_clean_path(path) == cleaned


# ------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------

KEYS = st.sampled_from(
    [
        "NVIDIA_VISIBLE_DEVICES",
        "CUDA_VERSION",
        "NVIDIA_REQUIRE_CUDA",
        "NVIDIA_REQUIRE_X",
        "NVIDIA_DISABLE_REQUIRE",
        "NVIDIA_MIG_CONFIG_DEVICES",
        "NVIDIA_MIG_MONITOR_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "DOCKER_RESOURCE_GPU",
        "",
    ]
) | st.text(max_size=8)
VALUES = st.sampled_from(
    ["", "all", "none", "void", "0", "10.1", "compute", "utility,compute", "1"]
) | st.text(max_size=12)
ENTRY = st.one_of(st.builds(lambda k, v: f"{k}={v}", KEYS, VALUES), st.text(max_size=10))
PATHS = st.sampled_from(["/dev/null", "/dev//null", ROOT, ROOT + "/0", ROOT + "X/1", ""]) | st.text(
    max_size=12
)
MOUNTS = st.lists(st.builds(Mount, PATHS, PATHS), max_size=3)
CONFIGS = st.builds(
    HookConfig,
    accept_envvar_unprivileged=st.booleans(),
    accept_volume_mounts=st.booleans(),
    swarm_resource=st.sampled_from(["", "DOCKER_RESOURCE_GPU", "A,DOCKER_RESOURCE_GPU"])
    | st.text(max_size=6),
    supported_driver_capabilities=st.sampled_from(
        ["compat32,compute,display,graphics,ngx,utility,video", "all", "compute", ""]
    ),
    disable_require=st.booleans(),
)


@settings(max_examples=400, deadline=None)
@given(env=st.lists(ENTRY, max_size=8), mounts=MOUNTS, privileged=st.booleans(), config=CONFIGS)
def test_only_request_errors_escape(
    env: list[str], mounts: list[Mount], privileged: bool, config: HookConfig
) -> None:
    try:
        result = resolve_request(env, mounts, privileged, config)
    except RequestError as exc:
        assert str(exc)
        return
    if result is not None:
        assert isinstance(result.devices, str)
        assert all(isinstance(r, str) for r in result.requirements)
        assert "all" not in result.driver_capabilities.split(",")


@settings(max_examples=300, deadline=None)
@given(
    entries=st.dictionaries(KEYS, VALUES, max_size=8),
    privileged=st.booleans(),
    config=CONFIGS,
    data=st.data(),
)
def test_result_is_independent_of_env_order_with_unique_keys(
    entries: dict[str, str], privileged: bool, config: HookConfig, data: st.DataObject
) -> None:
    env = [f"{k}={v}" for k, v in entries.items()]
    permuted = data.draw(st.permutations(env))

    def outcome(e: list[str]) -> object:
        try:
            return resolve_request(e, [], privileged, config)
        except RequestError as exc:
            return ("error", str(exc))

    assert outcome(env) == outcome(list(permuted))


# Go fmt's isSpace, newline excluded (a newline before the first number fails the scan).
GO_SPACES = "".join(
    chr(c)
    for lo, hi in (
        (0x9, 0xD),
        (0x20, 0x20),
        (0x85, 0x85),
        (0xA0, 0xA0),
        (0x1680, 0x1680),
        (0x2000, 0x200A),
        (0x2028, 0x2029),
        (0x202F, 0x202F),
        (0x205F, 0x205F),
        (0x3000, 0x3000),
    )
    for c in range(lo, hi + 1)
    if c != 0xA
)


@settings(max_examples=500, deadline=None)
@given(
    st.text(alphabet=st.sampled_from("0123456789. \n\t\r+-_x\u00a0\u2028"), max_size=12) | st.text(max_size=8)
)
def test_parse_cuda_version_total(value: str) -> None:
    try:
        major, minor, patch = parse_cuda_version(value)
    except RequestError as exc:
        assert str(exc) == f"invalid CUDA version: {value}"
        return
    assert all(0 <= n <= 0xFFFFFFFF for n in (major, minor, patch))
    assert value.lstrip(GO_SPACES)[:1] in set("0123456789")


def test_parse_cuda_version_huge_numbers_follow_go_not_python_int_limits() -> None:
    """Go's ParseUint has no digit limit: leading zeros are fine, >32-bit values fail the scan.
    Python's int() refuses strings over 4300 digits with ValueError; that must not leak out."""
    zeros = "0" * 5000
    assert parse_cuda_version(f"{zeros}12.{zeros}4") == (12, 4, 0)
    huge = "1" * 5000
    with pytest.raises(RequestError) as info:
        parse_cuda_version(huge)
    assert str(info.value) == f"invalid CUDA version: {huge}"
    with pytest.raises(RequestError):
        parse_cuda_version(f"12.4.{huge}")  # like "12.4.4294967296": every format fails
    # Through the request, such a value is over the CUDA_VERSION limit (issue 12: bounded work).
    request = resolve_request([f"CUDA_VERSION={'0' * 100}11.{'0' * 100}8"], [], True)
    assert request is not None and request.requirements == ("cuda>=11.8",)
    with pytest.raises(RequestError, match=r"CUDA_VERSION='0000.*over the NVIDIA NRI plugin's limit of 256"):
        resolve_request([f"CUDA_VERSION={zeros}11.{zeros}8"], [], True)

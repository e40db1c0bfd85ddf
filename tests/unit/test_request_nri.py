"""NRI Container → the hook's inputs, and the privileged derivation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from nri_plugin.errors import RequestError
from nri_plugin.request.model import Mount
from nri_plugin.request.nri import is_allow_all_rule, is_privileged, request_inputs
from nri_plugin.request.resolve import resolve_request
from nri_plugin.wire._gen import api_pb2


def rule(
    allow: bool = True,
    type_: str = "",
    major: int | None = None,
    minor: int | None = None,
    access: str = "rwm",
) -> api_pb2.LinuxDeviceCgroup:
    r = api_pb2.LinuxDeviceCgroup(allow=allow, type=type_, access=access)
    if major is not None:
        r.major.value = major
    if minor is not None:
        r.minor.value = minor
    return r


def container(
    *rules: api_pb2.LinuxDeviceCgroup,
    env: list[str] | None = None,
    mounts: list[tuple[str, str]] | None = None,
) -> api_pb2.Container:
    c = api_pb2.Container(id="c1", env=env or [])
    for source, destination in mounts or []:
        c.mounts.append(api_pb2.Mount(source=source, destination=destination, type="bind", options=["rbind"]))
    c.linux.resources.devices.extend(rules)
    return c


# What containerd's CRI puts into linux.resources.devices.
PRIVILEGED_CRI = [rule()]
UNPRIVILEGED_CRI = [
    rule(allow=False),
    rule(type_="c", major=1, minor=3, access="rwm"),  # /dev/null
    rule(type_="c", major=5, minor=0, access="rwm"),  # /dev/tty
    rule(type_="c", major=136, access="rwm"),  # /dev/pts/*
]


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param(PRIVILEGED_CRI, True, id="cri_privileged_allow_all"),
        pytest.param(UNPRIVILEGED_CRI, False, id="cri_default_deny_then_specific_allows"),
        pytest.param([], False, id="no_rules"),
        pytest.param([rule(type_="a")], True, id="type_a"),
        pytest.param([rule(access="mwr")], True, id="access_any_order"),
        pytest.param([rule(major=-1, minor=-1)], True, id="runc_wildcard_minus_one"),
        pytest.param([rule(allow=False), rule()], True, id="deny_all_then_allow_all"),
        pytest.param([*UNPRIVILEGED_CRI, rule()], True, id="allow_all_last"),
        pytest.param([rule(), rule(allow=False)], False, id="allow_all_then_deny_all"),
        pytest.param(
            [rule(), rule(allow=False, type_="c", major=195)], False, id="allow_all_then_specific_deny"
        ),
        pytest.param([rule(access="rw")], False, id="allow_all_without_mknod"),
        pytest.param([rule(access="")], False, id="allow_all_empty_access"),
        pytest.param([rule(type_="c")], False, id="char_devices_only"),
        pytest.param([rule(major=0)], False, id="major_zero_is_not_a_wildcard"),
        pytest.param([rule(minor=0)], False, id="minor_zero_is_not_a_wildcard"),
        pytest.param([rule(allow=False, access="rwm")], False, id="deny_all_only"),
    ],
)
def test_is_privileged(rules: list[api_pb2.LinuxDeviceCgroup], expected: bool) -> None:
    assert is_privileged(container(*rules)) is expected


def test_missing_linux_or_resources_is_unprivileged() -> None:
    assert is_privileged(api_pb2.Container(id="x")) is False
    c = api_pb2.Container(id="x")
    c.linux.cgroups_path = "/kubepods/x"
    assert is_privileged(c) is False


def test_host_devices_alone_do_not_make_privileged() -> None:
    c = container(*UNPRIVILEGED_CRI)
    c.linux.devices.append(api_pb2.LinuxDevice(path="/dev/nvidia0", type="c", major=195, minor=0))
    assert is_privileged(c) is False


def test_user_field_does_not_make_privileged() -> None:
    c = container(*UNPRIVILEGED_CRI)
    c.user.uid = 0
    assert is_privileged(c) is False


def test_rule_from_the_wire_roundtrip() -> None:
    wire = container(*PRIVILEGED_CRI).SerializeToString()
    assert is_privileged(api_pb2.Container.FromString(wire)) is True


def test_duck_typed_objects() -> None:
    allow_all = SimpleNamespace(allow=True, type="a", major=None, minor=None, access="rwm")
    with_major = SimpleNamespace(
        allow=True, type="a", major=SimpleNamespace(value=195), minor=None, access="rwm"
    )
    assert is_allow_all_rule(allow_all) is True
    assert is_allow_all_rule(with_major) is False
    obj = SimpleNamespace(
        env=["A=1"],
        mounts=[SimpleNamespace(source="/dev/null", destination="/x")],
        linux=SimpleNamespace(resources=SimpleNamespace(devices=[allow_all])),
    )
    assert request_inputs(obj) == (["A=1"], [Mount("/dev/null", "/x")], True)
    assert request_inputs(SimpleNamespace(env=None, mounts=None, linux=None)) == ([], [], False)


def test_request_inputs_keeps_env_order_and_mounts() -> None:
    c = container(
        *UNPRIVILEGED_CRI,
        env=["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1"],
        mounts=[("/dev/null", "/var/run/nvidia-container-devices/GPU-1"), ("/data", "/data")],
    )
    env, mounts, privileged = request_inputs(c)
    assert env == ["PATH=/bin", "NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_VISIBLE_DEVICES=1"]
    assert mounts == [Mount("/dev/null", "/var/run/nvidia-container-devices/GPU-1"), Mount("/data", "/data")]
    assert privileged is False


def test_end_to_end_privileged_mig_request() -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=all", "NVIDIA_MIG_CONFIG_DEVICES=all"]
    result = resolve_request(*request_inputs(container(*PRIVILEGED_CRI, env=env)))
    assert result is not None and result.mig_config_devices == "all"
    with pytest.raises(RequestError, match="MIG_CONFIG_DEVICES"):
        resolve_request(*request_inputs(container(*UNPRIVILEGED_CRI, env=env)))

"""Fuzzing NRI container -> adjustment with hypothesis.

Arbitrary ``api.Container`` messages -- env lists mixing every variable the hook reads (with
plausible, borderline and random values) with noise, mounts (also under the device-list volume
root), Linux devices and device cgroup rules (privileged or not), annotations, labels -- go
through ``request_inputs`` + ``decide`` over a fake host snapshot (4 GPUs, one in MIG mode with two
MIG devices) or no driver at all, under varied toolkit settings. Allowed outcomes: a ``Decision``
or a ``ContainerError`` with a message; anything else is a bug.

The same containers go through ``GpuPlugin.create_container``, the exact hot-path function: it
must answer a ``CreateContainerResponse`` or raise a ``ContainerError`` that is *not* the
``InternalError`` it wraps unexpected exceptions in, and its answer must be exactly what
``decide`` + ``to_proto`` say for the same inputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from nri_plugin import config as cfg
from nri_plugin import logs
from nri_plugin.adjust.pipeline import Decision, decide
from nri_plugin.adjust.proto import to_proto
from nri_plugin.errors import ContainerError
from nri_plugin.host.discover import discover
from nri_plugin.host.driver import HostDriver
from nri_plugin.host.model import DriverSnapshot
from nri_plugin.plugin import GpuPlugin, InternalError
from nri_plugin.request.model import DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT, HookConfig
from nri_plugin.request.nri import container_annotations, device_paths, request_inputs
from nri_plugin.wire._gen import api_pb2 as api
from tests.fakehost import FakeHost, FakeMig, build_fake_host, make_gpus, root_flags

EXAMPLES = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MIG_UUIDS = ("MIG-0a0a0a0a-1111-2222-3333-444444444444", "MIG-0b0b0b0b-1111-2222-3333-444444444444")


# --- the host -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    gpus = make_gpus(4)
    gpus[2].mig = [FakeMig(gi=1, ci=0, uuid=MIG_UUIDS[0]), FakeMig(gi=2, ci=0, uuid=MIG_UUIDS[1])]
    return build_fake_host(Path(tmp_path_factory.mktemp("fuzzhost")) / "root", gpus=gpus)


@pytest.fixture(scope="module")
def snapshot(host: FakeHost) -> DriverSnapshot:
    snap = discover(host.roots)
    assert snap is not None and len(snap.gpus) == 4
    assert sum(len(g.mig_devices) for g in snap.gpus) == 2
    return snap


# --- strategies -----------------------------------------------------------------------------------

GPU_UUIDS = tuple(g.uuid for g in make_gpus(4))
device_ids = st.sampled_from(
    ["all", "none", "void", "", "0", "1", "2", "3", "4", "99", "-1", " 0 ", "0:0", "2:0", "2:1", "2:7",
     "0:0:0", *GPU_UUIDS, GPU_UUIDS[0][:12], *MIG_UUIDS, "MIG-GPU-x/1/0", "GPU-", "MIG-",
     DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT, "nvidia0", "GPU-00000000-1111-2222-3333-000000000000,1"]
)  # fmt: skip
device_lists = st.one_of(
    device_ids, st.lists(device_ids, min_size=1, max_size=4).map(",".join), st.text(max_size=20)
)
CAPS = ["compute", "compat32", "graphics", "utility", "video", "display", "ngx", "all"]
valid_caps = st.lists(st.sampled_from(CAPS), max_size=4).map(",".join)
capabilities = st.one_of(
    valid_caps,
    valid_caps,
    valid_caps,
    st.sampled_from(["", "COMPUTE", " compute", "x", ","]),
    st.text(max_size=20),
)
requirements = st.one_of(
    st.sampled_from(
        ["cuda>=12.0", "cuda>=99.0", "cuda<12", "driver>=500", "driver>=999.1", "arch=9.0", "arch>=8.0",
         "arch=7.5 arch=9.0", "brand=tesla", "brand=geforce,driver>=400", "cuda>=11 brand=tesla",
         "cuda", ">=", "cuda>=abc", "unknown=1", "cuda>=12.0 , driver>=1", ""]
    ),
    st.text(max_size=30),
)  # fmt: skip
bools = st.one_of(st.sampled_from(["true", "false", "1", "0", "True", "yes", ""]), st.text(max_size=6))
cuda_versions = st.one_of(
    st.sampled_from(["12.4", "10.0", "9", "12.4.1", "12.0"]), st.sampled_from(["x", ""]), st.text(max_size=8)
)


def entry(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return values.map(lambda v: f"{name}={v}")


visible_devices = entry("NVIDIA_VISIBLE_DEVICES", device_lists)
gpu_entries = st.one_of(
    visible_devices,
    visible_devices,
    entry("NVIDIA_DRIVER_CAPABILITIES", capabilities),
    st.tuples(st.sampled_from(["CUDA", "DRIVER", "ARCH", "X", "", "CUDA_1"]), requirements).map(
        lambda kv: f"NVIDIA_REQUIRE_{kv[0]}={kv[1]}"
    ),
    entry("NVIDIA_DISABLE_REQUIRE", bools),
    entry("CUDA_VERSION", cuda_versions),
    entry("DOCKER_RESOURCE_GPU", device_lists),
)
rare_entries = st.one_of(
    entry("NVIDIA_MIG_CONFIG_DEVICES", device_lists),
    entry("NVIDIA_MIG_MONITOR_DEVICES", device_lists),
    st.sampled_from(["NVIDIA_VISIBLE_DEVICES", "=", "", "=all", "NVIDIA_VISIBLE_DEVICES==0"]),
    st.text(max_size=30),
)


@st.composite
def env_lists(draw: st.DrawFn) -> list[str]:
    """Mostly GPU variables (duplicates included) among ordinary entries; sometimes odd ones."""
    env = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOSTNAME=fuzz"]
    if draw(st.integers(0, 3)) != 0:
        env.append(draw(visible_devices))
    env += draw(st.lists(gpu_entries, max_size=4))
    if draw(st.integers(0, 3)) == 0:
        env += draw(st.lists(rare_entries, min_size=1, max_size=2))
    return draw(st.permutations(env))


ODD_DESTINATIONS = ["/etc/hosts", "/dev/shm", DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT, ""]
ODD_DESTINATIONS += ["/var/run/x/../nvidia-container-devices/0", "/var/run/nvidia-container-devices"]
mount_destinations = st.one_of(
    st.builds(lambda d: f"{DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT}/{d}", device_ids),
    st.sampled_from(ODD_DESTINATIONS),
    st.text(max_size=40),
)
mounts = st.builds(
    api.Mount,
    destination=mount_destinations,
    source=st.one_of(st.sampled_from(["/dev/null", "tmpfs", ""]), st.text(max_size=20)),
    type=st.sampled_from(["bind", "tmpfs", ""]),
    options=st.lists(st.sampled_from(["rbind", "ro", "nosuid", "rw"]), max_size=3),
)
optional_i64 = st.one_of(st.none(), st.sampled_from([-1, 0, 1, 195, 255]), st.integers(-(2**63), 2**63 - 1))


@st.composite
def cgroup_rules(draw: st.DrawFn) -> api.LinuxDeviceCgroup:
    rule = api.LinuxDeviceCgroup(
        allow=draw(st.booleans()),
        type=draw(st.sampled_from(["", "a", "c", "b", "u", "zz"])),
        access=draw(st.one_of(st.sampled_from(["rwm", "rw", "r", "", "mwr"]), st.text(max_size=4))),
    )
    for field in ("major", "minor"):
        value = draw(optional_i64)
        if value is not None:
            getattr(rule, field).value = value
    return rule


linux_devices = st.builds(
    api.LinuxDevice,
    path=st.one_of(st.sampled_from(["/dev/nvidia0", "/dev/fuse", ""]), st.text(max_size=20)),
    type=st.sampled_from(["c", "b", "u", "p", ""]),
    major=st.integers(-(2**63), 2**63 - 1),
    minor=st.integers(-(2**63), 2**63 - 1),
)
PRIVILEGED_RULES = [api.LinuxDeviceCgroup(allow=True, access="rwm")]
text_maps = st.dictionaries(st.text(max_size=15), st.text(max_size=30), max_size=4)


@st.composite
def containers(draw: st.DrawFn) -> api.Container:
    c = api.Container(
        id=draw(st.text(max_size=20)),
        pod_sandbox_id=draw(st.text(max_size=10)),
        name=draw(st.text(max_size=20)),
        env=draw(env_lists()),
        mounts=draw(st.lists(mounts, max_size=4)),
        annotations=draw(text_maps),
        labels=draw(text_maps),
        args=draw(st.lists(st.text(max_size=10), max_size=3)),
    )
    shape = draw(st.sampled_from(["no-linux", "empty-linux", "rules", "privileged"]))
    if shape != "no-linux":
        c.linux.SetInParent()
        c.linux.devices.extend(draw(st.lists(linux_devices, max_size=3)))
        if shape == "privileged":
            c.linux.resources.devices.extend(PRIVILEGED_RULES)
        if shape in ("rules", "privileged"):
            c.linux.resources.devices.extend(draw(st.lists(cgroup_rules(), max_size=4)))
        if draw(st.booleans()):
            c.linux.resources.memory.limit.value = draw(st.integers(0, 2**40))
    return c


any_hook_config = st.builds(
    HookConfig,
    accept_envvar_unprivileged=st.booleans(),
    accept_volume_mounts=st.booleans(),
    swarm_resource=st.sampled_from(
        ["", "DOCKER_RESOURCE_GPU", "DOCKER_RESOURCE_GPU, NVIDIA_VISIBLE_DEVICES", ","]
    ),
    supported_driver_capabilities=st.sampled_from(
        ["compat32,compute,display,graphics,ngx,utility,video", "utility,compute", "utility", "", "all"]
    ),
    disable_require=st.booleans(),
)  # fmt: skip
hook_configs = st.one_of(st.just(HookConfig()), any_hook_config)  # the default: half the time


# --- request_inputs + decide --------------------------------------------------------------------


def outcome(
    container: api.Container, config: HookConfig, snap: DriverSnapshot | None, *, pending: bool = False
) -> Decision | ContainerError:
    env, mount_list, privileged = request_inputs(container)
    try:
        return decide(
            env,
            mount_list,
            privileged,
            config,
            snap,
            discovery_pending=pending,
            annotations=container_annotations(container),
            device_paths=device_paths(container),
        )
    except ContainerError as exc:
        return exc


def kind(result: Decision | ContainerError | api.CreateContainerResponse) -> str:
    """The outcome class, for ``--hypothesis-show-statistics``."""
    if isinstance(result, ContainerError):
        return type(result).__name__
    if isinstance(result, api.CreateContainerResponse):
        return "adjusted" if result.HasField("adjust") else "not a GPU container"
    return "not a GPU container" if result.request is None else "adjusted"


def check_decision(result: Decision | ContainerError, snap: DriverSnapshot | None) -> None:
    event(kind(result))
    if isinstance(result, ContainerError):
        assert str(result).strip(), f"{type(result).__name__} without a message"
        return
    if result.request is None or result.left_alone:  # (left alone: GPUs given elsewhere)
        assert not result.adjustment.devices and not result.adjustment.mounts
        return
    assert snap is not None, "a GPU decision without a driver snapshot"
    roots = snap.roots
    host_dirs = tuple(r.rstrip("/") + "/" for r in (roots.driver_root, roots.dev_root, roots.run_root))
    discovered = {*snap.device_nodes.values(), *(i for items in snap.artefacts.values() for i in items)}
    for dev in result.adjustment.devices:
        # Device nodes and mount sources come from host discovery, never from the container.
        assert dev in discovered and dev.host_path.startswith(host_dirs), dev
        assert dev.type == "c" and dev.major >= 0 and dev.minor >= 0, dev
    for mount in result.adjustment.mounts:
        assert mount.source.startswith(host_dirs) and mount.destination.startswith("/"), mount
    assert len({d.path for d in result.adjustment.devices}) == len(result.adjustment.devices)
    assert api.ContainerAdjustment.FromString(to_proto(result.adjustment).SerializeToString())


@EXAMPLES
@given(container=containers(), config=hook_configs, with_driver=st.booleans())
def test_decide_gives_a_decision_or_a_container_error(
    container: api.Container, config: HookConfig, with_driver: bool, snapshot: DriverSnapshot
) -> None:
    snap = snapshot if with_driver else None
    first = outcome(container, config, snap)
    check_decision(first, snap)
    # Pure: the same inputs give the same outcome.
    again = outcome(container, config, snap)
    if isinstance(first, ContainerError):
        assert type(again) is type(first) and str(again) == str(first)
    else:
        assert again == first


@st.composite
def mutated_container_bytes(draw: st.DrawFn) -> bytes:
    """A serialized container with a few bytes flipped, inserted or deleted."""
    buf = bytearray(draw(containers()).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(buf)))
        op = draw(st.sampled_from(["flip", "insert", "delete"]))
        if op == "insert" or not buf:
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "flip":
            buf[min(pos, len(buf) - 1)] ^= 1 << draw(st.integers(0, 7))
        else:
            del buf[pos : pos + draw(st.integers(1, 4))]
    return bytes(buf)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(data=mutated_container_bytes(), config=hook_configs)
def test_decide_on_containers_decoded_from_mutated_bytes(
    data: bytes, config: HookConfig, snapshot: DriverSnapshot
) -> None:
    """Whatever still decodes as a Container (odd strings, unknown fields) is handled."""
    try:
        container = api.Container.FromString(data)
    except DecodeError:
        assume(False)
        return
    check_decision(outcome(container, config, snapshot), snapshot)


# --- GpuPlugin.create_container -------------------------------------------------------------------


def host_layer(host: FakeHost, **extra: object) -> cfg.Layer:
    values: dict[str, object | None] = {
        **root_flags(host.root),
        "nri-plugin.container-ldcache": "off",  # the exact pipeline adjustment is compared
    }
    values.update(extra)
    return cfg.layer_from_flags(values)


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="module")
def plugins(host: FakeHost) -> dict[str, GpuPlugin]:
    """Daemons as ``run`` builds them: default settings, and non-default toolkit keys."""
    layers = {
        "default": host_layer(host),
        "strict": host_layer(
            host,
            **{
                "accept-nvidia-visible-devices-as-volume-mounts": True,
                "accept-nvidia-visible-devices-envvar-when-unprivileged": False,
                "swarm-resource": "DOCKER_RESOURCE_GPU",
                "supported-driver-capabilities": "utility,compute,video",
            },
        ),
    }
    out: dict[str, GpuPlugin] = {}
    for name, layer in layers.items():
        plugin = GpuPlugin(file_layer=cfg.Layer("fuzz"), flag_layer=layer, logger=logs.null_logger())
        plugin.driver.refresh()
        assert plugin.driver.snapshot() is not None, plugin.driver.last_error
        out[name] = plugin
    driverless = GpuPlugin(
        file_layer=cfg.Layer("fuzz"),
        flag_layer=host_layer(host),
        logger=logs.null_logger(),
        driver=HostDriver(host.roots),  # never refreshed: no snapshot, as before discovery finishes
    )
    out["driverless"] = driverless
    return out


pods = st.builds(
    api.PodSandbox,
    id=st.text(max_size=10),
    name=st.text(max_size=10),
    namespace=st.text(max_size=10),
    annotations=text_maps,
)


@EXAMPLES
@given(pod=pods, container=containers(), which=st.sampled_from(["default", "strict", "driverless"]))
def test_create_container_answers_or_fails_that_container(
    pod: api.PodSandbox,
    container: api.Container,
    which: str,
    plugins: dict[str, GpuPlugin],
    runner: asyncio.Runner,
) -> None:
    plugin = plugins[which]
    try:
        response: api.CreateContainerResponse | ContainerError = runner.run(
            plugin.create_container(pod, container)
        )
    except InternalError as exc:
        raise AssertionError(f"unexpected exception on the hot path: {exc}") from exc
    except ContainerError as exc:
        response = exc
    event(f"{which}: {kind(response)}")
    expected = outcome(
        container, plugin.settings.hook, plugin.driver.snapshot(), pending=plugin.driver.pending
    )
    if isinstance(expected, ContainerError):
        assert isinstance(response, ContainerError), response
        assert (type(response), str(response)) == (type(expected), str(expected))
        return
    assert isinstance(response, api.CreateContainerResponse), response
    if expected.request is None or expected.left_alone:
        assert response == api.CreateContainerResponse()
    else:
        assert response.adjust == to_proto(expected.adjustment)
    assert api.CreateContainerResponse.FromString(response.SerializeToString()) == response

"""to_proto: the Adjustment on the wire, decoded back to the same values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nri_plugin.adjust.model import EMPTY_ADJUSTMENT, IPC_BIND_OPTIONS, Adjustment, HookEdit, MountEdit
from nri_plugin.adjust.proto import build_message, to_proto
from nri_plugin.host.model import DeviceNode
from nri_plugin.wire._gen import api_pb2

ADJ = Adjustment(
    devices=(
        DeviceNode("/dev/nvidiactl", "/r/dev/nvidiactl", "c", 195, 255, 0o666, 0, 0),
        DeviceNode(
            "/dev/nvidia-caps/nvidia-cap1", "/r/dev/nvidia-caps/nvidia-cap1", "c", 235, 1, 0o400, 0, 44
        ),
    ),
    mounts=(
        MountEdit("/r/usr/lib/libcuda.so.550.54.14", "/usr/lib64/libcuda.so.1"),
        MountEdit("/r/run/nvidia-persistenced/socket", "/run/nvidia-persistenced/socket", IPC_BIND_OPTIONS),
    ),
    env=(("A", "1"), ("B", "")),
    create_container_hooks=(
        HookEdit("/usr/bin/h", ("h", "--x"), ("PATH=/usr/bin",), timeout=5),
        HookEdit("/usr/bin/g", (), ("X=1",)),
    ),
)


def _decode(adj: Adjustment) -> api_pb2.ContainerAdjustment:
    data = to_proto(adj).SerializeToString(deterministic=True)
    return api_pb2.ContainerAdjustment.FromString(data)


def _values(msg: api_pb2.ContainerAdjustment) -> Adjustment:
    devices = []
    for d in msg.linux.devices:
        assert d.HasField("file_mode") and d.HasField("uid") and d.HasField("gid")
        devices.append((d.path, d.type, d.major, d.minor, d.file_mode.value, d.uid.value, d.gid.value))
    return Adjustment(
        devices=tuple(
            DeviceNode(path, "", type_, major, minor, mode, uid, gid)
            for path, type_, major, minor, mode, uid, gid in devices
        ),
        mounts=tuple(MountEdit(m.source, m.destination, tuple(m.options), m.type) for m in msg.mounts),
        env=tuple((kv.key, kv.value) for kv in msg.env),
        create_container_hooks=tuple(
            HookEdit(h.path, tuple(h.args), tuple(h.env), h.timeout.value if h.HasField("timeout") else None)
            for h in msg.hooks.create_container
        ),
    )


def _without_host_paths(adj: Adjustment) -> Adjustment:
    return Adjustment(
        devices=tuple(
            DeviceNode(d.path, "", d.type, d.major, d.minor, d.file_mode, d.uid, d.gid) for d in adj.devices
        ),
        mounts=adj.mounts,
        env=adj.env,
        create_container_hooks=adj.create_container_hooks,
    )


def test_round_trip() -> None:
    msg = _decode(ADJ)
    assert _values(msg) == _without_host_paths(ADJ)
    assert msg.mounts[0].type == "bind"
    assert list(msg.mounts[0].options) == ["ro", "nosuid", "nodev", "rbind", "rprivate"]
    # uid 0 is still sent (a present wrapper holding 0 means "set")
    assert msg.linux.devices[0].HasField("uid") and msg.linux.devices[0].uid.value == 0
    assert not msg.hooks.prestart and not msg.hooks.start_container
    assert list(msg.hooks.create_container[1].env) == ["X=1"]


def test_memoized_message_is_a_fresh_copy_each_time() -> None:
    first = to_proto(ADJ)
    assert first == build_message(ADJ)
    first.mounts[0].destination = "/changed"
    first.linux.devices.add(path="/dev/extra")
    second = to_proto(ADJ)
    assert second is not first
    assert second == build_message(ADJ)
    assert second.mounts[0].destination == "/usr/lib64/libcuda.so.1"


def test_file_mode_never_carries_type_bits() -> None:
    node = DeviceNode("/dev/nvidia0", "/dev/nvidia0", "c", 195, 0, 0o20666, 0, 0)  # S_IFCHR | 0666
    msg = _decode(Adjustment(devices=(node,)))
    assert msg.linux.devices[0].file_mode.value == 0o666


def test_empty_adjustment_is_empty_message() -> None:
    msg = to_proto(EMPTY_ADJUSTMENT)
    assert msg.SerializeToString() == b""
    assert not msg.HasField("linux") and not msg.HasField("hooks")


def test_field_numbers_on_the_wire() -> None:
    # ContainerAdjustment.mounts = 3, env = 4, hooks = 5, linux = 6; LinuxContainerAdjustment.devices = 1
    only_mount = to_proto(Adjustment(mounts=(MountEdit("/a", "/b"),))).SerializeToString()
    assert only_mount[0] == (3 << 3) | 2
    only_env = to_proto(Adjustment(env=(("K", "V"),))).SerializeToString()
    assert only_env == bytes([(4 << 3) | 2, 6, 0x0A, 1, ord("K"), 0x12, 1, ord("V")])
    only_dev = to_proto(Adjustment(devices=ADJ.devices[:1])).SerializeToString()
    assert only_dev[0] == (6 << 3) | 2 and only_dev[2] == (1 << 3) | 2
    only_hook = to_proto(
        Adjustment(create_container_hooks=ADJ.create_container_hooks[1:])
    ).SerializeToString()
    assert only_hook[0] == (5 << 3) | 2 and only_hook[2] == (3 << 3) | 2


_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)


@given(
    st.lists(
        st.tuples(_text, st.sampled_from("cb"), st.integers(0, 2**31), st.integers(0, 2**20),
                  st.integers(0, 0o177777), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
        max_size=4,
    ),
    st.lists(st.tuples(_text, _text, st.lists(_text, max_size=3)), max_size=4),
    st.lists(st.tuples(_text, _text), max_size=4),
)  # fmt: skip
def test_round_trip_any(
    devices: list[tuple[str, str, int, int, int, int, int]],
    mounts: list[tuple[str, str, list[str]]],
    env: list[tuple[str, str]],
) -> None:
    adj = Adjustment(
        devices=tuple(DeviceNode(p, "", t, ma, mi, mode, u, g) for p, t, ma, mi, mode, u, g in devices),
        mounts=tuple(MountEdit(s, d, tuple(o)) for s, d, o in mounts),
        env=tuple(env),
    )
    expected = Adjustment(
        devices=tuple(
            DeviceNode(d.path, "", d.type, d.major, d.minor, d.file_mode & 0o7777, d.uid, d.gid)
            for d in adj.devices
        ),
        mounts=adj.mounts,
        env=adj.env,
    )
    assert _values(_decode(adj)) == expected

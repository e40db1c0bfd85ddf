"""``Adjustment`` (plain values) -> NRI protobuf ``ContainerAdjustment``.

Devices become ``linux.devices`` entries with explicit type/major/minor, ``file_mode`` holding only
the permission bits (``mode & 0o7777``; containerd fills it the same way, never with S_IFCHR) and
uid/gid wrappers. containerd turns each device into a spec device *and* a device-cgroup allow rule
(``rw`` for char devices), which is what keeps GPUs usable across ``systemctl daemon-reload``.
Mounts are ``bind`` mounts with their options; env pairs become ``KeyValue``; hooks go to
``hooks.create_container`` with their explicit ``env``.

Building the message costs ~70 µs for an 8-GPU adjustment, copying a finished one ~4 µs: the hot
path does not call :func:`to_proto` but copies the message its cached ``build.Plan`` holds.
"""

from __future__ import annotations

from nri_plugin.adjust.model import Adjustment
from nri_plugin.wire import api as api_pb2


def to_proto(adj: Adjustment) -> api_pb2.ContainerAdjustment:
    """A new ``ContainerAdjustment`` message for ``adj`` (the caller owns it and may modify it)."""
    return build_message(adj)


def build_message(adj: Adjustment) -> api_pb2.ContainerAdjustment:
    """Build the message from scratch (``to_proto`` without the memo)."""
    msg = api_pb2.ContainerAdjustment()
    if adj.devices:
        msg.linux.devices.extend(
            api_pb2.LinuxDevice(
                path=node.path,
                type=node.type,
                major=node.major,
                minor=node.minor,
                file_mode=api_pb2.OptionalFileMode(value=node.file_mode & 0o7777),
                uid=api_pb2.OptionalUInt32(value=node.uid),
                gid=api_pb2.OptionalUInt32(value=node.gid),
            )
            for node in adj.devices
        )
    if adj.mounts:
        msg.mounts.extend(
            api_pb2.Mount(destination=m.destination, type=m.type, source=m.source, options=m.options)
            for m in adj.mounts
        )
    if adj.env:
        msg.env.extend(api_pb2.KeyValue(key=key, value=value) for key, value in adj.env)
    for hook in adj.create_container_hooks:
        timeout = None if hook.timeout is None else api_pb2.OptionalInt(value=hook.timeout)
        msg.hooks.create_container.append(
            api_pb2.Hook(path=hook.path, args=hook.args, env=hook.env, timeout=timeout)
        )
    return msg

"""The adjustment as plain values, before it becomes a protobuf ``ContainerAdjustment``."""

from __future__ import annotations

from dataclasses import dataclass

from nri_plugin.host import DeviceNode

# Bind-mount options for driver files (read-only) and for IPC sockets/dirs (writable).
RO_BIND_OPTIONS = ("ro", "nosuid", "nodev", "rbind", "rprivate")
IPC_BIND_OPTIONS = ("nosuid", "nodev", "noexec", "rbind", "rprivate")


@dataclass(frozen=True, slots=True)
class MountEdit:
    source: str  # host path (always from host discovery, never from the image)
    destination: str  # container path
    options: tuple[str, ...] = RO_BIND_OPTIONS
    type: str = "bind"


@dataclass(frozen=True, slots=True)
class HookEdit:
    path: str
    args: tuple[str, ...]
    env: tuple[str, ...]  # always explicit and non-empty: a hook never inherits the container env
    timeout: int | None = None


@dataclass(frozen=True, slots=True)
class Adjustment:
    devices: tuple[DeviceNode, ...] = ()
    mounts: tuple[MountEdit, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    create_container_hooks: tuple[HookEdit, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.devices or self.mounts or self.env or self.create_container_hooks)


EMPTY_ADJUSTMENT = Adjustment()

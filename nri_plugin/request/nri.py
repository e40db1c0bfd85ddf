"""NRI ``Container`` message → the hook's inputs (environment list, mounts, privileged).

Written against attribute names only (duck typing), so it accepts the generated
``api_pb2.Container`` as well as any object with the same fields.

How "privileged" is derived
---------------------------
The hook calls a container privileged when ``CAP_SYS_ADMIN`` is in its bounding capability
set.  NRI carries no process capabilities in any version (up to and including v0.11, whose new
``Container.user`` holds only uid/gid/additional gids, which say nothing about capabilities),
so the plugin has to infer it from what CRI does for ``securityContext.privileged: true``:

* containerd's CRI adds ``oci.WithPrivileged`` (all capabilities, hence CAP_SYS_ADMIN) and,
  by default, ``oci.WithHostDevices`` + ``oci.WithAllDevicesAllowed``.  The latter replaces the
  device cgroup list by the single rule ``{allow: true, access: "rwm"}`` (no type, no
  major/minor), which NRI reports in ``linux.resources.devices``.
* An unprivileged container starts from the default spec: a deny-all rule followed by allow
  rules for specific devices.  CRI has no field to request a wildcard allow rule, so it cannot
  get the allow-all rule through CRI.

Hence: **privileged ⇔ the device cgroup list holds an allow-all rule that no later deny rule
restricts.**  Allow-all means ``allow`` true, type ``""`` or ``"a"``, major and minor unset
(or ``-1``, runc's wildcard) and an access string containing ``r``, ``w`` and ``m``.

Why the rule alone and not the host devices as well: ``linux.devices`` filled with the host's
devices is not reliable evidence.  With the runtime option ``privileged_without_host_devices``
plus ``privileged_without_host_devices_all_devices_allowed`` a privileged container has the
allow-all rule but no host devices, and unprivileged containers may carry devices too (CRI
``devices``).  The host devices are therefore ignored.

Known limits (all err on the side of "unprivileged", which only matters for the MIG variables
and for ``accept-nvidia-visible-devices-envvar-when-unprivileged = false``):

* ``privileged_without_host_devices = true`` alone removes the allow-all rule as well: such a
  privileged container is seen as unprivileged.
* An unprivileged container given ``CAP_SYS_ADMIN`` via ``capabilities.add`` is privileged for
  the hook but is invisible to NRI.
* NRI plugins see the container as CRI built it; an allow-all rule added by another plugin's
  adjustment is applied after us.  A plugin that does add one grants every device anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from nri_plugin.request.model import Mount

__all__ = ["container_annotations", "device_paths", "is_allow_all_rule", "is_privileged", "request_inputs"]


def _optional_int(message: Any, field: str) -> int | None:
    """Value of an ``OptionalInt64`` field, ``None`` when unset (protobuf or plain object)."""
    has_field = getattr(message, "HasField", None)
    if has_field is not None:
        if not has_field(field):
            return None
        return int(getattr(message, field).value)
    wrapper = getattr(message, field, None)
    if wrapper is None:
        return None
    value = getattr(wrapper, "value", wrapper)
    return None if value is None else int(value)


def _has_message(message: Any, field: str) -> bool:
    has_field = getattr(message, "HasField", None)
    if has_field is not None:
        return bool(has_field(field))
    return getattr(message, field, None) is not None


def is_allow_all_rule(rule: Any) -> bool:
    """True for the wildcard allow rule CRI writes for privileged containers."""
    if not bool(getattr(rule, "allow", False)):
        return False
    if str(getattr(rule, "type", "")) not in ("", "a"):
        return False
    if _optional_int(rule, "major") not in (None, -1):
        return False
    if _optional_int(rule, "minor") not in (None, -1):
        return False
    access = str(getattr(rule, "access", ""))
    return {"r", "w", "m"} <= set(access)


def _device_rules(container: Any) -> Iterable[Any]:
    if not _has_message(container, "linux"):
        return ()
    linux = container.linux
    if not _has_message(linux, "resources"):
        return ()
    return tuple(getattr(linux.resources, "devices", ()) or ())


def is_privileged(container: Any) -> bool:
    """Whether the container was created privileged (see the module docstring)."""
    privileged = False
    for rule in _device_rules(container):
        if is_allow_all_rule(rule):
            privileged = True
        elif not bool(getattr(rule, "allow", False)):
            privileged = False  # a later deny rule takes devices away again
    return privileged


def request_inputs(container: Any) -> tuple[list[str], list[Mount], bool]:
    """The hook's inputs: the process environment (``"K=V"`` strings, in order), the mounts
    (source and destination) and whether the container is privileged."""
    env = [str(entry) for entry in (getattr(container, "env", ()) or ())]
    mounts = [
        Mount(source=str(getattr(m, "source", "")), destination=str(getattr(m, "destination", "")))
        for m in (getattr(container, "mounts", ()) or ())
    ]
    return env, mounts, is_privileged(container)


def container_annotations(container: Any) -> dict[str, str]:
    """The container's annotations (``cdi.k8s.io/*`` ones may carry CDI device names)."""
    return {str(k): str(v) for k, v in dict(getattr(container, "annotations", None) or {}).items()}


def device_paths(container: Any) -> Iterator[str]:
    """The container paths of the device nodes its spec already has (``linux.devices``), lazily:
    a privileged container has every host device, and only GPU requests look at them."""
    if not _has_message(container, "linux"):
        return
    for device in getattr(container.linux, "devices", ()) or ():
        yield str(getattr(device, "path", ""))

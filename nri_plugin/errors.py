"""The project's one error hierarchy.

Rule: every message a user can see names the value at fault and what would fix it.

``ContainerError`` and its subclasses fail exactly one container: the plugin turns them into an
error status on that CreateContainer call, containerd reports the message to the CRI caller, and
the daemon keeps serving. Anything else raised on the hot path is a bug; the stub still converts it
into an error status for that one call rather than crashing.
"""

from __future__ import annotations


class NriPluginError(Exception):
    """Base class of every error this project raises on purpose.

    Each carries the status it answers an NRI call with (:meth:`status`): the gRPC/ttrpc code
    ``code`` (a class attribute, 2 = Unknown, which is what the containerd/nri Go stub answers for a
    handler error) and the text, which containerd hands verbatim to the CRI caller.
    """

    code: int = 2  # codes.Unknown

    def status(self) -> tuple[int, str]:
        """``(code, message)`` for the ttrpc error answer."""
        return self.code, str(self)


class ContainerError(NriPluginError):
    """A problem with one container's request: fails that container only."""


class RequestError(ContainerError):
    """The container's GPU request is malformed or not allowed (the seed hook's panics)."""


class RequirementError(ContainerError):
    """An ``NVIDIA_REQUIRE_*`` expression is invalid or not met by the host. ``index``: which of
    the checked requirements failed (``None`` when not one in particular), ``unmet``: whether it
    is a condition the host does not meet (rather than an invalid expression)."""

    index: int | None = None
    unmet: bool = False


class DeviceSelectionError(ContainerError):
    """A requested device id does not name a device on this host (``device_id``: which one)."""

    device_id: str = ""


class DriverNotFoundError(ContainerError):
    """A GPU container was requested on a host without a usable NVIDIA driver."""


class DriverChangedError(ContainerError):
    """A mount source changed since discovery (driver upgrade, or a swapped file): not mounted."""


class DiscoveryPendingError(DriverNotFoundError):
    """A GPU container arrived before the first host driver discovery finished."""


class DiscoveryFailedError(DriverNotFoundError):
    """A GPU container arrived while host driver discovery fails (no snapshot to serve it from)."""


class ConfigError(NriPluginError):
    """Invalid daemon configuration (file, NRI config string or flags): a start-up error."""


class HostDiscoveryError(NriPluginError):
    """The host driver tree could not be read consistently."""


class ProtocolError(NriPluginError):
    """The peer violated the NRI/ttrpc/mux wire protocol; the connection is closed."""


class ImageReadError(NriPluginError):
    """A container's image could not be read (or was refused) for its loader cache: the container
    keeps today's adjustment without the generated ``/etc/ld.so.cache`` (the fallback)."""

"""The one composition of layers 2-4, used by the daemon's CreateContainer handler and by ``inspect``.

``decide`` = fast "could this be a GPU container at all?" check -> ``resolve_request`` (the seed
hook's rules) -> device selection -> requirement checks -> adjustment.

Fast path: most containers on a node are not GPU containers. A container can only be one if its
env has ``NVIDIA_VISIBLE_DEVICES``, one of the ``swarm-resource`` variables, or ``CUDA_VERSION``
(legacy CUDA images default to ``all``), or, with ``accept-nvidia-visible-devices-as-volume-mounts``,
a mount under ``/var/run/nvidia-container-devices``. If none is there, ``decide`` returns the shared
``NO_GPU`` decision after one ``str.startswith`` per env entry, without building any map. (Unlike
the seed hook, a malformed env entry of a non-GPU container is none of our business.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nri_plugin.adjust.build import Plan, plan, select_for_request
from nri_plugin.adjust.model import EMPTY_ADJUSTMENT, Adjustment
from nri_plugin.adjust.proto import to_proto
from nri_plugin.adjust.select import Selection
from nri_plugin.errors import (
    DiscoveryPendingError,
    DriverChangedError,
    DriverNotFoundError,
)
from nri_plugin.host import DriverSnapshot, FileId, Gpu, verify
from nri_plugin.request import (
    DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT,
    GpuRequest,
    HookConfig,
    HostFacts,
    Mount,
    check_requirements,
    resolve_request,
)
from nri_plugin.wire import api

_VOLUME_MOUNT_MARK = DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT.rsplit("/", 1)[-1]  # "nvidia-container-devices"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the plugin does for one container. ``request is None``: not a GPU container."""

    request: GpuRequest | None
    selection: Selection | None
    adjustment: Adjustment
    plan: Plan | None = None

    def message(self) -> api.ContainerAdjustment:
        """The adjustment as a fresh protobuf message (a copy of the plan's, when there is one)."""
        return self.plan.response_message() if self.plan is not None else to_proto(self.adjustment)


NO_GPU = Decision(None, None, EMPTY_ADJUSTMENT)


def may_request_gpus(env: Sequence[str], mounts: Sequence[Mount], config: HookConfig) -> bool:
    """Cheap necessary condition for a GPU request (false -> certainly not a GPU container)."""
    prefixes = config.trigger_prefixes
    for entry in env:
        if entry.startswith(prefixes):
            return True
    if config.accept_volume_mounts:
        for mount in mounts:
            if _VOLUME_MOUNT_MARK in mount.destination:
                return True
    return False


def decide(
    env: Sequence[str],
    mounts: Sequence[Mount],
    privileged: bool,
    config: HookConfig,
    snapshot: DriverSnapshot | None,
    *,
    discovery_pending: bool = False,
) -> Decision:
    """Decide the adjustment for one container; raises a ``ContainerError`` to fail it.

    ``discovery_pending``: no snapshot yet because the first discovery is still running (the
    plugin registers without waiting for it), not because the host has no driver.
    """
    if not may_request_gpus(env, mounts, config):
        return NO_GPU
    request = resolve_request(env, mounts, privileged, config)
    if request is None:
        return NO_GPU
    if snapshot is None and discovery_pending:
        raise DiscoveryPendingError(
            "NVIDIA driver discovery is still in progress on this node (the plugin has just started, "
            "and NVML can take seconds to initialize); the container was not created so that it "
            "does not start without its GPUs: retry it (kubelet does so by itself)"
        )
    if snapshot is None:
        shown = request.devices or "none"
        raise DriverNotFoundError(
            f"no NVIDIA driver was found on this host, but the container requests GPUs "
            f"(NVIDIA_VISIBLE_DEVICES={shown!r}); install and load the NVIDIA driver (or set the "
            "plugin's driver root, nvidia-container-cli.root, to where it is installed), "
            "or schedule the container on a GPU node"
        )
    selection = select_for_request(request, snapshot)
    if not request.disable_require:
        check_selection_requirements(request.requirements, selection, snapshot)
    chosen = plan(request, snapshot)
    verify_plan(chosen.checks, chosen.unpinned, snapshot.pin_errors)
    return Decision(request, selection, chosen.adjustment, chosen)


def verify_plan(
    checks: Sequence[FileId], unpinned: Sequence[str], pin_errors: Mapping[str, str] | None = None
) -> None:
    """Refuse to mount anything that is no longer what discovery checked (``host.pin``)."""
    if unpinned:
        why = (pin_errors or {}).get(unpinned[0], "not pinned at discovery")
        raise DriverChangedError(
            f"the host driver changed while it was discovered: {why}; not mounting "
            f"{unpinned[0]!r}. The plugin is rediscovering the driver: retry the container (kubelet "
            "does so by itself)"
        )
    problem = verify(checks)
    if problem is not None:
        raise DriverChangedError(
            f"the host driver changed since it was discovered: {problem}; not mounting it. The plugin "
            "is rediscovering the driver: retry the container (kubelet does so by itself). If this "
            "repeats, something keeps replacing files in the driver root"
        )


def _facts(snapshot: DriverSnapshot, gpu: Gpu | None) -> HostFacts:
    return HostFacts(
        cuda=snapshot.cuda_version,
        driver=snapshot.driver_version,
        arch=None if gpu is None else gpu.compute_capability,
        brand=None if gpu is None else gpu.brand,
    )


def check_selection_requirements(
    requirements: Sequence[str], selection: Selection, snapshot: DriverSnapshot
) -> None:
    """LNC: once per selected full GPU and once per selected MIG device (with its parent's facts),
    or once without a device when nothing is selected. Identical facts are checked once."""
    if not requirements:
        return
    devices: list[Gpu | None] = list(selection.gpus)
    for mig in selection.mig_devices:
        devices.extend(gpu for gpu in selection.gpus if gpu.index == mig.parent_index)
    if not devices:
        devices.append(None)
    seen: list[HostFacts] = []
    for device in devices:
        facts = _facts(snapshot, device)
        if facts not in seen:
            seen.append(facts)
            check_requirements(requirements, facts)

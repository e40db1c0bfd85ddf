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

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nri_plugin.adjust.build import Plan, plan, select_for_request
from nri_plugin.adjust.model import EMPTY_ADJUSTMENT, Adjustment
from nri_plugin.adjust.proto import to_proto
from nri_plugin.adjust.select import Selection
from nri_plugin.errors import (
    DiscoveryFailedError,
    DiscoveryPendingError,
    DriverChangedError,
    DriverNotFoundError,
    RequirementError,
)
from nri_plugin.host import DriverSnapshot, FileId, Gpu, verify
from nri_plugin.request import (
    CDI_ANNOTATION_PREFIX,
    DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT,
    GpuRequest,
    HookConfig,
    HostFacts,
    Mount,
    check_requirements,
    resolve_request,
    shorten,
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
    # Things to log at warning level for this container (an ignored request, a feature the node
    # lacks); none of them fails it.
    warnings: tuple[str, ...] = ()
    # Set when the container asks for GPUs but its spec already has NVIDIA device nodes (CDI
    # applied by the runtime, or another injector): it is left as it is; the text says why.
    left_alone: str = ""

    def message(self) -> api.ContainerAdjustment:
        """The adjustment as a fresh protobuf message (a copy of the plan's, when there is one)."""
        return self.plan.response_message() if self.plan is not None else to_proto(self.adjustment)


NO_GPU = Decision(None, None, EMPTY_ADJUSTMENT)


def may_request_gpus(
    env: Sequence[str],
    mounts: Sequence[Mount],
    config: HookConfig,
    annotations: Mapping[str, str] | None = None,
) -> bool:
    """Cheap necessary condition for a GPU request (false -> certainly not a GPU container)."""
    prefixes = config.trigger_prefixes
    for entry in env:
        if entry.startswith(prefixes):
            return True
    if config.accept_volume_mounts:
        for mount in mounts:
            if _VOLUME_MOUNT_MARK in mount.destination:
                return True
    if config.accept_cdi_annotations and annotations:
        return any(key.startswith(CDI_ANNOTATION_PREFIX) for key in annotations)
    return False


_NVIDIA_NODE = re.compile(r"/dev/nvidia(ctl|[0-9]+)")
_DRIVER_LIBRARY = re.compile(r"lib(cuda|nvidia-ml)\.so(\.[0-9.]+)?")


def nvidia_node_in(device_paths: Iterable[str]) -> str | None:
    """The first NVIDIA GPU or control node among a spec's device paths, if any."""
    return next((path for path in device_paths if _NVIDIA_NODE.fullmatch(path)), None)


def served_elsewhere(privileged: bool, mounts: Sequence[Mount], device_paths: Iterable[str]) -> str:
    """Why the container already has its GPUs from another injector ("" if it has not): an
    NVIDIA device node *and* a driver library mounted into it. Device nodes alone are no evidence:
    a privileged container carries every host device, and the device plugin's
    ``--pass-device-specs`` adds GPU nodes but no driver. (A CDI spec from nvidia-ctk also sets
    ``NVIDIA_VISIBLE_DEVICES=void``, which makes the container no GPU request at all.)"""
    if privileged:
        return ""
    library = next(
        (m.destination for m in mounts if _DRIVER_LIBRARY.fullmatch(m.destination.rsplit("/", 1)[-1])), None
    )
    if library is None:
        return ""
    node = nvidia_node_in(device_paths)
    if node is None:
        return ""
    return (
        f"its spec already has NVIDIA device nodes ({node}) and driver libraries ({library}): GPUs given "
        "by the runtime's CDI support or another injector; leaving it as it is"
    )


def decide(
    env: Sequence[str],
    mounts: Sequence[Mount],
    privileged: bool,
    config: HookConfig,
    snapshot: DriverSnapshot | None,
    *,
    discovery_pending: bool = False,
    discovery_error: str | None = None,
    annotations: Mapping[str, str] | None = None,
    device_paths: Iterable[str] = (),
) -> Decision:
    """Decide the adjustment for one container; raises a ``ContainerError`` to fail it.

    ``discovery_pending``: no snapshot yet because the first discovery is still running (the
    plugin registers without waiting for it), not because the host has no driver;
    ``discovery_error``: why the last discovery failed, when it did (an unreadable ld.so.cache, a
    broken driver tree): then that, not "no driver", is what a GPU container is told.
    ``annotations``: the container's (read with ``accept_cdi_annotations``); ``device_paths``: the
    device nodes its spec already has -- with an NVIDIA one among them the container got its GPUs
    elsewhere (CDI, another injector) and is left alone instead of being given them twice.
    """
    if not may_request_gpus(env, mounts, config, annotations):
        return NO_GPU
    notes: list[str] = []
    request = resolve_request(env, mounts, privileged, config, annotations=annotations, notes=notes)
    if request is None:
        return Decision(None, None, EMPTY_ADJUSTMENT, warnings=tuple(notes)) if notes else NO_GPU
    why = served_elsewhere(privileged, mounts, device_paths)
    if why:
        return Decision(request, None, EMPTY_ADJUSTMENT, warnings=tuple(notes), left_alone=why)
    if snapshot is None and discovery_pending:
        raise DiscoveryPendingError(
            "NVIDIA driver discovery is still in progress on this node (the plugin has just started, "
            "and NVML can take seconds to initialize); the container was not created so that it "
            "does not start without its GPUs: retry it (kubelet does so by itself)"
        )
    if snapshot is None and discovery_error:
        raise DiscoveryFailedError(
            f"NVIDIA driver discovery fails on this node ({discovery_error}); the container was not "
            "created so that it does not start without its GPUs: fix what the error names (the plugin "
            "retries discovery by itself), see `nvidia-nri-plugin info`"
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
        check_selection_requirements(request, selection, snapshot)
    chosen = plan(request, snapshot)
    verify_plan(chosen.checks, chosen.unpinned, snapshot.pin_errors)
    return Decision(request, selection, chosen.adjustment, chosen, warnings=(*notes, *chosen.warnings))


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
    """The facts one evaluation sees. Without a device, ``arch``/``brand`` are absent (their
    terms hold, as in the CLI); facts discovery could not read are marked unknown (their terms
    fail the requirement with a message that says so)."""
    unknown = set()
    if snapshot.cuda_version is None:
        unknown.add("cuda")
    if gpu is not None:
        if gpu.compute_capability is None:
            unknown.add("arch")
        if gpu.brand is None:
            unknown.add("brand")
    return HostFacts(
        cuda=snapshot.cuda_version,
        driver=snapshot.driver_version,
        arch=None if gpu is None else gpu.compute_capability,
        brand=None if gpu is None else gpu.brand,
        unknown=frozenset(unknown),
    )


def node_offers(snapshot: DriverSnapshot) -> str:
    """What a requirement could have asked of this node, for "unsatisfied condition" messages."""
    brands = sorted({g.brand for g in snapshot.gpus if g.brand})
    archs = sorted({g.compute_capability for g in snapshot.gpus if g.compute_capability})
    return (
        f"this node offers CUDA {snapshot.cuda_version or 'unknown'}, driver {snapshot.driver_version}"
        f", brand {'/'.join(brands) or 'unknown'}, arch {'/'.join(archs) or 'unknown'}"
    )


def check_selection_requirements(
    request: GpuRequest | Sequence[str], selection: Selection, snapshot: DriverSnapshot
) -> None:
    """LNC: once per selected full GPU and once per selected MIG device (with its parent's facts),
    in the order the request lists them (``Selection.requirement_order``), or once without a
    device when nothing is selected. Identical facts are checked once. A failure names the
    variable and value at fault and, when unmet, what the node offers."""
    requirements = request.requirements if isinstance(request, GpuRequest) else tuple(request)
    sources = request.requirement_sources if isinstance(request, GpuRequest) else ()
    if not requirements:
        return
    devices: list[Gpu | None] = list(selection.requirement_order or selection.gpus)
    if not devices:
        devices.append(None)
    seen: list[HostFacts] = []
    for device in devices:
        facts = _facts(snapshot, device)
        if facts in seen:
            continue
        seen.append(facts)
        try:
            check_requirements(requirements, facts)
        except RequirementError as exc:
            if exc.index is None or exc.index >= len(sources):
                raise
            value = requirements[exc.index]
            offers = f"; {node_offers(snapshot)}" if exc.unmet else ""
            error = RequirementError(f"{sources[exc.index]}={shorten(value, 200)}: {exc}{offers}")
            error.index, error.unmet = exc.index, exc.unmet
            raise error from None

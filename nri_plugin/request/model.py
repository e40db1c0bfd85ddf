"""Value types of the request model (layer 2).

``GpuRequest`` mirrors the seed hook's ``nvidiaConfig`` field for field, with the seed's raw
strings kept as they are (so the behaviour can be compared with the Go code exactly) and small
derived accessors for the layers below.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nri_plugin.request.devices import parse_device_list

# The seed's constants (reference/seed/container_config.go).
ALL_DRIVER_CAPABILITIES = "compute,compat32,graphics,utility,video,display,ngx"
DEFAULT_DRIVER_CAPABILITIES = "utility,compute"
# The toolkit's default for `supported-driver-capabilities` (sorted, as its config file writes it).
DEFAULT_SUPPORTED_DRIVER_CAPABILITIES = "compat32,compute,display,graphics,ngx,utility,video"
DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT = "/var/run/nvidia-container-devices"


def split_list(value: str) -> tuple[str, ...]:
    """A comma-separated list as the toolkit reads them: elements trimmed, empty ones dropped."""
    return tuple(p for p in (e.strip() for e in value.split(",")) if p)


@dataclass(frozen=True, slots=True)
class Mount:
    """The part of an OCI/NRI mount the hook looks at."""

    source: str
    destination: str


@dataclass(frozen=True, slots=True)
class HookConfig:
    """Toolkit ``config.toml`` keys that steer the request model (same names, same defaults)."""

    # accept-nvidia-visible-devices-envvar-when-unprivileged
    accept_envvar_unprivileged: bool = True
    # accept-nvidia-visible-devices-as-volume-mounts
    accept_volume_mounts: bool = False
    # swarm-resource: comma-separated env var names preferred over NVIDIA_VISIBLE_DEVICES ("" = none)
    swarm_resource: str = ""
    # supported-driver-capabilities
    supported_driver_capabilities: str = DEFAULT_SUPPORTED_DRIVER_CAPABILITIES
    # disable-require: forces NVIDIA_DISABLE_REQUIRE=true
    disable_require: bool = False
    # [nri-plugin] keys of this plugin that steer the request model (not the toolkit's):
    # accept-cdi-annotations: read nvidia.com/gpu CDI names from cdi.k8s.io/* container annotations
    accept_cdi_annotations: bool = False
    # fail-unprivileged-envvar-requests: the seed's behaviour when accept_envvar_unprivileged is
    # false (fail the container) instead of the current toolkit's (no GPUs, a warning)
    fail_unprivileged_envvar: bool = False
    # Derived once: the "NAME=" prefixes of the variables that can make a container a GPU container
    # (the fast path of adjust.pipeline checks every env entry against them).
    trigger_prefixes: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = ("NVIDIA_VISIBLE_DEVICES", "CUDA_VERSION", *split_list(self.swarm_resource))
        object.__setattr__(self, "trigger_prefixes", tuple(f"{name}=" for name in names))


CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"
# The driver features a GPU container can switch on with NAME=enabled (the toolkit's gated modes).
FEATURE_VARIABLES: tuple[tuple[str, str], ...] = (
    ("NVIDIA_GDS", "gds"),
    ("NVIDIA_MOFED", "mofed"),
    ("NVIDIA_GDRCOPY", "gdrcopy"),
    ("NVIDIA_NVSWITCH", "nvswitch"),
)


@dataclass(frozen=True, slots=True)
class MigMode:
    """``NVIDIA_MIG_CONFIG_DEVICES`` / ``NVIDIA_MIG_MONITOR_DEVICES``, parsed once. Only the global
    mode exists, and the first element of the comma list decides (libnvidia-container's
    ``select_mig_config_devices``): ``all`` (any case) asks for it; any other element is refused
    by the adjustment builder, which names it."""

    all: bool = False  # the first element is ``all``
    unsupported: str | None = None  # the first element, when it is not ``all``

    @staticmethod
    def parse(value: str) -> MigMode:
        first = next((e for e in value.split(",") if e), None)
        if first is None:
            return NO_MIG_MODE
        return MigMode(all=True) if first.lower() == "all" else MigMode(unsupported=first)


NO_MIG_MODE = MigMode()  # the variable is unset or names nothing


@dataclass(frozen=True, slots=True)
class GpuRequest:
    """The resolved GPU request of one container (the seed's ``nvidiaConfig``)."""

    devices: str  # raw device list; "" means "GPU container without GPUs" (NVIDIA_VISIBLE_DEVICES=none)
    mig_config_devices: str
    mig_monitor_devices: str
    driver_capabilities: str  # resolved comma list, e.g. "utility,compute"
    requirements: tuple[str, ...]  # one entry per NVIDIA_REQUIRE_* value (+ legacy cuda>=X.Y), sorted
    disable_require: bool
    # Beyond the seed (newer request forms; defaults = the seed's request):
    imex_channels: tuple[str, ...] = ()  # NVIDIA_IMEX_CHANNELS / imex volume mounts: numbers or "all"
    features: frozenset[str] = frozenset()  # gated driver features asked for: gds, mofed, gdrcopy, nvswitch
    privileged: bool = False  # the container is privileged (management devices depend on it)
    # Where the device list came from, e.g. "NVIDIA_VISIBLE_DEVICES" (for messages only).
    devices_source: str = field(default="NVIDIA_VISIBLE_DEVICES", compare=False)
    # The variable each requirement came from (parallel to ``requirements``; for messages only).
    requirement_sources: tuple[str, ...] = field(default=(), compare=False)

    # Parsed once, when the request is made (the layers below never re-split the strings):
    device_ids: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """Device ids as the CLI sees them: comma-split, trimmed, empty elements dropped, CDI names
    of ``nvidia.com/gpu`` unwrapped to the id they name."""
    all_devices: bool = field(init=False, repr=False, compare=False)
    """Some element of the device list is ``all`` (any case)."""
    management: bool = field(init=False, repr=False, compare=False)
    """``management.nvidia.com/gpu=all``: every NVIDIA device node of the node."""
    imex_ids: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """IMEX channels asked for, from ``imex_channels`` and ``nvidia.com/imex-channel`` names."""
    foreign_devices: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """CDI names of kinds this plugin does not own: left alone."""
    devices_ours: bool = field(init=False, repr=False, compare=False)
    """The device list names something this plugin acts on (or is empty: ``none``)."""
    capabilities: frozenset[str] = field(init=False, repr=False, compare=False)
    """The set of requested driver capabilities."""
    mig_config: MigMode = field(init=False, repr=False, compare=False)
    """``mig_config_devices`` parsed."""
    mig_monitor: MigMode = field(init=False, repr=False, compare=False)
    """``mig_monitor_devices`` parsed."""

    def __post_init__(self) -> None:
        parsed = parse_device_list(split_list(self.devices), self.devices_source)
        ids = parsed.ids
        derived = {
            "device_ids": ids,
            "all_devices": any(i.lower() == "all" for i in ids),
            "management": parsed.management,
            "imex_ids": tuple(dict.fromkeys((*self.imex_channels, *parsed.imex_channels))),
            "foreign_devices": parsed.foreign,
            "devices_ours": parsed.ours or not self.devices,
            "capabilities": frozenset(split_list(self.driver_capabilities)),
            "mig_config": MigMode.parse(self.mig_config_devices),
            "mig_monitor": MigMode.parse(self.mig_monitor_devices),
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)

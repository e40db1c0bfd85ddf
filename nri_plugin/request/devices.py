"""The elements of a device list: plain ids, CDI device names we own, and names we leave alone.

Today's NVIDIA stack writes device requests in three spellings, all of which end up in the same
comma-separated lists (``NVIDIA_VISIBLE_DEVICES``, the device plugin's volume mounts, ``cdi.k8s.io/*``
annotations):

* plain ids, as the legacy hook reads them: ``0``, ``GPU-<uuid>``, ``MIG-<uuid>``, ``0:1``, a PCI bus
  id, ``all``;
* fully-qualified CDI names ``<vendor>/<class>=<name>`` (the CDI specification's grammar: vendor a
  DNS-like name, class alphanumerics with ``-`` and ``_``, name alphanumerics with ``_ . : -``).
  This plugin resolves the kinds NVIDIA's CDI generator (``nvidia-ctk cdi generate``) emits against
  its own host discovery, so no CDI spec file is needed:

  - ``nvidia.com/gpu`` (and the toolkit's just-in-time kind ``runtime.nvidia.com/gpu``, and the
    device plugin's ``k8s.device-plugin.nvidia.com/gpu``): the name is a device id in the forms
    above, the generator's ``type-index`` names ``gpu<N>`` and ``mig<N>:<M>``, or ``none`` (a GPU
    container without GPUs, as jit-cdi spells ``NVIDIA_VISIBLE_DEVICES=none``);
  - ``management.nvidia.com/gpu=all``: every NVIDIA device node of the node (the management spec,
    for monitoring agents such as dcgm-exporter);
  - ``nvidia.com/imex-channel=<N>`` (or ``=all``): an IMEX channel;

* CDI names of any other kind (another vendor, ``nvidia.com/mofed``, ...): not ours. They are kept
  apart and left alone -- the runtime's own CDI support or another plugin may own them -- never
  failed.

Parsing is linear and looks at each element once; nothing here touches the host.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from nri_plugin.errors import RequestError

__all__ = [
    "GPU_KINDS",
    "IMEX_KIND",
    "MANAGEMENT_KIND",
    "DeviceList",
    "parse_device_list",
    "parse_imex_channel",
]

# nvidia.com/gpu: nvidia-ctk's specs; runtime.nvidia.com/gpu: the toolkit's just-in-time kind;
# k8s.device-plugin.nvidia.com/gpu: what the k8s-device-plugin's cdi-annotations strategy writes.
GPU_KINDS = frozenset({"nvidia.com/gpu", "runtime.nvidia.com/gpu", "k8s.device-plugin.nvidia.com/gpu"})
MANAGEMENT_KIND = "management.nvidia.com/gpu"
IMEX_KIND = "nvidia.com/imex-channel"
MAX_IMEX_CHANNEL = 2**20 - 1  # the toolkit's limit for channel numbers

# CDI's qualified device name: vendor "/" class "=" name (tags.cncf.io/container-device-interface
# pkg/parser). The vendor may hold dots and dashes (a domain), the class not dots.
_CDI_NAME = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9.-]*)/([A-Za-z0-9][A-Za-z0-9_-]*)=([A-Za-z0-9][A-Za-z0-9_.:-]*)"
)
_TYPE_INDEX_GPU = re.compile(r"gpu([0-9]{1,9})")
_TYPE_INDEX_MIG = re.compile(r"mig([0-9]{1,9}):([0-9]{1,9})")
_CHANNEL = re.compile(r"(?:channel)?([0-9]{1,7})")


@dataclass(frozen=True, slots=True)
class DeviceList:
    """One device list, sorted by what each element means."""

    ids: tuple[str, ...] = ()  # device ids for device selection (CDI names unwrapped)
    management: bool = False  # management.nvidia.com/gpu=all
    imex_channels: tuple[str, ...] = ()  # channel ids (digits) or "all", from nvidia.com/imex-channel
    foreign: tuple[str, ...] = ()  # CDI names of kinds this plugin does not own (left alone)
    none: bool = False  # nvidia.com/gpu=none: a GPU container without GPUs

    @property
    def ours(self) -> bool:
        """Anything in the list that this plugin acts on."""
        return bool(self.ids or self.management or self.imex_channels or self.none)


def _unwrap_gpu_name(name: str) -> str:
    """A ``nvidia.com/gpu`` device name -> the device id it stands for."""
    gpu = _TYPE_INDEX_GPU.fullmatch(name)
    if gpu is not None:
        return gpu.group(1)
    mig = _TYPE_INDEX_MIG.fullmatch(name)
    if mig is not None:
        return f"{mig.group(1)}:{mig.group(2)}"
    return name


def parse_imex_channel(value: str, variable: str) -> str:
    """``"7"``, ``"channel7"`` or ``"all"`` -> ``"7"``/``"all"``; anything else is refused."""
    if value.lower() == "all":
        return "all"
    match = _CHANNEL.fullmatch(value)
    if match is None or int(match.group(1)) > MAX_IMEX_CHANNEL:
        raise RequestError(
            f"{variable}: {value!r} is not an IMEX channel; write a channel number 0-{MAX_IMEX_CHANNEL} "
            "(e.g. 0 or channel0) or 'all'"
        )
    return str(int(match.group(1)))


def parse_device_list(elements: Iterable[str], variable: str) -> DeviceList:
    """Sort the (already comma-split and trimmed) elements of a device list.

    ``variable`` names where the list came from, for error messages. Raises
    :class:`RequestError` for a name of a kind we own that cannot be valid
    (``management.nvidia.com/gpu=0``); unknown device *ids* are left to device selection, which
    knows the node's devices.
    """
    ids: list[str] = []
    imex: list[str] = []
    foreign: list[str] = []
    management = none = False
    for element in elements:
        if "=" not in element:
            ids.append(element)
            continue
        match = _CDI_NAME.fullmatch(element)
        if match is None:
            ids.append(element)  # not a CDI name: device selection reports it as unknown
            continue
        kind, name = f"{match.group(1)}/{match.group(2)}", match.group(3)
        if kind in GPU_KINDS:
            if name.lower() == "none":
                none = True
            else:
                ids.append(_unwrap_gpu_name(name))
        elif kind == MANAGEMENT_KIND:
            if name.lower() != "all":
                raise RequestError(
                    f"{variable}: {element!r}: the management kind has one device, 'all'; "
                    f"write {MANAGEMENT_KIND}=all"
                )
            management = True
        elif kind == IMEX_KIND:
            imex.append(parse_imex_channel(name, variable))
        else:
            foreign.append(element)
    return DeviceList(tuple(ids), management, tuple(imex), tuple(foreign), none)

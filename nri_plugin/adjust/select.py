"""Device selection: ``NVIDIA_VISIBLE_DEVICES`` ids -> GPUs and MIG devices of the host snapshot.

Semantics follow libnvidia-container's ``select_devices`` (nvidia-toolkit.md §2.2-§2.3). Each
comma-separated element is tried against these forms, first match wins:

1. ``all`` (case-insensitive): every GPU **and** every MIG device. As in LNC's
   ``select_all_devices``, a MIG-enabled GPU is itself part of ``all`` (so its ``/dev/nvidiaN`` is
   injected and requirements are evaluated against it), unlike the CDI generator, which skips
   MIG-enabled full GPUs. As in LNC, ``all`` ends the parsing: later elements are not looked at.
2. ``GPU-<uuid>``: the full GPU UUID, case-insensitive (no prefix matching).
3. A PCI bus id ``<domain>:<bus>:<device>.<function>`` (1-8, 1-2, 1-2 hex digits and one function
   digit 0-7, leading zeros optional), normalized to ``%08x:%02x:%02x.%x`` and compared with the
   snapshot's normalized bus id. LNC's ``sscanf`` is laxer (it ignores what follows the device
   number); we only accept the documented shape.
4. A decimal GPU index: ASCII digits only (no sign, no blanks; leading zeros allowed as in LNC's
   ``strtoumax``), below the number of GPUs.
5. ``MIG-...``: the full MIG UUID as NVML reports it, case-insensitive; this covers both
   ``MIG-<uuid>`` and the legacy ``MIG-GPU-<uuid>/<gi>/<ci>``.
6. ``<gpu>:<mig>``: GPU index and MIG device index, both plain decimal.

A selected MIG device brings its parent GPU. Anything else fails with
``DeviceSelectionError("<id>: unknown device ...")``. Ids are only ever compared with values of
the snapshot; no part of an id is used to build a path.

The result is in snapshot order (GPUs by their position in ``snapshot.gpus``, MIG devices by
parent, then MIG index), without duplicates, independent of the order of the request, so equal
selections compare (and cache) equal.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nri_plugin.errors import DeviceSelectionError
from nri_plugin.host import DriverSnapshot, Gpu, MigDevice

_HEX = "0-9a-fA-F"
_BUS_ID_RE = re.compile(rf"([{_HEX}]{{1,8}}):([{_HEX}]{{1,2}}):([{_HEX}]{{1,2}})\.([0-7])")
_INDEX_RE = re.compile(r"[0-9]{1,9}")
_MIG_PAIR_RE = re.compile(r"([0-9]{1,9}):([0-9]{1,9})")
_SAFE_ID_RE = re.compile(r"[A-Za-z0-9:._/+-]{1,96}")

VALID_FORMS_HINT = (
    "valid device ids are 'all', 'none', a GPU index (e.g. 0), a GPU UUID (GPU-<uuid>), a PCI bus id "
    "(dddd:bb:dd.0), a MIG UUID (MIG-<uuid> or MIG-GPU-<uuid>/<gi>/<ci>), a MIG index pair "
    "<gpu>:<mig>, or any of them as a CDI name nvidia.com/gpu=<id>"
)


@dataclass(frozen=True, slots=True)
class Selection:
    """Selected devices. ``gpus`` includes the parents of selected MIG devices.

    ``requirement_order``: the devices requirements are checked against, in libnvidia-container's
    order -- the full GPUs as the request lists them, then, for each MIG device as the request
    lists it, its parent -- so the first unmet condition reported is the CLI's."""

    gpus: tuple[Gpu, ...]
    mig_devices: tuple[MigDevice, ...]
    requirement_order: tuple[Gpu, ...] = field(default=(), compare=False)


EMPTY_SELECTION = Selection((), ())


def show_id(device_id: str) -> str:
    """The id as it may appear in a message: verbatim when plain, else quoted and truncated."""
    if _SAFE_ID_RE.fullmatch(device_id):
        return device_id
    shown = repr(device_id)
    return shown if len(shown) <= 98 else shown[:95] + "..."


def _match_gpu(device_id: str, snapshot: DriverSnapshot) -> Gpu | None:
    gpus = snapshot.gpus
    if device_id[:4].upper() == "GPU-" and len(device_id) > 4:
        wanted = device_id.lower()
        for gpu in gpus:
            if len(gpu.uuid) == len(device_id) and gpu.uuid.lower() == wanted:
                return gpu
    bus = _BUS_ID_RE.fullmatch(device_id)
    if bus is not None:
        domain, bus_no, dev, func = (int(part, 16) for part in bus.groups())
        normalized = f"{domain:08x}:{bus_no:02x}:{dev:02x}.{func:x}"
        for gpu in gpus:
            if gpu.bus_id.lower() == normalized:
                return gpu
    if _INDEX_RE.fullmatch(device_id):
        index = int(device_id)
        for gpu in gpus:
            if gpu.index == index:
                return gpu
    return None


def _match_mig(device_id: str, snapshot: DriverSnapshot) -> tuple[Gpu, MigDevice] | None:
    if device_id[:4].upper() == "MIG-" and len(device_id) > 4:
        wanted = device_id.lower()
        for gpu in snapshot.gpus:
            for mig in gpu.mig_devices:
                if len(mig.uuid) == len(device_id) and mig.uuid.lower() == wanted:
                    return gpu, mig
    pair = _MIG_PAIR_RE.fullmatch(device_id)
    if pair is not None:
        gpu_index, mig_index = int(pair.group(1)), int(pair.group(2))
        for gpu in snapshot.gpus:
            if gpu.index == gpu_index:
                for mig in gpu.mig_devices:
                    if mig.index == mig_index:
                        return gpu, mig
    return None


def select_devices(ids: Sequence[str], snapshot: DriverSnapshot) -> Selection:
    """Resolve device ids (already comma-split) against the snapshot; see the module docstring."""
    full: dict[Gpu, None] = {}  # in request order
    migs: dict[MigDevice, Gpu] = {}
    seen: set[str] = set()  # a repeated id selects nothing new: matched once (8 190 x "0" is cheap)
    for device_id in ids:
        if not device_id or device_id in seen:
            continue  # extra commas are allowed
        seen.add(device_id)
        if device_id.lower() == "all":
            all_migs = tuple(mig for gpu in snapshot.gpus for mig in gpu.mig_devices)
            parents = tuple(gpu for gpu in snapshot.gpus for _ in gpu.mig_devices)
            return Selection(snapshot.gpus, all_migs, (*snapshot.gpus, *parents))
        gpu = _match_gpu(device_id, snapshot)
        if gpu is not None:
            full[gpu] = None
            continue
        found = _match_mig(device_id, snapshot)
        if found is not None:
            migs[found[1]] = found[0]
            continue
        error = DeviceSelectionError(f"{show_id(device_id)}: unknown device; {VALID_FORMS_HINT}")
        error.device_id = device_id
        raise error
    if not full and not migs:
        return EMPTY_SELECTION
    chosen = set(full) | set(migs.values())
    return Selection(
        gpus=tuple(gpu for gpu in snapshot.gpus if gpu in chosen),
        mig_devices=tuple(mig for gpu in snapshot.gpus for mig in gpu.mig_devices if mig in migs),
        requirement_order=(*full, *migs.values()),
    )


def describe_devices(snapshot: DriverSnapshot, limit: int = 4) -> str:
    """This node's device ids, short: for "unknown device" messages."""
    gpus = snapshot.gpus
    if not gpus:
        return "this node has no GPUs"
    indexes = f"0-{len(gpus) - 1}" if len(gpus) > 1 else "0"
    uuids = ", ".join(gpu.uuid for gpu in gpus[:limit]) + (", ..." if len(gpus) > limit else "")
    migs = [mig for gpu in gpus for mig in gpu.mig_devices]
    text = f"this node has GPUs {indexes} ({uuids})"
    if migs:
        shown = ", ".join(f"{m.parent_index}:{m.index}" for m in migs[:limit])
        text += f" and MIG devices {shown}" + (", ..." if len(migs) > limit else "")
    return text

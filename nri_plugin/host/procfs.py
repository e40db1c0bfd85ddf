"""Parsers for the NVIDIA driver's procfs files (pure functions on text) plus small readers.

Formats (reference nvidia-toolkit.md §2.5):

* ``/proc/devices``: ``"<major> <name>"`` lines under ``Character devices:``.
* ``/proc/driver/nvidia-caps/mig-minors``: ``"<cap> <minor>"`` lines.
* ``/proc/driver/nvidia/gpus/<bus>/information``, ``/proc/driver/nvidia/params`` and the
  capability files under ``/proc/driver/nvidia/capabilities/``: ``"Key: value"`` lines.
* ``/proc/driver/nvidia/version``: ``NVRM version: NVIDIA UNIX ... Kernel Module  <ver>  ...``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.paths import resolve_in_root

_BUS_ID = re.compile(
    r"^(?:(?P<domain>[0-9a-fA-F]{1,8}):)?(?P<bus>[0-9a-fA-F]{1,2}):(?P<dev>[0-9a-fA-F]{1,2})\.(?P<fn>[0-7])$"
)
_VERSION = re.compile(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)\s")


def normalize_bus_id(bus_id: str) -> str:
    """``"0000:3B:00.0"`` / ``"00000000:3b:00.0"`` / ``"3b:00.0"`` -> ``"00000000:3b:00.0"``.

    The function digit is always written as ``0`` (libnvidia-container formats ``%08x:%02x:%02x.0``).
    """
    m = _BUS_ID.match(bus_id.strip())
    if m is None:
        raise HostDiscoveryError(
            f"PCI bus id {bus_id!r} is not of the form [domain:]bus:device.function (e.g. '0000:3b:00.0')"
        )
    domain = int(m["domain"] or "0", 16)
    return f"{domain:08x}:{int(m['bus'], 16):02x}:{int(m['dev'], 16):02x}.0"


def parse_proc_devices(text: str) -> dict[str, int]:
    """Character-device majors by name from ``/proc/devices`` (block devices are ignored)."""
    out: dict[str, int] = {}
    in_char = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.endswith(":"):
            in_char = line == "Character devices:"
            continue
        if not in_char:
            continue
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0].isdigit():
            out[parts[1].strip()] = int(parts[0])
    return out


def parse_mig_minors(text: str) -> dict[str, int]:
    """``config 1`` / ``gpu0/gi1/access 12`` lines -> {cap: minor}; malformed lines are skipped."""
    out: dict[str, int] = {}
    for raw in text.splitlines():
        parts = raw.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_key_values(text: str) -> dict[str, str]:
    """``Key: value`` lines -> {key: value}; the first ``:`` splits, both sides are stripped."""
    out: dict[str, str] = {}
    for raw in text.splitlines():
        key, sep, value = raw.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def parse_driver_version(text: str) -> str | None:
    """Driver version from ``/proc/driver/nvidia/version`` (proprietary and open kernel modules)."""
    for line in text.splitlines():
        if line.startswith("NVRM version:"):
            m = _VERSION.search(line + " ")
            if m:
                return m.group(1)
    return None


@dataclass(frozen=True, slots=True)
class ProcGpu:
    bus_id: str  # normalized
    uuid: str
    minor: int
    model: str
    proc_dir: str  # directory name under /proc/driver/nvidia/gpus


def parse_gpu_information(text: str, dir_name: str) -> ProcGpu:
    """One ``gpus/<bus>/information`` file. Raises HostDiscoveryError naming the missing field."""
    kv = parse_key_values(text)
    where = f"/proc/driver/nvidia/gpus/{dir_name}/information"
    for field in ("GPU UUID", "Device Minor"):
        if field not in kv:
            raise HostDiscoveryError(f"{where} has no '{field}' line; is the NVIDIA kernel module loaded?")
    minor_text = kv["Device Minor"]
    if not minor_text.isdigit():
        raise HostDiscoveryError(f"{where}: 'Device Minor' is {minor_text!r}, expected a decimal number")
    return ProcGpu(
        bus_id=normalize_bus_id(kv.get("Bus Location", dir_name)),
        uuid=kv["GPU UUID"],
        minor=int(minor_text),
        model=kv.get("Model", ""),
        proc_dir=dir_name,
    )


def read_text(root: str, path: str) -> str | None:
    """Read ``path`` inside ``root`` (resolved with :func:`resolve_in_root`); None if absent."""
    host = resolve_in_root(root, path)
    try:
        with open(host, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as exc:
        raise HostDiscoveryError(f"cannot read {host!r}: {exc.strerror}; check its permissions") from exc


def read_proc_gpus(proc_root: str) -> list[ProcGpu]:
    """All GPUs listed under ``<proc_root>/driver/nvidia/gpus``, sorted by bus id."""
    gpus_dir = resolve_in_root(proc_root, "driver/nvidia/gpus")
    try:
        names = sorted(os.listdir(gpus_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    out: list[ProcGpu] = []
    for name in names:
        text = read_text(proc_root, f"driver/nvidia/gpus/{name}/information")
        if text is None:
            continue
        out.append(parse_gpu_information(text, name))
    out.sort(key=lambda g: g.bus_id)
    return out

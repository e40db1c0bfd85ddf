"""Size limits on every container-controlled value the plugin reads, checked before it is parsed.

The CreateContainer handler runs on the event loop that also answers containerd's other calls, and
containerd drops a plugin that does not answer within 2 s -- after which every container starts
without GPUs (NRI fails open). An unprivileged pod controls its environment and mounts, so the work
any one container can cause must be small and bounded: each variable below has a byte limit far
above any real value, checked before the value is split or parsed; the parsers after it are linear.
The requirement terms are capped by count too (:data:`MAX_REQUIREMENT_TERMS`), since their
evaluation, not their size, is what costs. With every value at its limits the whole decision stays
within a few tens of milliseconds, a small fraction of containerd's 2 s (``bench/bench.py``, case
``(h) hostile, at limits``).

Deviation from the hook: it had no limits but Linux's MAX_ARG_STRLEN (128 KiB per string, see
``requirements.MAX_REQUIREMENT_BYTES``); a value over a limit here fails the container with
:class:`~nri_plugin.errors.RequestError` naming the variable, its size and the limit.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from nri_plugin.errors import RequestError

__all__ = [
    "DEFAULT_VALUE_LIMIT",
    "DEVICE_LIST_LIMIT",
    "MAX_ANNOTATION_TOTAL",
    "MAX_DEVICE_MOUNTS",
    "MAX_REQUIREMENT_TERMS",
    "MAX_REQUIREMENT_TOTAL",
    "VALUE_LIMITS",
    "checked",
    "limit_for",
    "requirement_terms",
    "shorten",
]

# Device lists: 8 GPUs x 7 MIG devices as CDI names ("nvidia.com/gpu=MIG-<uuid>") are ~3.2 KiB.
DEVICE_LIST_LIMIT = 16 * 1024
VALUE_LIMITS: Mapping[str, int] = MappingProxyType(
    {
        "NVIDIA_VISIBLE_DEVICES": DEVICE_LIST_LIMIT,
        "NVIDIA_MIG_CONFIG_DEVICES": DEVICE_LIST_LIMIT,
        "NVIDIA_MIG_MONITOR_DEVICES": DEVICE_LIST_LIMIT,
        "NVIDIA_IMEX_CHANNELS": DEVICE_LIST_LIMIT,
        "NVIDIA_DRIVER_CAPABILITIES": 1024,  # "all" spelt out is 52 bytes
        "CUDA_VERSION": 256,  # "12.4.1"
        "NVIDIA_DISABLE_REQUIRE": 256,  # "true"
    }
)
# Anything else we read (swarm-resource variables: device lists; NVIDIA_REQUIRE_*: the CUDA base
# images' NVIDIA_REQUIRE_CUDA, the longest real value, is ~1.5 KiB).
DEFAULT_VALUE_LIMIT = DEVICE_LIST_LIMIT
REQUIREMENT_LIMIT = 8 * 1024
MAX_REQUIREMENT_TOTAL = 32 * 1024  # all NVIDIA_REQUIRE_* values together
# Terms (``key op value`` between commas and spaces) of all NVIDIA_REQUIRE_* values together: what
# evaluation costs grows with. The CUDA base images' NVIDIA_REQUIRE_CUDA has about 90; 32 KiB of
# "cuda>=1.0," would be 3 276, each parsed and compared once per distinct GPU model selected.
MAX_REQUIREMENT_TERMS = 1024
MAX_DEVICE_MOUNTS = 1024  # /var/run/nvidia-container-devices/<id> mounts of one container
MAX_ANNOTATION_TOTAL = 4 * DEVICE_LIST_LIMIT  # all cdi.k8s.io/* annotation values of one container
PATH_LIMIT = 4096  # PATH_MAX, for mount destinations we parse

_SHOWN = 64


def shorten(value: str, limit: int = _SHOWN) -> str:
    """``value`` quoted for a message, cut to ``limit`` characters with a note of its real size."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters in all)"


_TERM = re.compile(r"[^ ,]+")


def requirement_terms(value: str) -> int:
    """How many terms a requirement value has (empty ones between repeated separators do not count,
    as dsl.c skips them); linear, at C speed."""
    return len(_TERM.findall(value))


def limit_for(name: str) -> int:
    if name.startswith("NVIDIA_REQUIRE_"):
        return REQUIREMENT_LIMIT
    return VALUE_LIMITS.get(name, DEFAULT_VALUE_LIMIT)


def checked(variables: Mapping[str, str], name: str) -> str | None:
    """``variables.get(name)``, refused with a clear error when it is over its limit."""
    value = variables.get(name)
    if value is not None:
        limit = limit_for(name)
        if len(value) > limit:
            raise RequestError(
                f"{name}={shorten(value)}: the value is {len(value)} characters long, over the NVIDIA NRI "
                f"plugin's limit of {limit} characters for {name}; no real value is that long: fix the "
                "image or pod spec that sets it"
            )
    return value

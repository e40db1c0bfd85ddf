"""Layer 2: the request model. Pure functions, no I/O.

The public API of the layer is ``__all__``; code outside ``nri_plugin.request`` imports only that.
"""

from nri_plugin.request.model import (
    ALL_DRIVER_CAPABILITIES,
    DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT,
    GpuRequest,
    HookConfig,
    Mount,
    split_list,
)
from nri_plugin.request.nri import request_inputs
from nri_plugin.request.requirements import HostFacts, check_requirements
from nri_plugin.request.resolve import resolve_request

__all__ = [
    "ALL_DRIVER_CAPABILITIES",
    "DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT",
    "GpuRequest",
    "HookConfig",
    "HostFacts",
    "Mount",
    "check_requirements",
    "request_inputs",
    "resolve_request",
    "split_list",
]

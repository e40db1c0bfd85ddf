"""Layer 2: the request model. Pure functions, no I/O.

The public API of the layer is ``__all__``; code outside ``nri_plugin.request`` imports only that.
"""

from nri_plugin.request.devices import IMEX_KIND
from nri_plugin.request.limits import shorten
from nri_plugin.request.model import (
    ALL_DRIVER_CAPABILITIES,
    CDI_ANNOTATION_PREFIX,
    DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT,
    FEATURE_VARIABLES,
    GpuRequest,
    HookConfig,
    MigMode,
    Mount,
    split_list,
)
from nri_plugin.request.nri import container_annotations, device_paths, request_inputs
from nri_plugin.request.requirements import HostFacts, check_requirements
from nri_plugin.request.resolve import resolve_request

__all__ = [
    "ALL_DRIVER_CAPABILITIES",
    "CDI_ANNOTATION_PREFIX",
    "DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT",
    "FEATURE_VARIABLES",
    "IMEX_KIND",
    "GpuRequest",
    "HookConfig",
    "HostFacts",
    "MigMode",
    "Mount",
    "check_requirements",
    "container_annotations",
    "device_paths",
    "request_inputs",
    "resolve_request",
    "shorten",
    "split_list",
]

"""Layer 4: resolved request + host snapshot -> container adjustment (pure).

The public API of the layer is ``__all__``; code outside ``nri_plugin.adjust`` imports only that.
"""

from nri_plugin.adjust.loader import (
    COMPAT_DIR,
    COMPAT_MODES,
    LDCACHE_PATH,
    ImageFacts,
    LoaderCache,
    build_cache,
    cache_mount,
    compat_enabled,
    driver_records,
    lib_dirs,
    libcuda_env,
)
from nri_plugin.adjust.model import Adjustment, MountEdit
from nri_plugin.adjust.pipeline import Decision, decide
from nri_plugin.adjust.proto import to_proto
from nri_plugin.adjust.select import EMPTY_SELECTION, Selection

__all__ = [
    "COMPAT_DIR",
    "COMPAT_MODES",
    "EMPTY_SELECTION",
    "LDCACHE_PATH",
    "Adjustment",
    "Decision",
    "ImageFacts",
    "LoaderCache",
    "MountEdit",
    "Selection",
    "build_cache",
    "cache_mount",
    "compat_enabled",
    "decide",
    "driver_records",
    "lib_dirs",
    "libcuda_env",
    "to_proto",
]

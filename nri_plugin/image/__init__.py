"""The container's image, read for its loader: snapshot layers from containerd, a confined
read-only view of them, the facts the generated ``/etc/ld.so.cache`` needs, the files on the host.

Daemon-level (it does I/O, and is used by the plugin and ``inspect`` only). The public API is
``__all__``.
"""

from nri_plugin.image.containerd import SnapshotMount, layer_dirs, snapshot_mounts
from nri_plugin.image.rootfs import Budget, ImageRoot
from nri_plugin.image.scan import read_facts
from nri_plugin.image.service import LoaderConfig, LoaderOutcome, LoaderService, MountsFn
from nri_plugin.image.store import CacheStore

__all__ = [
    "Budget",
    "CacheStore",
    "ImageRoot",
    "LoaderConfig",
    "LoaderOutcome",
    "LoaderService",
    "MountsFn",
    "SnapshotMount",
    "layer_dirs",
    "read_facts",
    "snapshot_mounts",
]

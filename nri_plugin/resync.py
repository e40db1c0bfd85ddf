"""The Synchronize check: GPU containers that run without their GPUs, and which of them to evict.

NRI fails open: a container created while no plugin was registered (the plugin restarting, a
containerd restart racing it, a plugin dropped for answering too late -- containerd/nri#316) starts
without any adjustment. At every (re)registration containerd hands the plugin every existing
container; :func:`classify` sorts each one that asks for GPUs but has no NVIDIA device node in its
spec into

``protected``   created before this plugin first registered on the node (the ``first-registered``
                file in ``state-dir``), or of unknown age: it may have its GPUs from the legacy
                hook (whose device nodes are not in the OCI spec) or from CDI, so a migration from
                nvidia-container-runtime never evicts a running job;
``evictable``   created after that: it was created while this plugin was away, and stopping it
                lets its controller (kubelet) recreate it -- with its GPUs.

Containers whose spec has any ``/dev/nvidia*`` device, an NVIDIA CDI device or the legacy prestart
hook got their GPUs from some injector and are not reported at all.

How a container is evicted (:func:`evict_fallback`): first through NRI (``UpdateContainers`` with a
``ContainerEviction`` and a reason), the protocol's way. containerd up to 2.2 drops the ``evict``
list of that call (its adaptation passes only the updates on), so when the container's process
still runs after :data:`EVICT_GRACE_S` the plugin sends SIGKILL to the container's init process --
only after checking that ``/proc/<pid>/cgroup`` names the container id, so a PID from another PID
namespace (a pod without hostPID) or a recycled PID is never signalled. containerd then reports the
container exited, as a runtime eviction would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "first-registered"
EVICT_GRACE_S = 2.0
EVICT_REASON = (
    "nvidia-nri-plugin: created without its GPUs while the plugin was not registered (NRI fails "
    "open); stopped so that it is recreated with them"
)


def first_registered_ns(state_dir: str, now_ns: int | None = None) -> int:
    """When this plugin first registered on this node (unix ns); records ``now`` on the first call.

    Raises OSError when the file can neither be read nor written (then nothing may be evicted).
    """
    path = Path(state_dir) / STATE_FILE
    try:
        return int(path.read_text().split()[0])
    except FileNotFoundError:
        pass
    except (ValueError, IndexError):
        raise OSError(f"{path}: not a timestamp; remove the file to record a new one") from None
    value = time.time_ns() if now_ns is None else now_ns
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    tmp.write_text(f"{value}\n")
    os.replace(tmp, path)
    return value


def process_start_ns(pid: int, proc_root: str = "/proc") -> int | None:
    """Start time of ``pid`` as unix ns, or None: its ``starttime`` (clock ticks since boot, on
    the boot-time clock) placed on the wall clock through ``CLOCK_BOOTTIME`` now. (``btime`` of
    ``/proc/stat`` is whole seconds: a container started within a second after the plugin's first
    registration could be taken for an older one.)"""
    try:
        with open(f"{proc_root}/{pid}/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
    except (OSError, ValueError, IndexError):
        return None
    boot_ns = time.time_ns() - time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    return boot_ns + ticks * 10**9 // os.sysconf("SC_CLK_TCK")


def owns_process(container_id: str, pid: int, proc_root: str = "/proc") -> bool:
    """Whether ``pid`` (in this process's PID namespace) runs in the container's cgroup."""
    if pid <= 1 or not container_id:
        return False
    try:
        with open(f"{proc_root}/{pid}/cgroup") as f:
            return container_id in f.read()
    except OSError:
        return False


@dataclass(frozen=True, slots=True)
class Verdict:
    evict: bool
    why: str  # for the log line


def classify(created_ns: int | None, first_ns: int | None) -> Verdict:
    """Whether an unadjusted container may be evicted, given its creation time and the state file."""
    if first_ns is None:
        return Verdict(False, "the state file is unusable: nothing is evicted")
    if created_ns is None or created_ns <= 0:
        return Verdict(False, "creation time unknown: may predate this plugin (legacy hook or CDI)")
    if created_ns < first_ns:
        return Verdict(False, "created before this plugin first registered on the node (legacy hook or CDI)")
    return Verdict(True, "created after this plugin first registered, while it was away")


def evict_fallback(container_id: str, pid: int, proc_root: str = "/proc") -> bool:
    """SIGKILL the container's init process when it is verifiably that container's; True if sent."""
    if not owns_process(container_id, pid, proc_root):
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
        return True
    return False

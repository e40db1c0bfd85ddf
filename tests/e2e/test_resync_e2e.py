"""No silent GPU-less containers: SIGKILL the plugin during a burst of GPU creates, restart it, and
check that every container created without its GPUs is reported -- and evicted -- while a container
that predates the plugin's first registration on the node is reported but never evicted.

Sequence (per containerd version, real daemon with ``evict-unadjusted = true`` and a fresh
``state-dir``):

1. No plugin yet: a GPU container ``pre-existing`` is created and started. It stands for a job that
   got its GPUs from nvidia-container-runtime's legacy hook before the migration (that hook's device
   nodes are not in the OCI spec either), so it must survive.
2. The plugin starts (first registration: the state file is written) and reports ``pre-existing``
   as protected.
3. Burst: GPU containers are created and started back to back; after a few, the plugin is
   SIGKILLed and the burst goes on for a while, then stops.
4. The plugin is started again. Its Synchronize must report exactly the burst containers whose
   spec lacks ``/dev/nvidiactl`` (counted here from the specs) and evict each of them: their state
   becomes EXITED, while the containers that got their GPUs and ``pre-existing`` keep running.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .containerd import Containerd
from .cri import ContainerRequest, CriClient, Pod
from .gpu_plugin_runner import GpuPluginProcess, build_e2e_host, nvidia_devices
from .images import BuiltImages

CONTAINER_STATE_RUNNING = 1
CONTAINER_STATE_EXITED = 2
REPORTED = "GPU container is running without its GPUs (created while the plugin was not registered); "


def sleeper(images: BuiltImages, name: str) -> ContainerRequest:
    return ContainerRequest(
        image=images.refs["busybox"],
        command=["sleep", "600"],
        env={"NVIDIA_VISIBLE_DEVICES": "0"},
        name=name,
    )


def start_gpu_container(cri: CriClient, pod: Pod, images: BuiltImages, name: str) -> str:
    cid = cri.create_container(pod, sleeper(images, name))
    cri.start_container(cid)
    return cid


def state_of(cri: CriClient, cid: str) -> int:
    status, _ = cri.container_status(cid)
    return int(status.state)


def wait_states(cri: CriClient, wanted: dict[str, int], timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        now = {cid: state_of(cri, cid) for cid in wanted}
        if now == wanted or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def test_sigkill_during_burst_reports_and_evicts_gpu_less_containers(
    containerd: Containerd, cri: CriClient, e2e_images: BuiltImages, e2e_base: Path, tmp_path: Path
) -> None:
    host = build_e2e_host(e2e_base, 1)
    plugin = GpuPluginProcess(
        host,
        containerd.nri_socket,
        tmp_path / "plugin",
        extra_args=["--set", "nri-plugin.evict-unadjusted=true"],
    )
    pod = cri.run_pod("resync")
    pre = start_gpu_container(cri, pod, e2e_images, "pre-existing")
    time.sleep(0.05)  # strictly older than the first registration
    try:
        plugin.start()
        first = plugin.wait_for(REPORTED + "recreate it; not evicted", container_id=pre)
        assert first.fields["evictable"] is False and "before this plugin first registered" in str(
            first.fields["why"]
        )
        plugin.wait_for("host driver discovered", timeout=30)  # registration does not wait for it
        state_file = tmp_path / "plugin" / "state" / "first-registered"
        assert state_file.is_file()

        burst: list[str] = []
        for i in range(4):
            burst.append(start_gpu_container(cri, pod, e2e_images, f"before-kill-{i}"))
        pid = plugin.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        plugin.kill()  # reap it
        t_end = time.monotonic() + 1.5
        i = 0
        while time.monotonic() < t_end:
            burst.append(start_gpu_container(cri, pod, e2e_images, f"after-kill-{i}"))
            i += 1
        without = {cid for cid in burst if "/dev/nvidiactl" not in nvidia_devices(cri.container_spec(cid))}
        with_gpus = set(burst) - without
        assert len(without) >= 3 and len(with_gpus) >= 4, (len(without), len(with_gpus))

        plugin.start()
        summary = plugin.wait_for("containers without their GPUs found at Synchronize", count=2)
        reported = {str(r.fields["container_id"]) for r in plugin.find(REPORTED + "evicting it")}
        assert reported == without, (sorted(reported - without), sorted(without - reported))
        assert summary.fields["count"] == len(without) + 1  # + pre-existing, reported again
        for cid in without:
            plugin.wait_for("evicted GPU container without GPUs", container_id=cid, timeout=15)
        final = wait_states(
            cri,
            {
                **dict.fromkeys(without, CONTAINER_STATE_EXITED),
                **dict.fromkeys(with_gpus, CONTAINER_STATE_RUNNING),
            },
            timeout=45,  # the shim reaps a killed init and containerd records it; slow on a loaded VM
        )
        assert [c for c in without if final[c] != CONTAINER_STATE_EXITED] == []
        assert [c for c in with_gpus if final[c] != CONTAINER_STATE_RUNNING] == []
        assert state_of(cri, pre) == CONTAINER_STATE_RUNNING  # never evicted
        methods = {str(r.fields["method"]) for r in plugin.find("evicted GPU container without GPUs")}
        print(
            f"containerd {containerd.package_version}: {len(burst)} GPU creates in the burst, "
            f"{len(without)} without GPUs, all reported and evicted (method {sorted(methods)})"
        )
    finally:
        plugin.stop()
        plugin.kill()

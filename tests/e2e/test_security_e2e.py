"""Issue 12 end to end: the attacks of the adversarial run, replayed on containerd 1.7 and 2.1.

The real daemon (``nvidia-nri-plugin run``) serves a fresh fake host per test; each test plants
what an attacker on the node would and checks the final OCI spec and what the container sees.

``test_planted_ipc_symlinks_are_not_mounted``
    A local user's ``/tmp/nvidia-mps -> /etc`` and a fabricmanager socket ``-> /``: before the fix
    every compute container got ``/etc`` read-write at ``/etc`` (resp. failed to start).
``test_untrusted_ipc_entries_are_not_mounted``
    An MPS directory owned by a local user, a regular file at the persistenced socket's path, and a
    socket handed to a local user after discovery: none is mounted; GPU containers still run.
``test_broken_driver_tree_fails_gpu_containers_clearly``
    A stale ``/dev/nvidia-uvm`` major fails CUDA containers (utility ones still run), a redirected
    ``ld.so.cache`` fails GPU containers naming the missing driver library.
``test_swapped_library_is_refused_then_recovers``
    The driver root's libcuda is replaced by a symlink to a host file after discovery
    (CVE-2024-0132 class). containerd must never get that path: the create fails with a clear
    error; once the file is back, the next container is served without a restart.
``test_in_place_driver_upgrade_serves_the_next_container``
    The driver is upgraded in place to a new version (old files deleted): the very next GPU
    container is served with the new files (before: 7-10 s of failures, mounts of deleted files).
``test_hostile_flood_does_not_disconnect_the_plugin``
    Unprivileged containers with a 1.5 MiB ``CUDA_VERSION``, 1 MiB device lists and long
    requirements (refused), and GPU containers with every value at its limit (accepted), created in
    a loop beside GPU containers: no disconnect, 0 GPU containers without GPUs.
``test_registers_while_nvml_is_slow``
    nvmlInit sleeps: the plugin registers at once; a GPU container in that window fails with
    "driver discovery in progress" (instead of starting without GPUs), and works afterwards.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_plugin.request.limits import DEVICE_LIST_LIMIT
from tests.fakehost import FakeHost, upgrade_driver

from .containerd import Containerd
from .cri import ContainerRequest, CriClient, CriError, Pod
from .gpu_plugin_runner import (
    GpuPluginProcess,
    build_e2e_host,
    mounts_by_destination,
    nvidia_devices,
    run_in_pod,
)
from .images import BuiltImages

GPU_ENV = {"NVIDIA_VISIBLE_DEVICES": "0", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}
MIB = 1 << 20
USER = 1000
UNADJUSTED_MSG = (
    "GPU container is running without its GPUs (created while the plugin was not registered); recreate it"
)


@pytest.fixture
def host(e2e_base: Path) -> FakeHost:
    return build_e2e_host(e2e_base / "security", 1)


@pytest.fixture
def pod(cri: CriClient) -> Iterator[Pod]:
    with cri.pod("security") as p:
        yield p


def _plugin(containerd: Containerd, host: FakeHost, name: str) -> GpuPluginProcess:
    containerd.ensure_running()
    return GpuPluginProcess(host, containerd.nri_socket, host.root.parent / f"{name}-{containerd.version}")


def _gpu(cri: CriClient, pod: Pod, images: BuiltImages, script: str, name: str) -> tuple[dict, str, int]:  # type: ignore[type-arg]
    result = run_in_pod(
        cri,
        pod,
        ContainerRequest(
            image=images.refs["debian-layout"], command=["sh", "-c", script], env=GPU_ENV, name=name
        ),
    )
    return result.spec, result.log, result.exit_code


def _replace_with_symlink(path: Path, target: str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


def test_planted_ipc_symlinks_are_not_mounted(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    etc = host.path("/etc")
    (etc / "shadow").write_text("root:SECRET-HASH:19000::::::\n")
    _replace_with_symlink(host.path("/tmp/nvidia-mps"), "/etc")
    _replace_with_symlink(host.path("/run/nvidia-fabricmanager/socket"), "/")
    with _plugin(containerd, host, "ipc") as plugin:
        spec, log, code = _gpu(
            cri, pod, e2e_images, "cat /etc/shadow 2>&1; ls /tmp/nvidia-mps 2>&1; /usr/bin/gpu-probe", "ipc"
        )
        notes = plugin.find("host driver: refused")
    assert code == 0, log
    assert "SECRET-HASH" not in log
    assert "PROBE_OK" in log, log
    mounts = mounts_by_destination(spec)
    for dest in ("/etc", "/", "/tmp/nvidia-mps", "/run/nvidia-fabricmanager/socket"):
        assert dest not in mounts, mounts.get(dest)
    sources = {str(m.get("source", "")) for m in mounts.values()}
    assert str(etc) not in sources and str(host.root) not in sources
    assert nvidia_devices(spec), spec.get("linux")
    refused = {r.fields.get("note", "") for r in notes}
    assert any(str(n).startswith("refused ipc path /tmp/nvidia-mps:") for n in refused), refused
    assert any(str(n).startswith("refused ipc path /run/nvidia-fabricmanager/socket:") for n in refused)


def test_untrusted_ipc_entries_are_not_mounted(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    """Not symlinks this time: an MPS directory a local user owns (and filled), a regular file where
    the persistenced socket belongs; then, while the plugin runs, the trusted fabricmanager socket
    handed to a local user. None of them reaches a container; the GPU containers still run."""
    mps = host.path("/tmp/nvidia-mps")
    os.chown(mps, USER, USER)
    (mps / "control").write_text("planted by uid 1000\n")
    sock = host.path("/run/nvidia-persistenced/socket")
    sock.unlink()
    sock.write_text("planted\n")
    fabric = "/run/nvidia-fabricmanager/socket"
    with _plugin(containerd, host, "ipc-owner") as plugin:
        spec, log, code = _gpu(cri, pod, e2e_images, "ls /tmp/nvidia-mps 2>&1; /usr/bin/gpu-probe", "owner")
        assert code == 0 and "PROBE_OK" in log, log
        assert "planted" not in log and "control" not in log, log
        mounts = mounts_by_destination(spec)
        assert "/tmp/nvidia-mps" not in mounts and "/run/nvidia-persistenced/socket" not in mounts
        assert fabric in mounts, sorted(mounts)  # trusted so far
        refused = {str(r.fields.get("note", "")) for r in plugin.find("host driver: refused")}
        assert any(n.startswith("refused ipc path /tmp/nvidia-mps:") and "uid 1000" in n for n in refused)
        assert any("persistenced/socket" in n and "is a regular file, not a socket" in n for n in refused)
        # After discovery: the pinned socket's owner changes; the next container is decided again on
        # a rediscovered snapshot that refuses it.
        os.chown(host.path(fabric), USER, USER)
        spec, log, code = _gpu(cri, pod, e2e_images, "/usr/bin/gpu-probe", "chowned")
        assert code == 0 and "PROBE_OK" in log, log
        assert fabric not in mounts_by_destination(spec)
        assert plugin.find("host driver changed under a snapshot; rediscovering")


def test_broken_driver_tree_fails_gpu_containers_clearly(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    """A /dev/nvidia-uvm with a stale major, then a redirected ld.so.cache: before, CUDA
    containers started without UVM, and GPU containers with device nodes but no libraries."""
    uvm = host.path("/dev/nvidia-uvm")
    rdev = os.stat(uvm).st_rdev
    uvm.unlink()
    os.mknod(uvm, stat.S_IFCHR | 0o666, os.makedev(os.major(rdev) + 17, os.minor(rdev)))
    utility = {**GPU_ENV, "NVIDIA_DRIVER_CAPABILITIES": "utility"}
    with _plugin(containerd, host, "broken-uvm"):
        with pytest.raises(CriError) as info:
            _gpu(cri, pod, e2e_images, "true", "uvm")
        assert "/dev/nvidia-uvm exists but is wrong" in info.value.message, info.value.message
        result = run_in_pod(
            cri, pod, ContainerRequest(image=e2e_images.refs["busybox"], command=["true"], env=utility)
        )
        assert result.exit_code == 0 and nvidia_devices(result.spec)  # utility does not use UVM
    uvm.unlink()
    os.mknod(uvm, stat.S_IFCHR | 0o666, rdev)
    cache = host.path("/etc/ld.so.cache")
    cache.unlink()
    cache.symlink_to("/nonexistent/ld.so.cache")
    with _plugin(containerd, host, "broken-cache"):
        for env, wanted in ((GPU_ENV, "libcuda.so."), (utility, "libnvidia-ml.so.")):
            with pytest.raises(CriError) as info:
                run_in_pod(
                    cri, pod, ContainerRequest(image=e2e_images.refs["busybox"], command=["true"], env=env)
                )
            message = info.value.message
            assert f"the driver library {wanted}* " in message and "ld.so.cache" in message, message


def test_swapped_library_is_refused_then_recovers(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    lib = host.path(f"{host.lib_dir}/libcuda.so.{host.driver_version}")
    saved = lib.parent / "saved-libcuda"
    shutil.copy2(lib, saved)
    with _plugin(containerd, host, "swap") as plugin:
        _, log, code = _gpu(cri, pod, e2e_images, "/usr/bin/gpu-probe", "before")
        assert code == 0 and "PROBE_OK" in log, log
        # The attacker: libcuda -> a real host file outside the driver root. runc follows such a
        # symlink when it mounts; the plugin must not hand containerd that path at all.
        _replace_with_symlink(lib, "/etc/hostname")
        with pytest.raises(CriError) as info:
            _gpu(cri, pod, e2e_images, "cat /usr/lib/x86_64-linux-gnu/libcuda.so.1", "swapped")
        assert "libcuda.so" in info.value.message and "not found" in info.value.message, info.value.message
        assert plugin.find("host driver changed under a snapshot; rediscovering")
        # Repaired: the very next container is served again (rediscovery, no restart).
        lib.unlink()
        shutil.copy2(saved, lib)
        _, log, code = _gpu(cri, pod, e2e_images, "/usr/bin/gpu-probe", "after")
        assert code == 0 and "PROBE_OK" in log, log


def test_in_place_driver_upgrade_serves_the_next_container(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    """A real in-place upgrade (550.54.14 -> 560.35.03: new files, links repointed, old files deleted,
    cache rebuilt), the next GPU container created at once: it runs, with the new driver's files."""
    with _plugin(containerd, host, "upgrade") as plugin:
        _, log, code = _gpu(cri, pod, e2e_images, "/usr/bin/gpu-probe", "old")
        assert code == 0, log
        new_host = upgrade_driver(host, "560.35.03")
        assert not list(host.root.rglob("*550.54.14*"))
        spec, log, code = _gpu(
            cri, pod, e2e_images, "/usr/bin/gpu-probe; ls /usr/lib/x86_64-linux-gnu", "new"
        )
        rediscovered = plugin.find("host driver rediscovered")
    assert code == 0 and "PROBE_OK" in log, log
    mounts = mounts_by_destination(spec)
    libcuda = new_host.libraries["compute"][0]
    assert libcuda.endswith("libcuda.so.560.35.03")
    assert mounts[f"{host.lib_dir}/libcuda.so.1"]["source"] == str(new_host.path(libcuda))
    from_driver = [
        str(m["source"]) for m in mounts.values() if str(m.get("source", "")).startswith(str(host.root))
    ]
    assert from_driver and all(os.path.exists(src) for src in from_driver), from_driver
    assert not any("550.54.14" in src for src in from_driver), from_driver
    assert any(src.endswith("/lib/firmware/nvidia/560.35.03/gsp_ga10x.bin") for src in from_driver), (
        from_driver
    )
    assert "libcuda.so.560.35.03" in log and "550.54.14" not in log, log
    assert rediscovered  # on the hot path (the CreateContainer itself), not after the watch interval


def test_hostile_flood_does_not_disconnect_the_plugin(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    hostile_envs = [
        {"CUDA_VERSION": " " * (3 * MIB // 2)},
        {"NVIDIA_VISIBLE_DEVICES": "0," * (MIB // 2)},
        {"NVIDIA_VISIBLE_DEVICES": "0", "NVIDIA_REQUIRE_X": "cuda>=1.0," * (MIB // 10)},
        # ... and the worst the limits still accept (a GPU container, created): 8 190 device ids,
        # 1 024 distinct requirement terms, all true, so all evaluated.
        {
            "NVIDIA_VISIBLE_DEVICES": ",".join(["0"] * (DEVICE_LIST_LIMIT // 2 - 2)),
            **{f"NVIDIA_REQUIRE_{c}": ",".join(f"cuda>=1.{i}" for i in range(256)) for c in "ABCD"},
        },
    ]
    duration = 8.0
    stop = threading.Event()
    hostile: list[str] = []
    victims: list[bool] = []  # True: the GPU container's spec has its device nodes
    errors: list[BaseException] = []

    def attacker(seed: int) -> None:
        n = seed
        while not stop.is_set():
            env = hostile_envs[n % len(hostile_envs)]
            n += 1
            try:
                cid = cri.create_container(
                    pod, ContainerRequest(image=e2e_images.refs["busybox"], command=["true"], env=env)
                )
            except CriError as exc:
                hostile.append(exc.message)
            except BaseException as exc:
                errors.append(exc)
                return
            else:
                cri.remove_container(cid)
                hostile.append("created")

    def victim() -> None:
        while not stop.is_set():
            try:
                cid = cri.create_container(
                    pod, ContainerRequest(image=e2e_images.refs["busybox"], command=["true"], env=GPU_ENV)
                )
                try:
                    victims.append(bool(nvidia_devices(cri.container_spec(cid))))
                finally:
                    cri.remove_container(cid)
            except BaseException as exc:
                errors.append(exc)
                return

    with _plugin(containerd, host, "flood") as plugin:  # (waits for the first discovery)
        threads = [threading.Thread(target=attacker, args=(i,)) for i in range(2)]
        threads.append(threading.Thread(target=victim))
        for t in threads:
            t.start()
        time.sleep(duration)
        stop.set()
        for t in threads:
            t.join(60)
        registrations = len(plugin.find("registered"))
        disconnects = len(plugin.find("disconnected from the runtime"))
    assert not errors, errors
    assert len(victims) >= 5, victims
    assert victims.count(False) == 0, f"{victims.count(False)} of {len(victims)} GPU containers without GPUs"
    refused = [m for m in hostile if m != "created"]
    print(
        f"flood: {len(hostile)} hostile creates ({len(refused)} refused, {len(hostile) - len(refused)} "
        f"accepted at the limits), {len(victims)} GPU containers, {victims.count(False)} without GPUs"
    )
    assert refused and all("limit" in m for m in refused), {m[:160] for m in refused}
    assert len(hostile) - len(refused) >= 2, "the accepted worst case was not exercised"
    assert (registrations, disconnects) == (1, 0)


def test_registers_while_nvml_is_slow(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    host.write_nvml_config(["init_sleep 6"])
    plugin = _plugin(containerd, host, "slow-nvml")
    t0 = time.monotonic()
    try:
        plugin.start(timeout=5, wait_discovery=False)  # registered well before nvmlInit returns
        registered_after = time.monotonic() - t0
        with pytest.raises(CriError, match="driver discovery is still in progress"):
            _gpu(cri, pod, e2e_images, "true", "early")
        plugin.wait_for("host driver discovered", timeout=20)
        _, log, code = _gpu(cri, pod, e2e_images, "/usr/bin/gpu-probe", "later")
        assert code == 0 and "PROBE_OK" in log, log
    finally:
        try:
            assert plugin.stop() == 0, plugin.diagnostics()
        finally:
            plugin.kill()
    assert registered_after < 5


def test_containers_created_while_the_plugin_was_killed_are_reported(
    containerd: Containerd, cri: CriClient, pod: Pod, host: FakeHost, e2e_images: BuiltImages
) -> None:
    """NRI fails open: SIGKILL the plugin during a burst of GPU creates. Every container created
    without its GPUs is named in the restarted plugin's Synchronize report, and no other."""
    created: list[str] = []
    spans: dict[str, tuple[float, float]] = {}  # container id -> (create sent, create answered)
    stop = threading.Event()
    errors: list[BaseException] = []

    def burst() -> None:
        while not stop.is_set():
            try:
                t0 = time.monotonic()
                cid = cri.create_container(
                    pod, ContainerRequest(image=e2e_images.refs["busybox"], command=["true"], env=GPU_ENV)
                )
                spans[cid] = (t0, time.monotonic())
                created.append(cid)
            except BaseException as exc:
                if "driver discovery is still in progress" in str(exc):
                    continue  # right after a restart, by design: refused, not created without GPUs
                errors.append(exc)
                return
            time.sleep(0.02)

    plugin = _plugin(containerd, host, "churn")
    try:
        plugin.start()
        # Registration does not wait for discovery; on a loaded machine a create in between fails
        # with "driver discovery in progress" (by design), which would end the burst early.
        plugin.wait_for("host driver discovered", count=1, timeout=30)
        creator = threading.Thread(target=burst)
        creator.start()
        time.sleep(0.5)
        plugin.kill()  # SIGKILL: no goodbye to containerd
        time.sleep(1.0)
        restart_begun = time.monotonic()
        plugin.start()
        registered_at = time.monotonic()
        plugin.wait_for("host driver discovered", count=2, timeout=30)
        time.sleep(0.5)
        stop.set()
        creator.join(30)
        report = plugin.wait_for("containers without their GPUs found at Synchronize", timeout=10)
        named = {r.fields["container_id"] for r in plugin.find(UNADJUSTED_MSG)}
    finally:
        stop.set()
        try:
            assert plugin.stop() == 0, plugin.diagnostics()
        finally:
            plugin.kill()
    assert not errors, errors
    without = {cid for cid in created if not nvidia_devices(cri.container_spec(cid))}
    assert without, "no container was created while the plugin was down: the test proves nothing"
    assert len(without) < len(created)
    # A create still in flight while the plugin registers may finish after containerd listed the
    # containers for Synchronize: that one is reported by the next Synchronize only (documented).
    straddling = {c for c in without if spans[c][1] >= restart_begun and spans[c][0] <= registered_at}
    assert named <= without and without - named <= straddling, (sorted(named), sorted(without))
    assert report.fields["count"] == len(named)

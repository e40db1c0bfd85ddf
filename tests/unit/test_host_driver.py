"""HostDriver: O(1) snapshot, refresh/changed fingerprinting, watch loop, failures keep old state."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.discover import discover
from nri_plugin.host.driver import HostDriver, fingerprint
from nri_plugin.host.model import DriverSnapshot, HostRoots
from tests.fakehost import FakeHost, FakeMig, build_fake_host, make_gpus


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return build_fake_host(tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("utility", "compute"))


def test_snapshot_none_before_first_refresh(host: FakeHost) -> None:
    drv = HostDriver(host.roots, use_nvml=False)
    assert drv.snapshot() is None and drv.changed()


def test_refresh_and_changed(host: FakeHost) -> None:
    drv = HostDriver(host.roots, use_nvml=False)
    assert drv.refresh() is True
    snap = drv.snapshot()
    assert snap is not None and len(snap.gpus) == 1
    assert drv.snapshot() is snap  # the same object: no work on the hot path
    assert not drv.changed()
    assert drv.refresh() is False  # nothing changed: equal snapshot
    # A new GPU appears (node + procfs dir): changed() notices, refresh() reports a difference.
    extra = make_gpus(2)[1]
    os.mknod(host.path("/dev/nvidia1"), stat.S_IFCHR | 0o666, os.makedev(195, 1))
    assert drv.changed()
    proc_src = host.proc(f"driver/nvidia/gpus/{host.gpus[0].proc_dir()}/information").read_text()
    d = host.proc(f"driver/nvidia/gpus/{extra.proc_dir()}")
    d.mkdir()
    (d / "information").write_text(
        proc_src.replace(host.gpus[0].uuid, extra.uuid)
        .replace(host.gpus[0].proc_dir(), extra.proc_dir())
        .replace("Device Minor: \t 0", "Device Minor: \t 1")
    )
    assert drv.refresh() is True
    new = drv.snapshot()
    assert new is not None and [g.minor for g in new.gpus] == sorted([0, 1])
    assert "/dev/nvidia1" in new.device_nodes
    assert not drv.changed()


def test_changed_on_driver_version_file(host: FakeHost) -> None:
    drv = HostDriver(host.roots, use_nvml=False)
    drv.refresh()
    version = host.proc("driver/nvidia/version")
    version.write_text(version.read_text() + "\n")
    assert drv.changed()
    version.unlink()
    assert drv.changed()


def test_changed_on_ldcache_rewrite(host: FakeHost) -> None:
    drv = HostDriver(host.roots, use_nvml=False)
    drv.refresh()
    time.sleep(0.01)
    host.run_ldconfig()
    assert drv.changed()


def test_failed_refresh_keeps_previous_snapshot(host: FakeHost) -> None:
    drv = HostDriver(host.roots, use_nvml=False)
    drv.refresh()
    good = drv.snapshot()
    host.path("/etc/ld.so.cache").write_bytes(b"broken")
    assert drv.refresh() is False
    assert drv.snapshot() is good
    assert drv.last_error is not None and "ld.so.cache" in drv.last_error
    host.run_ldconfig()
    drv.refresh()
    assert drv.last_error is None


def test_no_driver_reason(tmp_path: Path) -> None:
    roots = HostRoots(
        driver_root=str(tmp_path),
        dev_root=str(tmp_path),
        proc_root=str(tmp_path / "proc"),
        run_root=str(tmp_path),
    )
    drv = HostDriver(roots)
    assert drv.refresh() is False  # None -> None
    assert drv.snapshot() is None
    assert drv.no_driver_reason is not None and "no NVIDIA driver found" in drv.no_driver_reason


def test_discover_kwargs_are_passed(host: FakeHost) -> None:
    seen: list[dict[str, Any]] = []

    def fake_discover(roots: HostRoots, **kwargs: Any) -> DriverSnapshot | None:
        seen.append(kwargs)
        return discover(roots, **kwargs)

    drv = HostDriver(host.roots, discover_fn=fake_discover, use_nvml=False, mps_pipe_dir="/x")
    drv.refresh()
    assert seen == [{"use_nvml": False, "mps_pipe_dir": "/x"}]


def test_fingerprint_is_stable_and_cheap(host: FakeHost) -> None:
    a = fingerprint(host.roots)
    assert a == fingerprint(host.roots)
    assert any(path.endswith("/dev/nvidia0") for path, _ in a)


def test_watch_refreshes_in_background(host: FakeHost) -> None:
    calls: list[float] = []

    def counting(roots: HostRoots, **kwargs: Any) -> DriverSnapshot | None:
        calls.append(time.monotonic())
        return discover(roots, **kwargs)

    drv = HostDriver(host.roots, discover_fn=counting, use_nvml=False)

    async def scenario() -> None:
        task = asyncio.create_task(drv.watch(interval=0.02))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if drv.snapshot() is not None:
                break
        assert drv.snapshot() is not None and len(calls) == 1
        await asyncio.sleep(0.1)
        assert len(calls) == 1  # unchanged host: no re-discovery
        os.unlink(host.path("/dev/nvidia0"))
        for _ in range(200):
            await asyncio.sleep(0.01)
            snap = drv.snapshot()
            if snap is not None and "/dev/nvidia0" not in snap.device_nodes:
                break
        assert len(calls) == 2
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_watch_survives_errors(host: FakeHost) -> None:
    def boom(roots: HostRoots, **kwargs: Any) -> DriverSnapshot | None:
        raise HostDiscoveryError("simulated unreadable tree")

    drv = HostDriver(host.roots, discover_fn=boom)

    async def scenario() -> None:
        task = asyncio.create_task(drv.watch(interval=0.01))
        await asyncio.sleep(0.1)
        assert not task.done()
        task.cancel()

    asyncio.run(scenario())
    assert drv.last_error is not None and "simulated unreadable tree" in drv.last_error
    assert drv.snapshot() is None


def test_changed_on_mig_reconfiguration(tmp_path: Path) -> None:
    """Creating or destroying MIG instances changes the MIG devices (UUIDs, GI/CI ids, hence
    the capability minors a container gets) but not the GPU list, the version file, the ld.so.cache
    or -- once nvidia-modprobe has created them -- the /dev/nvidia-caps nodes.  The driver's
    per-instance capability entries under /proc/driver/nvidia/capabilities/gpu<M>/mig/ do change;
    without them in the fingerprint the stale snapshot (old MIG layout) would be served forever."""
    gpus = make_gpus(1)
    gpus[0].mig = [FakeMig(gi=1, ci=0, uuid="MIG-0b0b0b0b-1111-2222-3333-444444444444")]
    host = build_fake_host(tmp_path / "r", gpus=gpus, capabilities_libs=("utility", "compute"))
    drv = HostDriver(host.roots, use_nvml=False)
    drv.refresh()
    assert not drv.changed()
    mig_dir = host.proc("driver/nvidia/capabilities/gpu0/mig")
    # nvidia-smi mig -cgi ... -C: a new GPU instance gi2 with compute instance ci0.
    (mig_dir / "gi2/ci0").mkdir(parents=True)
    (mig_dir / "gi2/access").write_text("DeviceFileMinor: 21\nDeviceFileMode: 292\n")
    (mig_dir / "gi2/ci0/access").write_text("DeviceFileMinor: 22\nDeviceFileMode: 292\n")
    assert drv.changed()
    drv.refresh()
    assert not drv.changed()
    # nvidia-smi mig -dci -ci 0 -gi 1: the compute instance goes away, its GPU instance stays.
    (mig_dir / "gi1/ci0/access").unlink()
    (mig_dir / "gi1/ci0").rmdir()
    assert drv.changed()


def test_watch_polls_the_fingerprint_off_the_event_loop(host: FakeHost) -> None:
    """The fingerprint stats and lists files below the roots (a driver root may sit on a slow
    or hung filesystem); CreateContainer is served on the event loop, so the poll must not
    run there."""
    import threading

    drv = HostDriver(host.roots, use_nvml=False)
    drv.refresh()
    threads: list[threading.Thread] = []
    real_changed = drv.changed

    def recording_changed() -> bool:
        threads.append(threading.current_thread())
        return real_changed()

    drv.changed = recording_changed  # type: ignore[method-assign]

    async def scenario() -> threading.Thread:
        task = asyncio.create_task(drv.watch(interval=0.01))
        for _ in range(200):
            await asyncio.sleep(0.01)
            if threads:
                break
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return threading.current_thread()

    loop_thread = asyncio.run(scenario())
    assert threads and all(t is not loop_thread for t in threads)

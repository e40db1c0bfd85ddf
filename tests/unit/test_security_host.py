"""Issue 12, host side: IPC paths a local user can plant, files swapped after discovery, bad nodes.

Each test reproduces an attack (or an accident) on a fake host and checks what the plugin hands
containerd: never a host path outside the discovered, pinned sources, never a writable mount at a
path the attacker chose, and a clear error where a GPU container cannot be served.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from nri_plugin import config as cfg
from nri_plugin import logs
from nri_plugin.adjust.build import build_adjustment, plan
from nri_plugin.adjust.model import IPC_BIND_OPTIONS
from nri_plugin.adjust.pipeline import decide
from nri_plugin.errors import (
    ContainerError,
    DiscoveryFailedError,
    DiscoveryPendingError,
    DriverChangedError,
    HostDiscoveryError,
)
from nri_plugin.host.discover import discover
from nri_plugin.host.driver import HostDriver
from nri_plugin.host.model import DriverSnapshot, IpcPath
from nri_plugin.host.nvml import query_nvml
from nri_plugin.host.pin import pin
from nri_plugin.plugin import GpuPlugin
from nri_plugin.request.model import GpuRequest, HookConfig
from nri_plugin.wire._gen import api_pb2 as api
from tests.fakehost.builder import FakeHost, build_fake_host, make_gpus, root_flags, upgrade_driver
from tests.fakemetrics import RecordingMetrics

ALL_CAPS = "compute,compat32,graphics,utility,video,display,ngx"
USER = 1000


def _host(tmp_path: Path, **kwargs: object) -> FakeHost:
    """A fake host whose directories look installed a minute ago (see ``_settle``)."""
    host = build_fake_host(tmp_path / "root", gpus=make_gpus(1), **kwargs)  # type: ignore[arg-type]
    _settle(host)
    return host


def _snap(host: FakeHost, **kwargs: object) -> DriverSnapshot:
    snap = discover(host.roots, use_nvml=False, **kwargs)  # type: ignore[arg-type]
    assert snap is not None
    return snap


def _request(caps: str = "utility,compute") -> GpuRequest:
    return GpuRequest("0", "", "", caps, (), False)


def _ipc_mounts(snap: DriverSnapshot) -> dict[str, str]:
    adj = build_adjustment(_request(ALL_CAPS), snap)
    return {m.destination: m.source for m in adj.mounts if m.options == IPC_BIND_OPTIONS}


def _replace_with_symlink(path: Path, target: str) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target)


# --- 1. IPC paths -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc", "/", "../../etc"])
def test_mps_dir_symlink_is_refused(tmp_path: Path, target: str) -> None:
    host = _host(tmp_path)
    host.path("/etc").mkdir(exist_ok=True)
    _replace_with_symlink(host.path("/tmp/nvidia-mps"), target)
    snap = _snap(host)
    assert snap.mps_pipe_dir is None
    assert any(
        n.startswith("refused ipc path /tmp/nvidia-mps:") and "is a symlink" in n for n in snap.missing
    )
    mounts = _ipc_mounts(snap)
    assert "/tmp/nvidia-mps" not in mounts
    assert "/etc" not in mounts and "/" not in mounts
    # nothing writable points at the symlink's target, whatever its destination
    assert all(not src.endswith("/etc") and src != str(host.root) for src in mounts.values())


SOCKETS = ["/run/nvidia-persistenced/socket", "/run/nvidia-fabricmanager/socket"]


@pytest.mark.parametrize("target", ["/etc", "/"])
@pytest.mark.parametrize("candidate", SOCKETS)
def test_socket_symlink_is_refused(tmp_path: Path, candidate: str, target: str) -> None:
    host = _host(tmp_path)
    host.path("/etc").mkdir(exist_ok=True)
    assert candidate in _ipc_mounts(_snap(host))  # the fake host serves it before the attack
    _replace_with_symlink(host.path(candidate), target)
    snap = _snap(host)
    assert any(
        n.startswith(f"refused ipc path {candidate}:") and "is a symlink" in n for n in snap.missing
    ), snap.missing
    mounts = _ipc_mounts(snap)
    assert candidate not in mounts
    assert all(not src.endswith("/etc") and src != str(host.root) for src in mounts.values())


@pytest.mark.parametrize("candidate", SOCKETS)
def test_socket_owned_by_a_local_user_is_refused(tmp_path: Path, candidate: str) -> None:
    """A socket in a root-owned directory, but owned by a local user (who could not have created
    it there: a leftover of a mis-configured daemon, or a reused name), is not mounted."""
    host = _host(tmp_path)
    os.chown(host.path(candidate), USER, USER)
    snap = _snap(host)
    assert any(
        n.startswith(f"refused ipc path {candidate}:") and "owned by uid 1000, not root" in n
        for n in snap.missing
    ), snap.missing
    assert candidate not in _ipc_mounts(snap)


def test_mps_dir_owned_by_a_local_user_is_refused(tmp_path: Path) -> None:
    host = _host(tmp_path)
    os.chown(host.path("/tmp/nvidia-mps"), USER, USER)
    snap = _snap(host)
    assert snap.mps_pipe_dir is None
    assert any("owned by uid 1000, not root" in n for n in snap.missing), snap.missing
    assert "/tmp/nvidia-mps" not in _ipc_mounts(snap)


def test_regular_file_is_not_a_socket_and_socket_is_not_a_dir(tmp_path: Path) -> None:
    host = _host(tmp_path)
    sock = host.path("/run/nvidia-persistenced/socket")
    sock.unlink()
    sock.write_text("not a socket")
    shutil.rmtree(host.path("/tmp/nvidia-mps"))
    os.mknod(host.path("/tmp/nvidia-mps"), stat.S_IFSOCK | 0o600)
    snap = _snap(host)
    assert snap.persistenced_socket is None and snap.mps_pipe_dir is None
    assert any("is a regular file, not a socket" in n for n in snap.missing), snap.missing
    assert any("is a socket, not a directory" in n for n in snap.missing), snap.missing


def test_regular_file_at_the_mps_dir_path_is_refused(tmp_path: Path) -> None:
    host = _host(tmp_path)
    shutil.rmtree(host.path("/tmp/nvidia-mps"))
    host.path("/tmp/nvidia-mps").write_text("planted")
    snap = _snap(host)
    assert snap.mps_pipe_dir is None
    assert any(
        n.startswith("refused ipc path /tmp/nvidia-mps:") and "is a regular file, not a directory" in n
        for n in snap.missing
    ), snap.missing
    assert "/tmp/nvidia-mps" not in _ipc_mounts(snap)


@pytest.mark.parametrize("entry", ["/tmp/nvidia-mps", "/run/nvidia-persistenced/socket"])
def test_ipc_entry_handed_to_someone_else_after_discovery_is_refused(tmp_path: Path, entry: str) -> None:
    """The owner was trusted at discovery; the per-container check compares the owner too, so a
    pinned IPC entry given to a local user (or a new one on a reused inode) is not mounted."""
    host = _host(tmp_path)
    driver = HostDriver(host.roots, use_nvml=False)
    driver.refresh()
    snap = driver.snapshot()
    assert snap is not None and entry in _ipc_mounts(snap)
    _decide(snap)
    assert not driver.changed()
    os.chown(host.path(entry), USER, USER)
    with pytest.raises(DriverChangedError, match=f"{entry} changed owner \\(uid 1000, was 0\\)"):
        _decide(snap)
    assert driver.changed()  # the watch loop sees it too
    driver.refresh()
    new = driver.snapshot()
    assert new is not None
    # rediscovery refuses the entry now, and GPU containers are served without it
    assert entry not in _ipc_mounts(new)
    assert any(n.startswith(f"refused ipc path {entry}:") for n in new.missing), new.missing
    _decide(new)


def test_privilege_dropping_daemon_socket_is_accepted(tmp_path: Path) -> None:
    """``nvidia-persistenced --user nvpd`` owns its run directory and socket: trusted, since only
    root can create a directory in /run."""
    host = _host(tmp_path)
    run_dir = host.path("/run/nvidia-persistenced")
    os.chown(run_dir, USER, USER)
    os.chmod(run_dir, 0o755)
    os.chown(run_dir / "socket", USER, USER)
    os.chmod(host.path("/run"), 0o755)
    snap = _snap(host)
    assert snap.persistenced_socket is not None
    # ... but not when the directory is writable by others, or in a world-writable parent
    os.chmod(run_dir, 0o777)
    assert _snap(host).persistenced_socket is None
    os.chmod(run_dir, 0o755)
    os.chmod(host.path("/run"), 0o1777)
    assert _snap(host).persistenced_socket is None


def test_symlinked_parent_only_when_root_owned(tmp_path: Path) -> None:
    host = _host(tmp_path, with_sockets=False)
    host.path("/run/nvidia-persistenced").mkdir(parents=True)
    os.mknod(host.path("/run/nvidia-persistenced/socket"), stat.S_IFSOCK | 0o666)
    host.path("/var").mkdir(exist_ok=True)
    os.symlink("/run", host.path("/var/run"))  # as on every systemd host
    found = _snap(host).persistenced_socket
    assert found == IpcPath(
        "/run/nvidia-persistenced/socket", str(host.path("/run/nvidia-persistenced/socket"))
    )
    shutil.rmtree(host.path("/run/nvidia-persistenced"))
    host.path("/srv/p").mkdir(parents=True)
    os.mknod(host.path("/srv/p/socket"), stat.S_IFSOCK | 0o666)
    os.symlink("/srv/p", host.path("/run/nvidia-persistenced"))
    os.lchown(host.path("/run/nvidia-persistenced"), USER, USER)
    snap = _snap(host)
    assert snap.persistenced_socket is None
    assert any("is a symlink owned by uid 1000, not root" in n for n in snap.missing), snap.missing


def test_ipc_destination_is_the_fixed_container_path(tmp_path: Path) -> None:
    host = _host(tmp_path)
    mounts = _ipc_mounts(_snap(host))
    assert mounts == {
        "/run/nvidia-persistenced/socket": str(host.path("/run/nvidia-persistenced/socket")),
        "/run/nvidia-fabricmanager/socket": str(host.path("/run/nvidia-fabricmanager/socket")),
        "/tmp/nvidia-mps": str(host.path("/tmp/nvidia-mps")),
    }


# --- 2. pinned mount sources -------------------------------------------------------------------


def _settle(host: FakeHost) -> None:
    """Age every directory of the fake host, as on a node where the driver was installed earlier."""
    old = time.time() - 60
    for path in (host.root, *host.root.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            os.utime(path, (old, old))


def test_every_mount_source_is_pinned(tmp_path: Path) -> None:
    host = _host(tmp_path, compat32=True)
    _settle(host)
    snap = _snap(host)
    chosen = plan(_request(ALL_CAPS), snap)
    assert chosen.unpinned == ()
    checked = {c.path: c for c in chosen.checks}
    assert len(checked) == len(chosen.checks)  # shared directories are checked once
    for mount in chosen.adjustment.mounts:
        if mount.options == IPC_BIND_OPTIONS:  # IPC entries: the entry itself, inode and type only
            assert checked[mount.source].stamp_ns == 0, mount
        else:  # driver files: through their directory, with its ctime
            assert checked[os.path.dirname(mount.source)].stamp_ns, mount
    # the directories on the way are not re-checked on the hot path (see hot_path_checks), but
    # they are pinned, and the watch loop checks them
    chains = [snap.pins[m.source] for m in chosen.adjustment.mounts]
    assert all(chain[0].path == str(host.root) and chain[0].follow for chain in chains)
    # One check per directory of read-only sources (~70 driver and graphics files in lib64, lib32,
    # bin, firmware and the ICD/X.Org directories) plus one per IPC entry, nothing else.
    wanted = {
        m.source if m.options == IPC_BIND_OPTIONS else os.path.dirname(m.source)
        for m in chosen.adjustment.mounts
    }
    assert set(checked) == wanted and len(wanted) < 20, sorted(checked)


def _decide(snap: DriverSnapshot, caps: str = "utility,compute") -> None:
    env = ["NVIDIA_VISIBLE_DEVICES=0", f"NVIDIA_DRIVER_CAPABILITIES={caps}"]
    decide(env, [], False, HookConfig(), snap)


def test_library_swapped_for_a_symlink_is_refused(tmp_path: Path) -> None:
    host = _host(tmp_path)
    _settle(host)
    driver = HostDriver(host.roots, use_nvml=False)
    driver.refresh()
    snap = driver.snapshot()
    assert snap is not None and not driver.changed()
    _decide(snap)  # fine before
    lib = host.path(f"{host.lib_dir}/libcuda.so.{host.driver_version}")
    secret = host.path("/etc/shadow")
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("root:x:::")
    _replace_with_symlink(lib, "/etc/shadow")
    with pytest.raises(
        DriverChangedError, match=rf"{lib.parent} changed \(entries were added, removed or replaced\)"
    ):
        _decide(snap)
    # the watch loop sees it too (the ld.so.cache and /dev did not change)
    assert driver.changed()


def test_directory_swapped_for_a_symlink_is_refused(tmp_path: Path) -> None:
    host = _host(tmp_path)
    snap = _snap(host)
    lib_dir = host.path(host.lib_dir)
    copy = host.path("/srv/evil")
    shutil.copytree(lib_dir, copy, symlinks=True)
    lib_dir.rename(host.path("/srv/orig"))
    lib_dir.symlink_to("/srv/evil")
    with pytest.raises(DriverChangedError, match=f"{lib_dir} is now a symlink, was a directory"):
        _decide(snap)


def test_ancestor_swapped_for_a_symlink_is_refused(tmp_path: Path) -> None:
    """/usr replaced by a symlink to a copy: the library directory resolves to another inode."""
    host = _host(tmp_path)
    snap = _snap(host)
    usr = host.path("/usr")
    shutil.copytree(usr, host.path("/evil-usr"), symlinks=True)
    usr.rename(host.path("/orig-usr"))
    usr.symlink_to("evil-usr")  # relative: resolves inside the fake root, to the copy
    with pytest.raises(DriverChangedError, match="was replaced"):
        _decide(snap)


def test_upgraded_file_is_refused_and_rediscovered(tmp_path: Path) -> None:
    """An in-place upgrade replaces the files: the old snapshot must not mount them; the plugin
    rediscovers at once and the very same CreateContainer succeeds on the new snapshot."""
    host = _host(tmp_path)
    plugin = _plugin(host)
    lib = host.path(f"{host.lib_dir}/libnvidia-ml.so.{host.driver_version}")
    data = lib.read_bytes()
    lib.unlink()
    with pytest.raises(DriverChangedError, match="entries were added, removed or replaced"):
        _decide(plugin.driver.snapshot() or pytest.fail("no snapshot"))
    lib.write_bytes(data)  # the new file: same name, new inode
    resp = asyncio.run(plugin.create_container(POD, _container()))
    assert any(m.source == str(lib) for m in resp.adjust.mounts)
    records = [json.loads(line) for line in plugin.log_buf.getvalue().splitlines()]  # type: ignore[attr-defined]
    assert any(r["msg"] == "host driver changed under a snapshot; rediscovering" for r in records)
    assert any(r["msg"] == "host driver rediscovered" for r in records)


def test_upgrade_to_a_new_driver_version_serves_the_very_next_container(tmp_path: Path) -> None:
    """The fault of the issue: a real in-place upgrade (new version, old files deleted, links and
    cache rewritten). The old snapshot names deleted files; before pinning, containers got mounts
    of them for 7-10 s (until the watch noticed). Now the next create is served with the new ones."""
    host = _host(tmp_path)
    plugin = _plugin(host)
    old = plugin.driver.snapshot() or pytest.fail("no snapshot")
    first = asyncio.run(plugin.create_container(POD, _container()))
    assert any(m.source.endswith("libcuda.so.550.54.14") for m in first.adjust.mounts)
    new_host = upgrade_driver(host, "560.35.03")
    assert not list(host.root.rglob("*550.54.14*"))
    with pytest.raises(DriverChangedError):
        _decide(old)  # the old snapshot is never mounted from again
    resp = asyncio.run(plugin.create_container(POD, _container()))
    sources = [m.source for m in resp.adjust.mounts]
    assert str(new_host.path(new_host.libraries["compute"][0])) in sources
    assert all(os.path.exists(src) for src in sources), [s for s in sources if not os.path.exists(s)]
    assert not any("550.54.14" in src for src in sources)
    assert any(src.endswith("/lib/firmware/nvidia/560.35.03/gsp_ga10x.bin") for src in sources), sources
    snap = plugin.driver.snapshot()
    assert snap is not None and snap.driver_version == "560.35.03"


def test_swapped_library_fails_the_container_after_rediscovery(tmp_path: Path) -> None:
    host = _host(tmp_path)
    plugin = _plugin(host)
    lib = host.path(f"{host.lib_dir}/libcuda.so.{host.driver_version}")
    host.path("/etc").mkdir(exist_ok=True)
    host.path("/etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    _replace_with_symlink(lib, "/etc/passwd")
    with pytest.raises(ContainerError, match=r"driver library libcuda\.so\.\* .* was not found"):
        asyncio.run(plugin.create_container(POD, _container()))


POD = api.PodSandbox(id="pod", name="p", namespace="ns")


def _container(caps: str = "utility,compute") -> api.Container:
    return api.Container(
        id="c1", name="c", env=["NVIDIA_VISIBLE_DEVICES=0", f"NVIDIA_DRIVER_CAPABILITIES={caps}"]
    )


def _plugin(host: FakeHost, *, discover: bool = True, extra: dict[str, object] | None = None) -> GpuPlugin:
    flags = cfg.layer_from_flags(
        {
            **root_flags(host.root),
            "nri-plugin.use-nvml": False,
            **(extra or {}),
        }
    )
    buf = io.StringIO()
    plugin = GpuPlugin(
        file_layer=cfg.Layer("test file"),
        flag_layer=flags,
        logger=logs.Logger(logs.StreamSink(buf, "json"), logs.Level.INFO),
    )
    plugin.log_buf = buf  # type: ignore[attr-defined]
    if discover:
        asyncio.run(plugin.discover())
    return plugin


# --- libraries and device nodes that are there but wrong -----------------------------------------


def test_no_libraries_fails_instead_of_starting_without_driver(tmp_path: Path) -> None:
    host = _host(tmp_path)
    cache = host.path("/etc/ld.so.cache")
    cache.unlink()
    cache.symlink_to("/nonexistent/ld.so.cache")  # redirected: discovery falls back to /proc
    snap = discover(host.roots, use_nvml=False)
    assert snap is not None and not snap.libraries
    with pytest.raises(ContainerError, match=r"'compute', but the driver library libcuda\.so\.\*"):
        _decide(snap)
    with pytest.raises(ContainerError, match=r"'utility', but the driver library libnvidia-ml\.so\.\*"):
        _decide(snap, "utility")
    # capabilities without one key library fail too when no driver library was found at all
    for caps in ("graphics", "video", "display", "graphics,display,video,ngx"):
        with pytest.raises(ContainerError, match=r"includes '\w+', but no driver library at all"):
            _decide(snap, caps)


def test_libraries_missing_mid_upgrade_rediscover_for_graphics_only_requests_too(tmp_path: Path) -> None:
    """Every driver library a dangling link at discovery (caught mid-upgrade): once the files are
    back, a graphics-only request rediscovers (DriverChangedError) instead of failing, as compute
    and utility requests already did."""
    host = _host(tmp_path)
    saved = {}
    for group in host.libraries.values():
        for rel in group:
            path = host.path(rel)
            saved[path] = path.read_bytes()
            path.unlink()
    snap = _snap(host)
    assert not any(snap.libraries.values()) and snap.rejected
    with pytest.raises(ContainerError, match="no driver library at all"):
        _decide(snap, "graphics")
    for path, data in saved.items():
        path.write_bytes(data)
    for caps in ("graphics", "compute,utility"):
        with pytest.raises(DriverChangedError, match="unusable at discovery and has changed since"):
            _decide(snap, caps)


@pytest.mark.parametrize("damage", ["unreadable", "truncated", "garbage", "empty"])
def test_broken_ld_so_cache_fails_gpu_containers_with_a_clear_error(tmp_path: Path, damage: str) -> None:
    """Not redirected this time: the driver root's cache exists but cannot be read or parsed."""
    host = _host(tmp_path)
    cache = host.path("/etc/ld.so.cache")
    data = cache.read_bytes()
    if damage == "unreadable":
        cache.unlink()
        cache.mkdir()  # EISDIR on read, even for root
    elif damage == "truncated":
        cache.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        cache.write_bytes(b"\x00" * len(data))
    else:
        cache.write_bytes(b"")
    driver = HostDriver(host.roots, use_nvml=False)
    driver.refresh()
    if damage == "unreadable":  # read fails: discovery goes on without the cache, finds no library
        snap = driver.snapshot()
        assert snap is not None and not any(snap.libraries.values())
        for caps in ("compute,utility", "utility", "graphics"):
            with pytest.raises(ContainerError, match="driver librar"):
                _decide(snap, caps)
        return
    # not a cache at all: discovery fails, and GPU containers are told why (not "no driver")
    assert driver.snapshot() is None and driver.discovery_error is not None
    assert "ld.so.cache" in driver.discovery_error
    env = ["NVIDIA_VISIBLE_DEVICES=0", "NVIDIA_DRIVER_CAPABILITIES=graphics"]
    with pytest.raises(DiscoveryFailedError, match=r"driver discovery fails on this node \(.*ld\.so\.cache"):
        decide(env, [], True, HookConfig(), None, discovery_error=driver.discovery_error)
    assert (
        decide(["PATH=/bin"], [], True, HookConfig(), None, discovery_error=driver.discovery_error).request
        is None
    )


def test_wrong_uvm_major_fails_the_container(tmp_path: Path) -> None:
    host = _host(tmp_path)
    uvm = host.path("/dev/nvidia-uvm")
    uvm.unlink()
    os.mknod(uvm, stat.S_IFCHR | 0o666, os.makedev(499, 0))
    snap = _snap(host)
    assert "/dev/nvidia-uvm" in snap.invalid_nodes
    with pytest.raises(ContainerError, match=r"unified memory device.*/dev/nvidia-uvm exists but is wrong"):
        _decide(snap)
    _decide(snap, "utility")  # utility does not use UVM


def test_absent_uvm_is_still_optional(tmp_path: Path) -> None:
    host = _host(tmp_path)
    host.path("/dev/nvidia-uvm").unlink()
    host.path("/dev/nvidia-uvm-tools").unlink()
    _decide(_snap(host))


def test_socket_mount_source_is_a_real_socket(tmp_path: Path) -> None:
    """A real listening socket (as persistenced makes) passes the checks and is pinned."""
    host = _host(tmp_path, with_sockets=False)
    path = host.path("/run/nvidia-persistenced/socket")
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        snap = _snap(host)
        assert snap.persistenced_socket is not None
        assert str(path) in snap.pins


# --- the NVML helper runs isolated ------------------------------------------------------------


def test_nvml_helper_ignores_cwd_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = build_fake_host(tmp_path / "root", gpus=make_gpus(1), capabilities_libs=("utility",))
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "pwned"
    for name in ("pynvml.py", "json.py", "argparse.py"):
        (evil / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    monkeypatch.chdir(evil)
    monkeypatch.setenv("PYTHONPATH", str(evil))
    monkeypatch.setenv("PYTHONSTARTUP", str(evil / "pynvml.py"))
    lib = str(host.path(f"{host.lib_dir}/libnvidia-ml.so.1"))
    info = query_nvml(lib)
    assert [g.uuid for g in info.gpus] == [g.uuid for g in host.gpus]
    assert not marker.exists()


# --- registration does not wait for discovery -------------------------------------------------


def test_a_watch_failure_is_not_what_gpu_containers_are_told(tmp_path: Path) -> None:
    """Only discovery's own failure reaches a GPU container; a failed watch iteration on a node
    without a driver leaves it told "no NVIDIA driver" (its watch never refreshes)."""
    host = _host(tmp_path)
    plugin = _plugin(host, discover=False)
    shutil.rmtree(host.path("/proc/driver"))
    for lib in host.path(host.lib_dir).glob("lib*.so*"):
        lib.unlink()
    host.run_ldconfig()
    plugin.driver.refresh()
    assert plugin.driver.snapshot() is None and plugin.driver.discovery_error is None
    plugin.driver.last_error = "host driver watch failed: OSError('stat')"  # what watch() records
    with pytest.raises(ContainerError, match="no NVIDIA driver was found"):
        asyncio.run(plugin.create_container(POD, _container()))
    records = [json.loads(line) for line in plugin.log_buf.getvalue().splitlines()]  # type: ignore[attr-defined]
    refused = [r for r in records if r["msg"] == "GPU container refused"]
    assert refused and refused[-1]["reason"] == "DriverNotFoundError", refused


def test_cancelling_the_watch_does_not_cancel_a_create_waiting_for_the_refresh(tmp_path: Path) -> None:
    """The watch and a CreateContainer that found a swapped file share one refresh; a Configure
    that restarts the watch (or close) cancels the watch task, never that create's wait."""
    host = _host(tmp_path)
    gate = threading.Event()

    def slow_discover(*args: object, **kwargs: object) -> DriverSnapshot | None:
        gate.wait(10)
        return discover(host.roots, use_nvml=False)

    driver = HostDriver(host.roots, discover_fn=slow_discover)

    async def scenario() -> bool:
        watch = asyncio.get_running_loop().create_task(driver.watch(0.01))
        await asyncio.sleep(0.05)  # the watch has started the shared refresh and awaits it
        waiting = asyncio.get_running_loop().create_task(driver.refresh_soon(5.0))
        await asyncio.sleep(0.05)
        watch.cancel()
        await asyncio.sleep(0.05)
        gate.set()
        result = await waiting  # neither cancelled nor raising
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        return result

    assert asyncio.run(scenario()) is True
    assert driver.snapshot() is not None


def test_nvml_timeout_is_a_setting(tmp_path: Path) -> None:
    """A hung nvmlInit costs discovery ``nvml-timeout`` seconds, then /proc is used; the note names
    the setting to raise (the text named one that could not be set before)."""
    host = _host(tmp_path)
    host.write_nvml_config(["init_sleep 30"])
    plugin = _plugin(
        host, discover=False, extra={"nri-plugin.use-nvml": True, "nri-plugin.nvml-timeout": 0.5}
    )
    assert plugin.settings.nvml_timeout == 0.5
    t0 = time.monotonic()
    assert plugin.driver.refresh()
    elapsed = time.monotonic() - t0
    snap = plugin.driver.snapshot()
    assert snap is not None and snap.source == "proc", snap
    assert any("did not finish within 0.5s" in n and "nvml-timeout" in n for n in snap.missing), snap.missing
    assert elapsed < 10, elapsed  # 0.5 s, not the default 20 s (nor the 30 s the hang lasts)


def _plugin_with_slow_discovery(host: FakeHost) -> tuple[GpuPlugin, threading.Event]:
    """A plugin whose first discovery blocks until the returned event is set."""
    release = threading.Event()

    def slow_discover(roots: object, **kwargs: object) -> DriverSnapshot | None:
        release.wait(10)
        return discover(host.roots, use_nvml=False)

    plugin = _plugin(host, discover=False)
    plugin.driver = HostDriver(host.roots, discover_fn=slow_discover)
    return plugin, release


def test_gpu_container_fails_while_discovery_is_pending(tmp_path: Path) -> None:
    host = _host(tmp_path)
    plugin, release = _plugin_with_slow_discovery(host)

    async def scenario() -> None:
        await plugin.discover(budget=0.05)  # returns: discovery goes on in the background
        assert plugin.driver.pending
        with pytest.raises(DiscoveryPendingError, match="driver discovery is still in progress"):
            await plugin.create_container(POD, _container())
        # a container that asks for no GPU is not affected
        assert await plugin.create_container(POD, api.Container(id="x", env=["PATH=/bin"])) == (
            api.CreateContainerResponse()
        )
        release.set()
        for _ in range(200):
            if not plugin.driver.pending:
                break
            await asyncio.sleep(0.01)
        resp = await plugin.create_container(POD, _container())
        assert len(resp.adjust.linux.devices) >= 2

    asyncio.run(scenario())


# --- containers created while the plugin was away are reported at Synchronize ----------------


def test_synchronize_reports_gpu_containers_without_gpus(tmp_path: Path) -> None:
    host = _host(tmp_path)
    plugin = _plugin(host)
    metrics = RecordingMetrics()
    plugin.metrics = metrics
    pod = api.PodSandbox(id="p1", name="trainer", namespace="ml")
    served = api.Container(id="c-ok", pod_sandbox_id="p1", name="ok", env=["NVIDIA_VISIBLE_DEVICES=0"])
    served.linux.devices.add(path="/dev/nvidiactl", type="c", major=195, minor=255)
    missed = api.Container(
        id="c-missed", pod_sandbox_id="p1", name="missed", env=["NVIDIA_VISIBLE_DEVICES=0"]
    )
    cpu = api.Container(id="c-cpu", pod_sandbox_id="p1", name="cpu", env=["PATH=/bin"])
    stopped = api.Container(
        id="c-stopped", pod_sandbox_id="p1", env=["NVIDIA_VISIBLE_DEVICES=0"], state=api.CONTAINER_STOPPED
    )
    bad = api.Container(id="c-bad", pod_sandbox_id="p1", env=["NVIDIA_VISIBLE_DEVICES=99"])
    updates = asyncio.run(plugin.synchronize([pod], [served, missed, cpu, stopped, bad]))
    assert updates == []
    assert metrics.details("unadjusted") == ["1"]
    records = [json.loads(line) for line in plugin.log_buf.getvalue().splitlines()]  # type: ignore[attr-defined]
    reported = [r for r in records if r["msg"].startswith("GPU container is running without its GPUs")]
    assert [(r["container_id"], r["pod"], r["pod_namespace"]) for r in reported] == [
        ("c-missed", "trainer", "ml")
    ]


def test_recently_changed_directory_pins_its_files_too(tmp_path: Path) -> None:
    """Coarse timestamps: a swap in the same tick as discovery must not go unseen."""
    host = _host(tmp_path)
    lib = host.path(f"{host.lib_dir}/libcuda.so.{host.driver_version}")
    settled = pin(str(host.root), str(lib), by_directory=True)
    assert settled[-1].path == str(lib.parent) and settled[-1].stamp_ns
    (lib.parent / "new-entry").write_text("x")  # the directory changes just now
    fresh = pin(str(host.root), str(lib), by_directory=True)
    assert fresh[-1].path == str(lib) and fresh[-1].stamp_ns and fresh[-2].path == str(lib.parent)


# --- regressions found by the independent review ----------------------------------------------


def test_restoring_the_directory_mtime_does_not_hide_a_swap(tmp_path: Path) -> None:
    """A root attacker can set a directory's mtime back with utimensat; its ctime moves anyway."""
    host = _host(tmp_path)
    _settle(host)
    snap = _snap(host)
    lib = host.path(f"{host.lib_dir}/libcuda.so.{host.driver_version}")
    before = os.stat(lib.parent)
    lib.rename(lib.with_name("moved"))
    lib.symlink_to("/etc/shadow")
    os.utime(lib.parent, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(lib.parent).st_mtime_ns == before.st_mtime_ns
    with pytest.raises(DriverChangedError, match="entries were added, removed or replaced"):
        _decide(snap)


def test_containers_writing_to_ipc_entries_do_not_fail_gpu_containers(tmp_path: Path) -> None:
    """IPC entries are mounted read-write: a container touching the socket or creating files in the
    MPS directory changes their times, which must not look like a swapped driver."""
    host = _host(tmp_path)
    _settle(host)
    snap = _snap(host)
    os.utime(host.path("/run/nvidia-persistenced/socket"))
    os.chmod(host.path("/run/nvidia-persistenced/socket"), 0o600)
    (host.path("/tmp/nvidia-mps") / "control").write_text("pipe")
    _decide(snap)  # no DriverChangedError
    # ... while swapping the entry for a symlink still is caught (type and inode are compared)
    sock = host.path("/run/nvidia-persistenced/socket")
    sock.unlink()
    sock.symlink_to("/etc")
    with pytest.raises(DriverChangedError, match="socket is now a symlink, was a socket"):
        _decide(snap)


def test_a_source_that_could_not_be_pinned_triggers_rediscovery(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Removed between being found and being pinned (an upgrade): not an 'internal error'."""
    import importlib

    discover_mod = importlib.import_module("nri_plugin.host.discover")  # the module, not the function
    host = _host(tmp_path)
    firmware = next(iter(host.path("/lib/firmware/nvidia").rglob("*.bin")))
    from nri_plugin.host.pin import pin as real_pin

    def racing_pin(root: str, host_path: str, *, by_directory: bool = False) -> object:
        if host_path == str(firmware):
            raise HostDiscoveryError(f"cannot pin mount source {host_path!r}: gone")
        return real_pin(root, host_path, by_directory=by_directory)

    monkeypatch.setattr(discover_mod, "pin", racing_pin)
    snap = _snap(host)
    monkeypatch.undo()
    assert str(firmware) in snap.pin_errors
    with pytest.raises(DriverChangedError, match="gone"):
        _decide(snap)
    driver = HostDriver(host.roots, use_nvml=False, discover_fn=lambda roots, **kw: snap)
    driver.refresh()
    assert driver.snapshot() is snap
    assert driver.changed()  # the watch loop retries such a snapshot


def test_rejected_candidates_are_bounded(tmp_path: Path) -> None:
    from nri_plugin.host.discover import MAX_REJECTED, select_libraries
    from nri_plugin.host.ldcache import LdCacheEntry

    entries = [
        LdCacheEntry(f"libcuda.so.{i}", f"/nope/libcuda.so.{i}", 0x0303, True, "x86-64")
        for i in range(10_000)
    ]
    rejected: list[str] = []
    select_libraries(entries, str(tmp_path), "x86-64", "550.54.14", rejected=rejected)
    assert len(rejected) == MAX_REJECTED


def test_synchronize_right_after_start_reports_once_discovery_is_done(tmp_path: Path) -> None:
    """Registration does not wait for discovery, so the first Synchronize may come before it."""
    host = _host(tmp_path)
    plugin, release = _plugin_with_slow_discovery(host)
    metrics = RecordingMetrics()
    plugin.metrics = metrics
    missed = api.Container(id="c-missed", pod_sandbox_id="p1", env=["NVIDIA_VISIBLE_DEVICES=0"])

    async def scenario() -> None:
        await plugin.discover(budget=0.05)
        assert await plugin.synchronize([api.PodSandbox(id="p1")], [missed]) == []
        assert metrics.details("unadjusted") == []  # deferred, not "0 found"
        release.set()
        for _ in range(300):
            if metrics.details("unadjusted"):
                break
            await asyncio.sleep(0.01)
        await plugin.close()

    asyncio.run(scenario())
    assert metrics.details("unadjusted") == ["1"]

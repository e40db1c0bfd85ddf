"""The Synchronize check and eviction (``nri_plugin.resync`` and ``GpuPlugin.synchronize``).

The real-containerd version (SIGKILL of the plugin during a burst of creates) is
``tests/e2e/test_resync_e2e.py``; here every branch of the decision is pinned down in process.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from nri_plugin import config as cfg
from nri_plugin import logs, resync
from nri_plugin.plugin import GpuPlugin
from nri_plugin.wire import api
from tests.fakehost import FakeHost, build_fake_host, make_gpus, root_flags
from tests.fakemetrics import RecordingMetrics


def host_flags(root: str, **extra: object) -> cfg.Layer:
    values: dict[str, object | None] = {
        **root_flags(root),
        "nri-plugin.use-nvml": False,
        **extra,
    }
    return cfg.layer_from_flags(values)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    return build_fake_host(tmp_path_factory.mktemp("fakehost") / "root", gpus=make_gpus(1))


# --- the state file ------------------------------------------------------------------------------


def test_first_registration_is_recorded_once(tmp_path: Path) -> None:
    d = tmp_path / "state"
    assert resync.first_registered_ns(str(d), now_ns=1000) == 1000
    assert resync.first_registered_ns(str(d), now_ns=2000) == 1000  # kept across restarts
    assert (d / resync.STATE_FILE).read_text() == "1000\n"
    assert oct((d).stat().st_mode & 0o777) == "0o700"


def test_a_corrupt_state_file_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / resync.STATE_FILE).write_text("yesterday\n")
    with pytest.raises(OSError, match="not a timestamp; remove the file"):
        resync.first_registered_ns(str(tmp_path))


# --- the decision ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created", "first", "evict", "why"),
    [
        (2000, 1000, True, "after this plugin first registered"),
        (500, 1000, False, "before this plugin first registered"),
        (0, 1000, False, "creation time unknown"),
        (None, 1000, False, "creation time unknown"),
        (2000, None, False, "state file is unusable"),
    ],
)
def test_classify(created: int | None, first: int | None, evict: bool, why: str) -> None:
    verdict = resync.classify(created, first)
    assert verdict.evict is evict and why in verdict.why


def test_own_process_is_recognised_by_its_cgroup_only(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "4242").mkdir(parents=True)
    (proc / "4242" / "cgroup").write_text("0::/kubepods/pod1/cri-containerd-abc123.scope\n")
    assert resync.owns_process("abc123", 4242, str(proc))
    assert not resync.owns_process("def456", 4242, str(proc))  # a recycled or foreign PID
    assert not resync.owns_process("abc123", 4343, str(proc))  # no such process
    assert not resync.owns_process("abc123", 1, str(proc))  # never init
    assert not resync.evict_fallback("def456", 4242, str(proc))


def test_process_start_time_is_unix_time() -> None:
    started = resync.process_start_ns(os.getpid())
    assert started is not None and abs(started - time.time_ns()) < 3600 * 10**9
    assert resync.process_start_ns(2**22 + 7) is None


def test_process_start_time_is_precise_to_a_few_ticks() -> None:
    # A container started right after the first registration must not look older than it: the
    # start time has to be good to a few clock ticks, not to the whole second of /proc/stat btime.
    t0 = time.time_ns()
    child = subprocess.Popen(["sleep", "5"])
    t1 = time.time_ns()
    try:
        started = resync.process_start_ns(child.pid)
        assert started is not None
        tick = 10**9 // os.sysconf("SC_CLK_TCK")
        assert t0 - 3 * tick <= started <= t1 + 3 * tick, (t0, started, t1)
    finally:
        child.kill()
        child.wait()


# --- the plugin at Synchronize ---------------------------------------------------------------------


class Plugin:
    def __init__(self, host: FakeHost, state_dir: Path, *, evict: bool) -> None:
        import io

        self.buf = io.StringIO()
        self.metrics = RecordingMetrics()
        flags = host_flags(str(host.root), **{"nri-plugin.evict-unadjusted": evict})
        self.plugin = GpuPlugin(
            file_layer=cfg.Layer("test"),
            flag_layer=flags,
            logger=logs.Logger(logs.StreamSink(self.buf, "json"), logs.Level.INFO),
            metrics=self.metrics,
            state_dir=str(state_dir),
        )
        asyncio.run(self.plugin.discover())
        self.sent: list[list[api.ContainerEviction]] = []

        async def updater(
            updates: list[api.ContainerUpdate], evictions: list[api.ContainerEviction]
        ) -> list[api.ContainerUpdate]:
            self.sent.append(evictions)
            return []

        self.plugin.updater = updater

    def records(self, msg: str) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in self.buf.getvalue().splitlines()]
        return [r for r in lines if str(r["msg"]).startswith(msg)]


POD = api.PodSandbox(id="p1", name="trainer", namespace="ml")


def gpu_container(cid: str, created_at: int = 0, pid: int = 0) -> api.Container:
    return api.Container(
        id=cid,
        pod_sandbox_id="p1",
        name=cid,
        env=["NVIDIA_VISIBLE_DEVICES=0"],
        created_at=created_at,
        pid=pid,
        state=api.CONTAINER_RUNNING,
    )


def test_injected_containers_are_not_reported(host: FakeHost, tmp_path: Path) -> None:
    p = Plugin(host, tmp_path / "state", evict=True)
    ours = gpu_container("ours")
    ours.linux.devices.add(path="/dev/nvidia0", type="c", major=195, minor=0)
    cdi = gpu_container("cdi")
    cdi.CDI_devices.add(name="nvidia.com/gpu=0")
    legacy = gpu_container("legacy")
    legacy.hooks.prestart.add(path="/usr/bin/nvidia-container-runtime-hook", args=["hook", "prestart"])
    asyncio.run(p.plugin.synchronize([POD], [ours, cdi, legacy]))
    assert p.records("GPU container is running without") == []
    assert ("unadjusted", "0") in p.metrics.events


def test_only_containers_created_after_the_first_registration_are_evicted(
    host: FakeHost, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = resync.first_registered_ns(str(state), now_ns=time.time_ns() - 10**9)
    p = Plugin(host, state, evict=True)
    before = gpu_container("before", created_at=first - 1)
    unknown = gpu_container("unknown")  # containerd 1.7: no created_at, no verifiable PID
    after = gpu_container("after", created_at=first + 1)

    async def scenario() -> None:
        assert await p.plugin.synchronize([POD], [before, unknown, after]) == []
        assert p.sent == []  # never from inside Synchronize: the runtime holds its lock
        await p.plugin.on_registered()
        await asyncio.sleep(resync.EVICT_GRACE_S + 0.3)

    asyncio.run(scenario())
    assert [[e.container_id for e in batch] for batch in p.sent] == [["after"]]
    assert "recreated" in p.sent[0][0].reason
    reported = {str(r["container_id"]): r for r in p.records("GPU container is running without")}
    assert set(reported) == {"before", "unknown", "after"}
    assert reported["after"]["evictable"] is True and "evicting it" in str(reported["after"]["msg"])
    assert "not evicted" in str(reported["before"]["msg"])
    assert ("unadjusted", "3") in p.metrics.events
    # without a PID nothing can be checked or signalled: the NRI request is all there is
    assert ("evicted", "nri") in p.metrics.events
    assert [r["container_id"] for r in p.records("eviction of GPU container")] == ["after"]


def test_without_the_setting_nothing_is_evicted(host: FakeHost, tmp_path: Path) -> None:
    p = Plugin(host, tmp_path / "state", evict=False)

    async def scenario() -> None:
        await p.plugin.synchronize([POD], [gpu_container("late", created_at=time.time_ns() + 10**9)])
        await p.plugin.on_registered()
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert p.sent == []
    [line] = p.records("GPU container is running without")
    assert "recreate it" in str(line["msg"])


def test_the_fallback_kills_a_process_that_is_verifiably_the_container(
    host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The runtime ignored the NRI eviction (containerd <= 2.2): the process still runs.
    victim = subprocess.Popen(["sleep", "60"])
    try:
        monkeypatch.setattr(resync, "EVICT_GRACE_S", 0.05)
        monkeypatch.setattr(resync, "owns_process", lambda cid, pid, proc_root="/proc": pid == victim.pid)
        p = Plugin(host, tmp_path / "state", evict=True)

        async def scenario() -> None:
            c = gpu_container("late", created_at=time.time_ns() + 10**9, pid=victim.pid)
            await p.plugin.synchronize([POD], [c])
            await p.plugin.on_registered()
            await asyncio.sleep(0.5)

        asyncio.run(scenario())
        assert victim.wait(5) == -9
        assert ("evicted", "signal") in p.metrics.events
        [line] = p.records("evicted GPU container")
        assert line["method"] == "signal" and line["pid"] == victim.pid
    finally:
        victim.kill()
        victim.wait()

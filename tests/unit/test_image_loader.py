"""The generated cache end to end without containerd: the composition (precedence, compat, env),
the per-container files (churn, Synchronize), the plugin's handlers (mount, env, fallbacks,
metric, cleanup) and the minimal HTTP/2 client against an in-process server."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_plugin import config as cfg
from nri_plugin import logs
from nri_plugin.adjust import ImageFacts, build_cache, compat_enabled, decide, driver_records, libcuda_env
from nri_plugin.errors import ImageReadError
from nri_plugin.host import CacheRecord, parse_cache_file, write_cache
from nri_plugin.image import (
    CacheStore,
    LoaderConfig,
    LoaderService,
    SnapshotMount,
    layer_dirs,
    snapshot_mounts,
)
from nri_plugin.image import containerd as ctrd
from nri_plugin.plugin import GpuPlugin
from nri_plugin.wire import api
from tests.fakehost.builder import FakeHost, build_fake_host, make_gpus, root_flags
from tests.fakemetrics import RecordingMetrics

X86_64 = 0x0303
DEB = "/usr/lib/x86_64-linux-gnu"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> FakeHost:
    return build_fake_host(tmp_path_factory.mktemp("fakehost") / "root", gpus=make_gpus(1))


@pytest.fixture(scope="module")
def snapshot(host: FakeHost) -> object:
    from nri_plugin.host import HostDriver

    driver = HostDriver(host.roots, use_nvml=False)
    driver.refresh()
    snap = driver.snapshot()
    assert snap is not None, driver.last_error
    return snap


def _decision(snapshot: object, *env: str) -> object:
    return decide(["NVIDIA_VISIBLE_DEVICES=0", *env], [], False, cfg.Settings().hook, snapshot)  # type: ignore[arg-type]


def _mounts(snapshot: object) -> tuple[object, ...]:
    return _decision(snapshot).adjustment.mounts  # type: ignore[attr-defined, no-any-return]


def facts(**kw: object) -> ImageFacts:
    base: dict[str, object] = {
        "source": "image-cache",
        "records": (
            CacheRecord(b"libc.so.6", b"/lib/x86_64-linux-gnu/libc.so.6", X86_64),
            CacheRecord(b"libcuda.so.1", b"/usr/local/cuda/lib64/stubs/libcuda.so.1", X86_64),
        ),
        "multiarch": True,
    }
    base.update(kw)
    return ImageFacts(**base)  # type: ignore[arg-type]


COMPAT = (CacheRecord(b"libcuda.so.1", b"/usr/local/cuda-x/compat/libcuda.so.1", X86_64),)


# --- composition -----------------------------------------------------------------------------


def test_driver_libraries_come_before_the_images_own_entry_of_the_same_name(snapshot: object) -> None:
    f = facts()
    drivers = driver_records(_mounts(snapshot), snapshot, f)  # type: ignore[arg-type]
    assert (b"libcuda.so.1", f"{DEB}/libcuda.so.1".encode()) in {(r.key, r.value) for r in drivers}
    assert (b"libnvidia-ml.so.1", f"{DEB}/libnvidia-ml.so.1".encode()) in {(r.key, r.value) for r in drivers}
    cache = build_cache(f, drivers, "550.54.14", True)
    records = parse_cache_file(cache.data).records
    libcuda = [r.value for r in records if r.key == b"libcuda.so.1"]
    assert libcuda == [f"{DEB}/libcuda.so.1".encode(), b"/usr/local/cuda/lib64/stubs/libcuda.so.1"]
    assert b"libc.so.6" in {r.key for r in records} and not cache.compat


def test_a_rhel_layout_image_gets_the_lib64_paths(snapshot: object) -> None:
    drivers = driver_records(_mounts(snapshot), snapshot, facts(multiarch=False))  # type: ignore[arg-type]
    assert drivers and all(r.value.startswith(b"/usr/lib64/") for r in drivers)


@pytest.mark.parametrize(
    ("compat_version", "host_version", "enabled", "expected"),
    [
        ("570.86.10", "550.54.14", True, True),  # newer major: compat first
        ("550.99.01", "550.54.14", True, False),  # same major: the host's
        ("470.1.1", "550.54.14", True, False),  # older: the host's
        ("570.86.10", "550.54.14", False, False),  # disabled
        ("", "550.54.14", True, False),
    ],
)
def test_forward_compat_only_when_the_compat_major_is_newer(
    snapshot: object, compat_version: str, host_version: str, enabled: bool, expected: bool
) -> None:
    f = facts(compat_version=compat_version, compat_records=COMPAT)
    drivers = driver_records(_mounts(snapshot), snapshot, f)  # type: ignore[arg-type]
    cache = build_cache(f, drivers, host_version, enabled)
    first = next(r.value for r in parse_cache_file(cache.data).records if r.key == b"libcuda.so.1")
    assert cache.compat is expected
    assert first == (COMPAT[0].value if expected else f"{DEB}/libcuda.so.1".encode())


def test_compat_mode_knobs_mean_what_the_toolkit_says() -> None:
    assert (
        compat_enabled("ldconfig", False) and compat_enabled("hook", False) and compat_enabled("mount", False)
    )
    assert not compat_enabled("disabled", True)
    assert compat_enabled("", True) and not compat_enabled("", False)


def test_the_old_section_is_kept_when_the_image_had_one(snapshot: object) -> None:
    cache = build_cache(facts(has_old=True), [], "550.54.14", True)
    assert cache.data.startswith(b"ld.so-1.7.0") and parse_cache_file(cache.data).has_old
    assert build_cache(facts(), [], "550.54.14", True).data.startswith(b"glibc-ld.so.cache1.1")


def test_libcuda_env_unless_the_container_sets_it(snapshot: object) -> None:
    mounts = _mounts(snapshot)
    assert libcuda_env(mounts, {}, DEB) == (("NVIDIA_CTK_LIBCUDA_DIR", DEB), ("TRITON_LIBCUDA_PATH", DEB))  # type: ignore[arg-type]
    assert libcuda_env(mounts, {"TRITON_LIBCUDA_PATH": "/x"}, DEB) == (("NVIDIA_CTK_LIBCUDA_DIR", DEB),)  # type: ignore[arg-type]
    utility_only = _decision(snapshot, "NVIDIA_DRIVER_CAPABILITIES=utility").adjustment.mounts  # type: ignore[attr-defined]
    assert libcuda_env(utility_only, {}, DEB) == ()  # no libcuda injected: no variable


# --- the store ---------------------------------------------------------------------------------


def test_a_thousand_containers_churned_leave_no_files(tmp_path: Path) -> None:
    store = CacheStore(str(tmp_path / "state"))
    store.prepare()
    data = b"cache-bytes"
    digest = "0" * 64
    for i in range(1000):
        store.put(f"c{i}", digest, data, {"path": "image-cache", "digest": digest})
    assert sorted(os.listdir(store.content)) == [digest, digest + ".json"]  # one image: one file, one record
    assert store.read_record("c7") == {"path": "image-cache", "digest": digest}
    assert len(store.live()) == 1000
    for i in range(0, 1000, 2):
        assert store.remove(f"c{i}")
    assert store.sync([f"c{i}" for i in range(1, 1000, 4)]) == sorted(f"c{i}" for i in range(3, 1000, 4))
    assert len(store.live()) == 250
    store = CacheStore(str(tmp_path / "state"))  # a restarted plugin: links found by inode
    assert store.read_record("c1") == {"path": "image-cache", "digest": digest}
    store.sync([])
    assert os.listdir(store.containers) == [] and os.listdir(store.content) == []


def test_container_ids_that_cannot_be_file_names_are_refused(tmp_path: Path) -> None:
    store = CacheStore(str(tmp_path))
    for bad in ("../x", ".hidden", "a/b", ""):
        with pytest.raises(ImageReadError, match="cannot name a file"):
            store.put(bad, "0" * 64, b"", {})
        assert store.remove(bad) is False


# --- the plugin ----------------------------------------------------------------------------------


def image_layer(tmp_path: Path) -> Path:
    layer = tmp_path / "image"
    (layer / "etc").mkdir(parents=True)
    (layer / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (layer / "etc/ld.so.cache").write_bytes(
        write_cache([CacheRecord(b"libc.so.6", b"/lib/x86_64-linux-gnu/libc.so.6", X86_64)])
    )
    return layer


class Metrics(RecordingMetrics):
    """No container may fail in these tests; the loader's ``(path, stage)`` events are checked."""

    def failed(self, reason: str, seconds: float) -> None:
        raise AssertionError(f"a container failed: {reason}")

    @property
    def ldcache_events(self) -> list[tuple[str, str]]:
        return [(path, stage) for path, _, stage in (d.partition(":") for d in self.details("ldcache"))]


class Harness:
    def __init__(
        self, host: FakeHost, state: Path, mounts_fn: ctrd.MountsFnType, timeout: float = 0.5
    ) -> None:
        flags = cfg.layer_from_flags(
            {
                **root_flags(host.root),
                "nri-plugin.use-nvml": False,
                "nri-plugin.runtime-dir": str(state),
                "nri-plugin.image-read-timeout": timeout,
            }
        )
        self.buf = io.StringIO()
        self.metrics = Metrics()
        self.plugin = GpuPlugin(
            file_layer=cfg.Layer("t"),
            flag_layer=flags,
            logger=logs.Logger(logs.StreamSink(self.buf, "json"), logs.Level.DEBUG),
            metrics=self.metrics,
            mounts_fn=mounts_fn,
        )
        self.plugin.driver.refresh()
        self.plugin.loader.store.prepare()

    def create(self, cid: str, *env: str) -> api.ContainerAdjustment:
        c = api.Container(id=cid, name=cid, env=["NVIDIA_VISIBLE_DEVICES=0", *env])

        async def timed() -> api.ContainerAdjustment:
            t0 = time.monotonic()
            adjust = (await self.plugin.create_container(api.PodSandbox(), c)).adjust
            self.elapsed = time.monotonic() - t0  # (asyncio.run then still joins the worker thread)
            return adjust

        return asyncio.run(timed())

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.buf.getvalue().splitlines()]


def overlay(*lower: Path) -> ctrd.MountsFnType:
    def fn(address: str, namespace: str, snapshotter: str, key: str, timeout: float) -> list[SnapshotMount]:
        assert (namespace, snapshotter) == ("k8s.io", "overlayfs")
        opts = ("index=off", "workdir=/w", "upperdir=/u", "lowerdir=" + ":".join(map(str, lower)))
        return [SnapshotMount("overlay", "overlay", opts)]

    return fn


def test_a_gpu_container_gets_its_generated_cache_and_loses_it_when_removed(
    host: FakeHost, tmp_path: Path
) -> None:
    h = Harness(host, tmp_path / "state", overlay(image_layer(tmp_path)))
    adj = h.create("c1")
    mounts = {m.destination: m for m in adj.mounts}
    cache = mounts["/etc/ld.so.cache"]
    assert list(cache.options)[:1] == ["ro"] and cache.source == str(tmp_path / "state/ldcache/containers/c1")
    keys = {r.key for r in parse_cache_file(Path(cache.source).read_bytes()).records}
    assert {b"libc.so.6", b"libcuda.so.1", b"libnvidia-ml.so.1"} <= keys
    assert {(e.key, e.value) for e in adj.env} >= {
        ("TRITON_LIBCUDA_PATH", DEB),
        ("NVIDIA_CTK_LIBCUDA_DIR", DEB),
    }
    assert h.metrics.ldcache_events == [("image-cache", "")]
    record = h.plugin.loader.store.read_record("c1")  # what inspect --container-id shows
    assert record is not None and record["path"] == "image-cache" and record["image_entries"] == 1
    drivers = record["driver_entries"]
    assert isinstance(drivers, int) and drivers > 0 and record["entries"] == 1 + drivers
    h.create("c2")
    asyncio.run(h.plugin.remove_container(api.PodSandbox(), api.Container(id="c1")))
    assert not Path(cache.source).exists()
    asyncio.run(h.plugin.stop_container(api.PodSandbox(), api.Container(id="c2")))
    assert h.plugin.loader.store.live() == [] and os.listdir(h.plugin.loader.store.content) == []


def test_synchronize_removes_the_files_of_containers_that_are_gone(host: FakeHost, tmp_path: Path) -> None:
    h = Harness(host, tmp_path / "state", overlay(image_layer(tmp_path)))
    for cid in ("keep", "gone1", "gone2"):
        h.create(cid)
    asyncio.run(h.plugin.synchronize([], [api.Container(id="keep", state=api.CONTAINER_RUNNING)]))
    assert h.plugin.loader.store.live() == ["keep"]


def _failing_mounts(
    address: str, namespace: str, snapshotter: str, key: str, timeout: float
) -> list[SnapshotMount]:
    raise ImageReadError("cannot reach containerd's API socket '/run/containerd/containerd.sock'")


def _slow_mounts(
    address: str, namespace: str, snapshotter: str, key: str, timeout: float
) -> list[SnapshotMount]:
    time.sleep(1.0)
    return []


def _buggy_mounts(
    address: str, namespace: str, snapshotter: str, key: str, timeout: float
) -> list[SnapshotMount]:
    raise RuntimeError("a bug")


@pytest.mark.parametrize(
    ("mounts_fn", "stage"),
    [(_failing_mounts, "containerd"), (_slow_mounts, "timeout"), (_buggy_mounts, "internal")],
)
def test_a_failure_falls_back_to_todays_adjustment(
    host: FakeHost, tmp_path: Path, mounts_fn: ctrd.MountsFnType, stage: str
) -> None:
    h = Harness(host, tmp_path / "state", mounts_fn, timeout=0.1)
    adj = h.create("c1")
    assert h.elapsed < 0.9  # the handler does not wait for a hanging read
    assert "/etc/ld.so.cache" not in {m.destination for m in adj.mounts}
    assert "/usr/lib/x86_64-linux-gnu/libcuda.so.1" in {m.destination for m in adj.mounts}
    assert ("TRITON_LIBCUDA_PATH", "/usr/lib64") in {(e.key, e.value) for e in adj.env}
    assert h.metrics.ldcache_events == [("fallback", stage)]
    warned = [r for r in h.records() if str(r.get("msg")).startswith("container ld.so.cache not generated")]
    assert warned and warned[0]["stage"] == stage and warned[0]["reason"]
    assert h.plugin.loader.store.read_record("c1") == {
        "path": "fallback",
        "stage": stage,
        "reason": warned[0]["reason"],
    }


def _count_image_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one each time the loader reads an image's facts."""
    from nri_plugin.image import service

    calls: list[int] = []
    real = service.read_facts  # type: ignore[attr-defined]

    def counting(root: object) -> object:
        calls.append(1)
        return real(root)  # type: ignore[arg-type]

    monkeypatch.setattr(service, "read_facts", counting)
    return calls


def test_the_same_image_is_read_once(host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_image_reads(monkeypatch)
    h = Harness(host, tmp_path / "state", overlay(image_layer(tmp_path)))
    for i in range(5):
        h.create(f"c{i}")
    assert len(calls) == 1
    assert len([n for n in os.listdir(h.plugin.loader.store.content) if not n.endswith(".json")]) == 1


# --- containerd's API, over a real unix socket -------------------------------------------------


def _frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, i = [], 0
    while i + 9 <= len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        out.append(
            (
                data[i + 3],
                data[i + 4],
                int.from_bytes(data[i + 5 : i + 9], "big"),
                data[i + 9 : i + 9 + length],
            )
        )
        i += 9 + length
    return out


def _mounts_response() -> bytes:
    mount = (
        ctrd._field(1, b"overlay")
        + ctrd._field(2, b"overlay")
        + ctrd._field(4, b"index=off")
        + ctrd._field(4, b"lowerdir=/s/2/fs:/s/1/fs")
    )
    msg = ctrd._field(1, mount)
    return b"\x00" + struct.pack(">I", len(msg)) + msg


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, dict[str, object]]]:
    """A one-shot HTTP/2 peer: reads the request, answers as ``state['answer']`` says."""
    path = str(tmp_path / "containerd.sock")
    done = threading.Event()
    state: dict[str, object] = {"answer": "ok", "got": b"", "done": done}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            got = b""
            conn.settimeout(5)
            while b"\x00\x01\x00\x00\x00\x01" not in got[-200:] or len(_frames(got[24:])) < 3:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                got += chunk
            state["got"] = got
            if state["answer"] == "hang":
                time.sleep(1.0)
                return
            conn.sendall(ctrd._frame(4, 0, 0, b"") + ctrd._frame(6, 0, 0, b"12345678"))
            conn.sendall(ctrd._frame(1, 4, 1, b"\x88"))  # :status 200 (indexed), not decoded by the client
            if state["answer"] == "ok":
                conn.sendall(ctrd._frame(0, 0, 1, _mounts_response()))
            conn.sendall(ctrd._frame(1, 5, 1, b"\x40\x0bgrpc-status\x015"))
            conn.settimeout(0.3)
            try:
                while chunk := conn.recv(65536):
                    got += chunk  # the client's acknowledgements
            except TimeoutError:
                pass
            state["got"] = got
            done.set()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path, state
    listener.close()
    t.join(timeout=5)


def test_snapshot_mounts_speaks_grpc_over_http2(server: tuple[str, dict[str, object]]) -> None:
    path, state = server
    mounts = snapshot_mounts(path, "k8s.io", "overlayfs", "cid123", 2.0)
    assert mounts == [SnapshotMount("overlay", "overlay", ("index=off", "lowerdir=/s/2/fs:/s/1/fs"))]
    assert layer_dirs(mounts) == ("/s/2/fs", "/s/1/fs")
    done = state["done"]
    assert isinstance(done, threading.Event) and done.wait(5)
    got = state["got"]
    assert isinstance(got, bytes) and got.startswith(ctrd.PREFACE)
    frames = _frames(got[len(ctrd.PREFACE) :])
    kinds = [(k, f, s) for k, f, s, _p in frames[:3]]
    assert kinds == [(4, 0, 0), (1, 4, 1), (0, 1, 1)]
    headers = frames[1][3]
    for text in (
        b":path",
        ctrd.MOUNTS_METHOD.encode(),
        b"containerd-namespace",
        b"k8s.io",
        b"application/grpc",
    ):
        assert text in headers
    body = frames[2][3]
    assert body[5:] == ctrd.encode_mounts_request("overlayfs", "cid123")
    acks = [(k, f) for k, f, _s, _p in frames[3:]]
    assert (4, 1) in acks and (6, 1) in acks  # SETTINGS and PING acknowledged


@pytest.mark.parametrize(("answer", "match"), [("error", "with an error"), ("hang", "did not answer")])
def test_snapshot_mounts_failures_are_clear(
    server: tuple[str, dict[str, object]], answer: str, match: str
) -> None:
    path, state = server
    state["answer"] = answer
    with pytest.raises(ImageReadError, match=match):
        snapshot_mounts(path, "k8s.io", "overlayfs", "cid", 0.3)


def test_an_unreachable_socket_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match=r"nri-plugin\.containerd-socket"):
        snapshot_mounts(str(tmp_path / "none.sock"), "k8s.io", "overlayfs", "cid", 0.3)


@pytest.mark.parametrize(
    ("mounts", "expected"),
    [
        ([SnapshotMount("bind", "/s/1/fs", ("rbind", "ro"))], ("/s/1/fs",)),
        ([SnapshotMount("overlay", "overlay", ("lowerdir=/a:/b", "upperdir=/u"))], ("/a", "/b")),
    ],
)
def test_layer_dirs(mounts: list[SnapshotMount], expected: tuple[str, ...]) -> None:
    assert layer_dirs(mounts) == expected


@pytest.mark.parametrize(
    ("mounts", "match"),
    [
        ([], "0 mounts"),
        ([SnapshotMount("ext4", "/dev/dm-1", ())], "cannot read"),
        ([SnapshotMount("overlay", "overlay", ("lowerdir=rel",))], "no usable lowerdir"),
    ],
)
def test_layer_dirs_refusals(mounts: list[SnapshotMount], match: str) -> None:
    with pytest.raises(ImageReadError, match=match):
        layer_dirs(mounts)


def test_loader_config_defaults() -> None:
    assert LoaderConfig() == LoaderService(LoaderConfig()).config


def test_a_refused_image_is_refused_from_memory(
    host: FakeHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = image_layer(tmp_path)
    (layer / "etc/ld.so.cache").write_bytes(b"glibc-ld.so.cache1.1 but truncated")
    calls = _count_image_reads(monkeypatch)
    h = Harness(host, tmp_path / "state", overlay(layer))
    for i in range(3):
        h.create(f"c{i}")
    assert len(calls) == 1
    assert h.metrics.ldcache_events == [("fallback", "image")] * 3
    refused = h.plugin.loader._refused
    for key, (_expires, message) in list(refused.items()):
        refused[key] = (0.0, message)  # REFUSAL_TTL_S has passed: the image is read again
    h.create("c9")
    assert len(calls) == 2


def test_layers_are_read_under_the_host_root(host: FakeHost, tmp_path: Path) -> None:
    """In a pod with the host's / at /host, containerd's host paths are read below it."""
    layer = image_layer(tmp_path / "host-view" / "var/lib/containerd/snap")
    seen: list[tuple[str, ...]] = []
    h = Harness(host, tmp_path / "state", overlay(Path("/var/lib/containerd/snap/image")))
    h.plugin.loader = LoaderService(
        dataclasses.replace(h.plugin.loader.config, read_root=str(tmp_path / "host-view")),
        mounts_fn=overlay(Path("/var/lib/containerd/snap/image")),
    )
    real = h.plugin.loader.facts_for

    def spy(layers: tuple[str, ...], budget: float) -> ImageFacts:
        seen.append(layers)
        return real(layers, budget)

    h.plugin.loader.facts_for = spy  # type: ignore[method-assign, assignment]
    h.plugin.loader.store.prepare()
    adj = h.create("c1")
    assert seen == [(str(layer),)]
    assert "/etc/ld.so.cache" in {m.destination for m in adj.mounts}

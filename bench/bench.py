#!/usr/bin/env python3
"""Benchmark the NVIDIA NRI plugin on the real test containerd (not a test; run as root).

    .venv/bin/python bench/bench.py [--containerd 1.7|2.1] [-n 50] [--rounds 5] [--seed S]

One invocation measures, on a private containerd started here (``tests/e2e`` test bed) and a fake
8-GPU host (``tests/fakehost``):

* CRI ``CreateContainer`` latency, client side, for
  (a) NRI enabled and no plugin connected, (b) this plugin and a non-GPU container,
  (c) this plugin and a GPU container (``NVIDIA_VISIBLE_DEVICES=all``: 8 GPUs),
  (d) the same in a Debian-layout image with its own ``ld.so.cache`` -- (c) and (d) with the
  generated per-container ``ld.so.cache`` (``container-ldcache = auto``: a ``Snapshots.Mounts``
  call to containerd per container, the image read once), (e)/(f) the same two with it ``off``;
  ``n`` runs of each, spread over ``rounds`` rounds. Each round runs phase "no plugin", phase
  "plugin" and phase "plugin, ldcache off" in random order, and inside a plugin phase the creates
  are shuffled, so slow drift of the machine affects all cases alike. The first create of each
  phase is not counted.
  Every container is removed right after it was measured (removal is not timed).
* The plugin daemon (``python -m nri_plugin run``, a fresh process per round): time from
  ``exec`` to registered (the daemon's ``registered`` log line), its own ``startup_ms``, and its
  RSS at the end of each plugin phase.
* The CreateContainer handler in process: the exact ``CreateContainerRequest`` bytes containerd
  sent for a (b) and a (c) container (captured by a throw-away recording plugin) timed through
  ``GpuPlugin.create_container`` alone and with protobuf decode + encode around it, as the stub
  does; the GPU request again with the generated ``ld.so.cache`` on and off, interleaved (the
  snapshot's layers are the Debian-layout image unpacked, handed over by a stand-in for the
  containerd call, whose real cost is in (c)-(f)); plus the daemon-logged handling time (``ms=``)
  of every real GPU create, and the ``nri_gpu_create_container_seconds`` histogram from the
  metrics endpoint as a cross-check.

It prints one plain-text report (also written to ``--output`` when given).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nri_plugin import config as cfg  # noqa: E402
from nri_plugin import logs  # noqa: E402
from nri_plugin.adjust import pipeline  # noqa: E402
from nri_plugin.adjust.build import plan  # noqa: E402
from nri_plugin.errors import ContainerError  # noqa: E402
from nri_plugin.image import SnapshotMount  # noqa: E402
from nri_plugin.plugin import GpuPlugin  # noqa: E402
from nri_plugin.request.model import GpuRequest  # noqa: E402
from nri_plugin.wire._gen import api_pb2 as api  # noqa: E402
from nri_plugin.wire.stub import Plugin  # noqa: E402
from tests.e2e.containerd import Containerd  # noqa: E402
from tests.e2e.cri import ContainerRequest, CriClient, Pod, load_cri  # noqa: E402
from tests.e2e.deps import E2EDeps  # noqa: E402
from tests.e2e.images import BuiltImages, build_images  # noqa: E402
from tests.e2e.nri_test_plugin import PluginThread  # noqa: E402
from tests.e2e.test_robustness_e2e import PluginDaemon  # noqa: E402
from tests.fakehost.builder import FakeHost, build_fake_host, make_gpus, root_flags  # noqa: E402

CASES = {
    "a": "(a) NRI on, no plugin",
    "b": "(b) plugin, non-GPU container",
    "c": "(c) plugin, GPU container (all = 8 GPUs)",
    "d": "(d) plugin, GPU, Debian image with ld.so.cache",
    "e": "(e) = (c), container-ldcache off",
    "f": "(f) = (d), container-ldcache off",
}
LDCACHE_OFF = {"e": "c", "f": "d"}  # the cases of the "ldcache off" phase, and their twins
LOG_TS_RE = re.compile(r"^ts=(\S+) .*\bmsg=registered\b", re.M)
STARTUP_RE = re.compile(r'msg="ready to register".*\bstartup_ms=(\d+)')
HANDLER_MS_RE = re.compile(r'msg="GPU container adjusted".*\bms=([0-9.]+)')


def unpack_image(images: BuiltImages, key: str, dest: Path) -> None:
    """Extract the one layer of the test image ``key`` (our own archive) into ``dest``."""
    import io
    import json
    import tarfile

    with tarfile.open(images.archives[key]) as outer:
        manifest_file = outer.extractfile("manifest.json")
        assert manifest_file is not None
        layer = outer.extractfile(json.load(manifest_file)[0]["Layers"][0])
        assert layer is not None
        data = layer.read()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="fully_trusted")


# --- statistics ----------------------------------------------------------------------------------


def _no_verify(checks: object, unpinned: object, pin_errors: object = None) -> None:
    """verify_plan switched off, for the interleaved cost comparison."""


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sample."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of an empty sample")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


# --- the environment ------------------------------------------------------------------------------


def machine_line() -> str:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30)
    return (
        f"{cpu}, {os.cpu_count()} vCPU, {mem_gib:.1f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def host_layer(host: FakeHost) -> cfg.Layer:
    return cfg.layer_from_flags(
        {
            **root_flags(host.root),
            # the in-process GPU cases time the pipeline; the generated ld.so.cache is timed
            # separately, on and off interleaved (ld-on / ld-off)
            "nri-plugin.container-ldcache": "off",
        }
    )


class Capture(Plugin):
    """Records the serialized CreateContainerRequest per container name; adjusts nothing."""

    def __init__(self) -> None:
        self.requests: dict[str, bytes] = {}

    async def create_container(
        self, pod: api.PodSandbox, container: api.Container
    ) -> api.CreateContainerResponse:
        req = api.CreateContainerRequest(pod=pod, container=container)
        self.requests[container.name] = req.SerializeToString()
        return api.CreateContainerResponse()


# --- measurements ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.rng = random.Random(args.seed)
        deps = E2EDeps.locate()
        self.modules = load_cri(deps.cri_proto, deps.cache / "cri_gen")
        self.images = build_images(deps, work / "images")
        self.host = build_fake_host(work / "host", gpus=make_gpus(args.gpus))
        self.ctrd = Containerd(
            args.containerd, work / "ctrd", deps, self.modules, sandbox_image=self.images.refs["pause"]
        )
        self.latency: dict[str, list[float]] = {k: [] for k in CASES}
        self.to_registered_ms: list[float] = []
        self.startup_ms: list[float] = []
        self.rss_mib: list[float] = []
        self.logged_ms: list[float] = []
        self.hist: dict[float, float] = {}
        self.hist_count = 0.0
        self.hist_sum = 0.0
        self.daemon_count = 0

    def runc_version(self) -> str:
        """The runc package line of the test bed's versions.txt, e.g. 'runc 1.1.5+ds1-1+deb12u1'."""
        with contextlib.suppress(OSError):
            for line in (self.ctrd.deps.cache / "versions.txt").read_text().splitlines():
                parts = line.split()
                if parts and parts[0] == "runc" and len(parts) >= 3:
                    return f"{parts[1]} {parts[2]}"
        return "runc (version unknown)"

    @property
    def cri(self) -> CriClient:
        return self.ctrd.cri

    def request(self, case: str, name: str) -> ContainerRequest:
        case = LDCACHE_OFF.get(case, case)
        env = {"NVIDIA_VISIBLE_DEVICES": "all"} if case in ("c", "d") else {}
        image = self.images.refs["ldconfig-debian" if case == "d" else "busybox"]
        return ContainerRequest(image=image, command=["true"], env=env, name=name)

    def create_timed(self, pod: Pod, case: str, name: str) -> float:
        t0 = time.perf_counter()
        cid = self.cri.create_container(pod, self.request(case, name))
        elapsed = time.perf_counter() - t0
        self.cri.remove_container(cid)
        return elapsed * 1000

    def run_phase(self, pod: Pod, cases: list[str], tag: str) -> None:
        self.create_timed(pod, cases[0], f"warmup-{tag}")  # not counted
        for i, case in enumerate(cases):
            self.latency[case].append(self.create_timed(pod, case, f"{case}-{tag}-{i}"))

    @contextlib.contextmanager
    def daemon(self, tag: str, *, ldcache: bool = True) -> Iterator[PluginDaemon]:
        log = self.work / f"plugin-{tag}.log"
        extra = ["--containerd-socket", str(self.ctrd.address), "--runtime-dir", str(self.work / "state")]
        extra += ["--container-ldcache", "auto" if ldcache else "off"]
        d = PluginDaemon(self.ctrd.nri_socket, self.host.root, log, extra_args=extra)
        wall0 = time.time()
        d.start()
        try:
            d.wait_registrations(1, timeout=30)
            text = d.log_text()
            ts = LOG_TS_RE.search(text)
            if ts is not None:
                registered = dt.datetime.fromisoformat(ts.group(1).replace("Z", "+00:00")).timestamp()
                self.to_registered_ms.append((registered - wall0) * 1000)
            startup = STARTUP_RE.search(text)
            if startup is not None:
                self.startup_ms.append(float(startup.group(1)))
            yield d
            self.rss_mib.append(d.rss() / (1 << 20))
            self.collect_metrics(d)
        finally:
            d.stop()
            self.logged_ms += [float(m) for m in HANDLER_MS_RE.findall(d.log_text())]
            self.daemon_count += 1

    def collect_metrics(self, d: PluginDaemon) -> None:
        for key, value in d.scrape().items():
            if key.startswith("nri_gpu_create_container_seconds_bucket{le="):
                bound = float(key.split("le=", 1)[1].rstrip("}"))
                self.hist[bound] = self.hist.get(bound, 0.0) + value
            elif key == "nri_gpu_create_container_seconds_count":
                self.hist_count += value
            elif key == "nri_gpu_create_container_seconds_sum":
                self.hist_sum += value

    def capture_requests(self, pod: Pod) -> dict[str, bytes]:
        capture = Capture()
        with PluginThread(capture, self.ctrd.nri_socket, name="bench-capture", index="99") as runner:
            runner.wait_registered()
            for case in ("b", "c"):
                cid = self.cri.create_container(pod, self.request(case, f"capture-{case}"))
                self.cri.remove_container(cid)
        return {case: capture.requests[f"capture-{case}"] for case in ("b", "c")}

    def cri_rounds(self, pod: Pod) -> None:
        rounds, n = self.args.rounds, self.args.n
        per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
        for r, count in enumerate(per_round):
            phases = ["none", "plugin", "plugin-off"]
            self.rng.shuffle(phases)
            for phase in phases:
                if phase == "none":
                    time.sleep(0.3)  # let containerd notice a plugin that just went away
                    self.run_phase(pod, ["a"] * count, f"r{r}")
                else:
                    on = phase == "plugin"
                    with self.daemon(f"r{r}{'' if on else '-off'}", ldcache=on):
                        cases = (["b", "c", "d"] if on else ["e", "f"]) * count
                        self.rng.shuffle(cases)
                        self.run_phase(pod, cases, f"r{r}{'' if on else '-off'}")
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr)

    def in_process(self, requests: dict[str, bytes]) -> dict[str, list[float]]:
        # Log to a file like the daemon does: the info line of a GPU container is part of the cost.
        logger = logs.Logger(logs.FileSink(str(self.work / "inproc.log"), "logfmt"), logs.Level.INFO)
        plugin = GpuPlugin(file_layer=cfg.Layer("bench"), flag_layer=host_layer(self.host), logger=logger)
        plugin.driver.refresh()
        if plugin.driver.snapshot() is None:
            raise SystemExit(f"in-process discovery of the fake host failed: {plugin.driver.last_error}")
        out: dict[str, list[float]] = {}

        def with_env(payload: bytes, env: list[str]) -> bytes:
            req = api.CreateContainerRequest.FromString(payload)
            del req.container.env[:]
            req.container.env.extend(env)
            return req.SerializeToString()

        gpu = requests["c"]
        cases = dict(requests)
        # Hostile input (issue 12): refused before parsing, and the worst request still accepted
        # (every value just under its limit, all requirements true).
        cases["h-refused"] = with_env(gpu, [f"CUDA_VERSION={' ' * (2 << 20)}"])
        cases["h-limits"] = with_env(
            gpu,
            [
                "NVIDIA_VISIBLE_DEVICES=" + ",".join(str(i % self.args.gpus) for i in range(8190)),
                # 4 x 256 distinct, true terms: the term limit (MAX_REQUIREMENT_TERMS), all evaluated
                *(f"NVIDIA_REQUIRE_{c}=" + ",".join(f"cuda>=1.{i}" for i in range(256)) for c in "ABCD"),
            ],
        )

        ldcache_plugins = self.ldcache_plugins(logger)
        gpu_debian = with_env(gpu, ["NVIDIA_VISIBLE_DEVICES=all"])

        async def once_with(p: GpuPlugin, payload: bytes) -> float:
            decoded = api.CreateContainerRequest.FromString(payload)
            t0 = time.perf_counter()
            await p.create_container(decoded.pod, decoded.container)
            return (time.perf_counter() - t0) * 1e6

        async def once(payload: bytes, full: bool) -> float:
            t0 = time.perf_counter()
            decoded = api.CreateContainerRequest.FromString(payload)
            if not full:
                t0 = time.perf_counter()
            try:
                rsp = await plugin.create_container(decoded.pod, decoded.container)
            except ContainerError:
                pass
            else:
                if full:
                    rsp.SerializeToString()
            return (time.perf_counter() - t0) * 1e6

        async def measure() -> None:
            n = self.args.inproc
            for case, payload in cases.items():
                runs = n if not case.startswith("h-") else max(20, n // 40)  # ms each, not us
                for full in (False, True):
                    key = f"{case}-{'full' if full else 'handler'}"
                    out[key] = [await once(payload, full) for _ in range(runs)]
            # The hot-path re-check of the pinned mount sources (issue 12), interleaved with the
            # same handler with the check switched off, so both see the same machine state.
            real = pipeline.verify_plan
            with_pins: list[float] = []
            without: list[float] = []
            for _ in range(n):
                with_pins.append(await once(gpu, False))
                pipeline.verify_plan = _no_verify
                try:
                    without.append(await once(gpu, False))
                finally:
                    pipeline.verify_plan = real
            out["c-pins"], out["c-nopins"] = with_pins, without
            # The generated ld.so.cache: the same GPU request, loader on and off, interleaved
            # (the snapshot's layers come from a stand-in for the Snapshots.Mounts call).
            loader_on, loader_off = ldcache_plugins
            on_times: list[float] = []
            off_times: list[float] = []
            for _ in range(n):
                on_times.append(await once_with(loader_on, gpu_debian))
                off_times.append(await once_with(loader_off, gpu_debian))
            out["ld-on"], out["ld-off"] = on_times, off_times
            snap = plugin.driver.snapshot()
            assert snap is not None
            chosen = plan(GpuRequest("all", "", "", "utility,compute", (), False), snap)
            out["pin-count"] = [float(len(chosen.checks))]

        asyncio.run(measure())
        logger.close()
        return out

    def ldcache_plugins(self, logger: logs.Logger) -> tuple[GpuPlugin, GpuPlugin]:
        """Two in-process plugins, the generated ld.so.cache on and off; the "snapshot" is the
        Debian-layout image with its own ld.so.cache, unpacked once."""
        layer = self.work / "debian-layer"
        if not layer.exists():
            unpack_image(self.images, "ldconfig-debian", layer)

        def mounts(
            address: str, namespace: str, snapshotter: str, key: str, timeout: float
        ) -> list[SnapshotMount]:
            return [SnapshotMount("overlay", "overlay", (f"lowerdir={layer}",))]

        out = []
        for mode in ("auto", "off"):
            flags = cfg.Layer(
                "bench",
                {
                    **host_layer(self.host).values,
                    "container_ldcache": mode,
                    "runtime_dir": str(self.work / f"inproc-state-{mode}"),
                },
            )
            p = GpuPlugin(file_layer=cfg.Layer("bench"), flag_layer=flags, logger=logger, mounts_fn=mounts)
            p.driver.refresh()
            p.loader.store.prepare()
            out.append(p)
        return out[0], out[1]

    def run(self) -> str:
        started = dt.datetime.now(dt.UTC)
        self.ctrd.start()
        try:
            for key in ("busybox", "pause", "ldconfig-debian"):
                self.ctrd.import_image(self.images.archives[key])
            with self.cri.pod("bench") as pod:
                requests = self.capture_requests(pod)
                self.cri_rounds(pod)
        finally:
            self.ctrd.shutdown()
        inproc = self.in_process(requests)
        return self.report(started, inproc, requests)

    # --- report --------------------------------------------------------------------------------

    def report(self, started: dt.datetime, inproc: dict[str, list[float]], requests: dict[str, bytes]) -> str:
        a, lines = self.args, []
        base = statistics.median(self.latency["a"])
        lines += [
            "nvidia-nri-plugin benchmark (bench/bench.py)",
            f"date:        {started:%Y-%m-%d %H:%M} UTC",
            f"machine:     {machine_line()}",
            f"containerd:  {self.ctrd.package_version} (NRI enabled), {self.runc_version()}",
            f"host:        fake, {a.gpus} GPUs, driver {self.host.driver_version} "
            "(tests/fakehost, fake NVML)",
            f"method:      n={a.n} creates per case over {a.rounds} rounds, phase order and (b)/(c) "
            f"order shuffled (seed {a.seed}); first create per phase discarded",
            "",
            "CRI CreateContainer latency, client side (ms)",
            f"  {'case':<44}{'median':>8}{'p90':>8}{'median/(a)':>12}{'p90/(a)':>10}",
        ]
        base90 = quantile(self.latency["a"], 0.9)
        for key, label in CASES.items():
            xs = self.latency[key]
            med, p90 = statistics.median(xs), quantile(xs, 0.9)
            lines.append(f"  {label:<44}{med:>8.2f}{p90:>8.2f}{med / base:>12.2f}{p90 / base90:>10.2f}")
        lines += [
            "",
            f"Plugin CreateContainer handler in process (us; {a.inproc} runs each, the exact request "
            f"bytes containerd sent)",
            f"  {'':<50}{'p50':>8}{'p90':>8}{'p99':>8}",
        ]
        labels = {
            "b-handler": "(b) non-GPU: GpuPlugin.create_container",
            "b-full": "(b) non-GPU: decode + handler + encode",
            "c-handler": "(c) GPU, 8 GPUs: GpuPlugin.create_container",
            "c-full": "(c) GPU, 8 GPUs: decode + handler + encode",
            "h-refused-full": "(h) hostile, refused: 2 MiB CUDA_VERSION, decode+all",
            "h-limits-full": "(h) hostile, at limits: 8190 ids, 1024 req terms, decode+all",
            "c-pins": "(c) handler, interleaved: pins re-checked",
            "c-nopins": "(c) handler, interleaved: pin check off",
            "ld-on": "(d) handler, interleaved: ld.so.cache generated",
            "ld-off": "(d) handler, interleaved: container-ldcache off",
        }
        for key, label in labels.items():
            xs = inproc[key]
            lines.append(
                f"  {label:<50}{quantile(xs, 0.5):>8.1f}{quantile(xs, 0.9):>8.1f}{quantile(xs, 0.99):>8.1f}"
            )
        on, off = inproc["c-pins"], inproc["c-nopins"]
        p50_on, p50_off = quantile(on, 0.5), quantile(off, 0.5)
        lines.append(
            f"  pin re-check: {int(inproc['pin-count'][0])} lstat per GPU container; cost p50 "
            f"{p50_on - p50_off:+.1f} us (x{p50_on / p50_off:.2f}), "
            f"p99 x{quantile(on, 0.99) / quantile(off, 0.99):.2f}"
        )
        ld_on, ld_off = inproc["ld-on"], inproc["ld-off"]
        lines.append(
            f"  generated ld.so.cache: cost p50 {quantile(ld_on, 0.5) - quantile(ld_off, 0.5):+.1f} us "
            f"(x{quantile(ld_on, 0.5) / quantile(ld_off, 0.5):.2f}), p99 "
            f"x{quantile(ld_on, 0.99) / quantile(ld_off, 0.99):.2f} (image read once, then memoized; "
            "per container: a hard link, a JSON record, a worker-thread hop)"
        )
        for on_key, off_key in (("c", "e"), ("d", "f")):
            on_med, off_med = (
                statistics.median(self.latency[on_key]),
                statistics.median(self.latency[off_key]),
            )
            lines.append(
                f"  CRI ratio {CASES[on_key][:3]}/{CASES[off_key][:3]} (ld.so.cache on/off): "
                f"median x{on_med / off_med:.2f}, "
                f"p90 x{quantile(self.latency[on_key], 0.9) / quantile(self.latency[off_key], 0.9):.2f}"
            )
        sizes = {k: len(v) for k, v in requests.items()}
        lines.append(f"  request sizes: (b) {sizes['b']} B, (c) {sizes['c']} B")
        if self.logged_ms:
            xs = [x * 1000 for x in self.logged_ms]
            lines.append(
                f"  as the daemon logged it (ms=) for the {len(xs)} real GPU creates: "
                f"p50 {quantile(xs, 0.5):.0f}, p90 {quantile(xs, 0.9):.0f}, p99 {quantile(xs, 0.99):.0f}"
            )
        if self.hist_count:
            le = {bound: count / self.hist_count for bound, count in sorted(self.hist.items())}
            shares = ", ".join(
                f"{share:.0%} <= {bound * 1e3:g} ms" for bound, share in le.items() if bound <= 0.001
            )
            lines.append(
                f"  metrics histogram (all {int(self.hist_count)} creates the daemons saw): mean "
                f"{self.hist_sum / self.hist_count * 1e6:.0f}; {shares}"
            )
        lines += [
            "",
            f"Daemon ({self.daemon_count} starts, external plugin, fake NVML)",
        ]
        if self.to_registered_ms:
            xs = self.to_registered_ms
            lines.append(
                f"  exec -> registered (ms):       median {statistics.median(xs):.0f} "
                f"(min {min(xs):.0f}, max {max(xs):.0f})"
            )
        if self.startup_ms:
            lines.append(
                f"  exec -> ready to register (ms, imports + driver discovery, from the daemon): "
                f"median {statistics.median(self.startup_ms):.0f}"
            )
        if self.rss_mib:
            lines.append(
                f"  steady RSS after {2 * (a.n // a.rounds)}+ creates (MiB): median "
                f"{statistics.median(self.rss_mib):.1f} (max {max(self.rss_mib):.1f})"
            )
        return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--containerd", choices=("1.7", "2.1"), default="1.7")
    p.add_argument("-n", type=int, default=50, help="measured creates per case (default 50)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (and daemon starts), default 5")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the fake host (default 8)")
    p.add_argument("--inproc", type=int, default=2000, help="in-process handler runs per case")
    p.add_argument("--seed", type=int, default=20241128)
    p.add_argument("--output", type=Path, help="also write the report to this file")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.py starts containerd and runc: run it as root", file=sys.stderr)
        return 2
    if args.rounds < 1 or args.n < args.rounds:
        print(
            f"need --rounds >= 1 and -n >= --rounds (got -n {args.n}, --rounds {args.rounds})",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="nri-bench-", dir="/tmp"))  # short: unix socket paths
    try:
        text = Bench(args, work).run()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(text, end="")
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

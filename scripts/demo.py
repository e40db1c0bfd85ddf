"""The demo: a GPU container on a private containerd 1.7, served by the real NRI plugin.

Run through ``scripts/demo`` (which bootstraps first), as root. Steps:

1. build a fake 2-GPU NVIDIA driver root in a temp dir (``tests/fakehost``: real ELF driver
   libraries, ld.so.cache, /proc/driver/nvidia, device nodes, a fake NVML);
2. start a private containerd 1.7 with NRI enabled (``tests/e2e/containerd.py``) and import the
   local test images;
3. start ``nvidia-nri-plugin run`` (the real daemon, ``python -m nri_plugin``) against its NRI
   socket and the fake driver root, and wait until containerd registered it;
4. create a pod and a ``debian-layout`` container with ``NVIDIA_VISIBLE_DEVICES=all`` that lists
   ``/dev/nvidia*``, the mounted driver libraries, and runs ``gpu-probe`` (dlopen libcuda.so.1,
   cuInit, cuDriverGetVersion);
5. print the container's output, the adjustment seen in the final OCI spec, and the plugin's log
   record; tear everything down (also on Ctrl-C, SIGTERM or an error).

Exit status 0 only when the container got both GPUs, the libraries, and the probe succeeded.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import FrameType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.e2e.containerd import Containerd, _mounts_under  # noqa: E402
from tests.e2e.cri import ContainerRequest, CriError, load_cri  # noqa: E402
from tests.e2e.deps import E2EDeps, E2EDepsMissing  # noqa: E402
from tests.e2e.gpu_plugin_runner import (  # noqa: E402
    GpuPluginProcess,
    PluginProcessError,
    build_e2e_host,
    driver_mounts,
    nvidia_devices,
)
from tests.e2e.images import build_images  # noqa: E402

GPU_COUNT = 2
CONTAINER_SCRIPT = (
    "echo '$ ls -l /dev/nvidia*'; ls -l /dev/nvidia*; "
    "echo '$ ls -l /usr/lib/x86_64-linux-gnu/ | grep -e libcuda -e libnvidia-ml'; "
    "ls -l /usr/lib/x86_64-linux-gnu/ | grep -e libcuda -e libnvidia-ml; "
    "echo '$ /usr/bin/gpu-probe'; /usr/bin/gpu-probe"
)


class Interrupted(Exception):
    """SIGTERM/SIGINT: stop and tear down."""


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def step(text: str, t0: float) -> None:
    print(f"[{time.monotonic() - t0:5.1f}s] {text}", flush=True)


def summary(spec: dict[str, Any], plugin: GpuPluginProcess) -> list[str]:
    lines = ["adjustment in the final OCI spec:"]
    devices = nvidia_devices(spec)
    lines.append(f"  devices ({len(devices)}):")
    for path, d in sorted(devices.items()):
        lines.append(f"    {path:24} {d['type']} {d['major']}:{d['minor']}  mode {d.get('fileMode', 0):04o}")
    mounts = driver_mounts(spec, plugin.host)
    lines.append(f"  bind mounts from the driver root {plugin.host.root} ({len(mounts)}), by directory:")
    by_dir: dict[str, list[str]] = {}
    for dest in sorted(mounts):
        directory, _, name = dest.rpartition("/")
        by_dir.setdefault(directory or "/", []).append(name)
    for directory, names in sorted(by_dir.items()):
        text = f"{directory} ({len(names)}): {', '.join(names)}"
        lines += textwrap.wrap(
            text, width=110, initial_indent="    ", subsequent_indent="        ", break_on_hyphens=False
        )
    cuda = mounts.get(f"{plugin.host.lib_dir}/libcuda.so.1")
    if cuda is not None:
        lines.append(f"  e.g. {cuda['destination']} <- {cuda['source']} [{','.join(cuda['options'])}]")
    return lines


def demo(base: Path, t0: float) -> int:
    try:
        deps = E2EDeps.locate()
    except E2EDepsMissing as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    cri_modules = load_cri(deps.cri_proto, deps.cache / "cri_gen")

    host = build_e2e_host(base, GPU_COUNT)
    step(f"fake driver root with {GPU_COUNT} GPUs (driver {host.driver_version}) in {host.root}", t0)

    images = build_images(deps, base / "images")
    ctrd = Containerd("1.7", base / "ctrd", deps, cri_modules, sandbox_image=images.refs["pause"])
    plugin = GpuPluginProcess(host, ctrd.nri_socket, base / "plugin")
    try:
        ctrd.start()
        for key in ("pause", "debian-layout"):
            ctrd.import_image(images.archives[key])
        step(f"containerd {ctrd.package_version} running (pid {ctrd.pid}), NRI socket {ctrd.nri_socket}", t0)

        registered = plugin.start()
        step(f"nvidia-nri-plugin registered (pid {plugin.pid}): {registered.line}", t0)

        env = {"NVIDIA_VISIBLE_DEVICES": "all"}
        req = ContainerRequest(
            image=images.refs["debian-layout"],
            command=["sh", "-c", CONTAINER_SCRIPT],
            env=env,
            name="gpu-demo",
        )
        step(
            f"running container gpu-demo ({images.refs['debian-layout']}) with NVIDIA_VISIBLE_DEVICES=all", t0
        )
        result = ctrd.cri.run_container(req)

        print("\n--- container output " + "-" * 50)
        print(result.log.rstrip())
        print("-" * 72 + "\n")
        for line in summary(result.spec, plugin):
            print(line)
        adjusted = plugin.wait_for("GPU container adjusted", container="gpu-demo")
        print("\nplugin log record:\n  " + adjusted.line + "\n")

        expected = {"/dev/nvidiactl", *(f"/dev/nvidia{g.minor}" for g in host.gpus)}
        problems = []
        if result.exit_code != 0:
            problems.append(f"the container exited with {result.exit_code}")
        if "PROBE_OK" not in result.log:
            problems.append("gpu-probe did not print PROBE_OK")
        missing = expected - set(nvidia_devices(result.spec))
        if missing:
            problems.append(f"device nodes missing from the spec: {sorted(missing)}")
        if f"{host.lib_dir}/libcuda.so.1" not in driver_mounts(result.spec, host):
            problems.append("libcuda.so.1 is not mounted")
        if problems:
            print("demo FAILED: " + "; ".join(problems), file=sys.stderr)
            return 1
        step("demo OK: the container saw both GPUs and the driver; tearing down", t0)
        return 0
    finally:
        _ignore_signals()  # a second Ctrl-C must not cut the teardown short
        try:
            code = plugin.stop()
            if code != 0:
                print(f"demo: nvidia-nri-plugin exited with {code}\n{plugin.diagnostics()}", file=sys.stderr)
        finally:
            plugin.kill()
            ctrd.shutdown()


def main() -> int:
    import os

    if os.geteuid() != 0:
        print("demo: run as root (it starts containerd and runc)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    base = Path(tempfile.mkdtemp(prefix="nri-demo-", dir="/tmp"))
    try:
        return demo(base, t0)
    except Interrupted as exc:
        print(f"\ndemo: interrupted by {exc}; tore everything down", file=sys.stderr)
        return 130
    except (CriError, PluginProcessError, RuntimeError, OSError) as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        # Ignore further signals while cleaning up the temp dir; leave it if something is still
        # mounted below it (never remove a live mount's contents).
        _ignore_signals()
        if _mounts_under(base):
            print(f"demo: mounts left under {base}; not removing it", file=sys.stderr)
        else:
            with contextlib.suppress(OSError):
                shutil.rmtree(base)
        step("cleaned up", t0)


if __name__ == "__main__":
    sys.exit(main())

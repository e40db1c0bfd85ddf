"""Run the real ``nvidia-nri-plugin run`` daemon against a private containerd and a fake GPU host.

Used by the GPU end-to-end tests (``test_gpu_e2e.py``, ``test_privileged_e2e.py``) and the demo
(``scripts/demo.py``).

:func:`build_e2e_host`
    A fake NVIDIA host (``tests/fakehost``) with ``gpu_count`` GPUs below a directory.
:class:`GpuPluginProcess`
    ``python -m nri_plugin run --socket <nri.sock> --driver-root <fake> ...`` as a child process
    in its own session, logging JSON records to a file. :meth:`~GpuPluginProcess.start` returns
    once the daemon logged ``registered`` (containerd accepted it); :meth:`~GpuPluginProcess.stop`
    sends SIGTERM to the recorded PID only and checks the exit code.
:func:`run_in_pod`
    Create a container in an existing pod, read its final OCI spec, start it, wait for its exit
    and read its log, then remove the container (the pod stays for the next container).
:func:`nvidia_devices` / :func:`device_rule_for` / :func:`mounts_by_destination`
    Small accessors over the final OCI spec.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.fakehost import FakeHost, build_fake_host, make_gpus

from .cri import ContainerRequest, ContainerResult, CriClient, Pod
from .deps import REPO_ROOT

NVIDIA_MAJOR = 195
CTL_MINOR = 255


def build_e2e_host(base: Path, gpu_count: int) -> FakeHost:
    """A fake host with ``gpu_count`` GPUs, NVML, /proc and real device nodes, in a new directory
    ``<base>/fakehost-<N>gpu-XXXX`` (fresh each call: the builder does not rebuild in place)."""
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"fakehost-{gpu_count}gpu-", dir=base))
    return build_fake_host(root, gpus=make_gpus(gpu_count))


def plugin_command(
    host: FakeHost,
    socket: Path,
    log_file: Path,
    *,
    config: Path | None = None,
    extra_args: Sequence[str] = (),
    log_level: str = "debug",
) -> list[str]:
    """The daemon's command line: the real CLI entry point, pointed at the fake host."""
    roots = host.roots
    cmd = [
        sys.executable,
        "-m",
        "nri_plugin",
        "run",
        "--socket",
        str(socket),
        "--driver-root",
        roots.driver_root,
        "--dev-root",
        roots.dev_root,
        "--proc-root",
        roots.proc_root,
        "--sys-root",
        roots.sys_root,
        "--run-root",
        roots.run_root,
        "--log-format",
        "json",
        "--log-level",
        log_level,
        "--log-file",
        str(log_file),
        "--state-dir",
        str(log_file.parent / "state"),
    ]
    if config is not None:
        cmd += ["--config", str(config)]
    if not any(a.startswith(("--container-ldcache", "--containerd-socket")) for a in extra_args):
        # The generated ld.so.cache needs containerd's API socket (test_ldcache_e2e.py passes it);
        # elsewhere it is off, and the state directory never lands in the host's /run.
        cmd += ["--container-ldcache", "off"]
    if not any(a.startswith("--runtime-dir") for a in extra_args):
        cmd += ["--runtime-dir", str(log_file.parent / "runtime")]
    return [*cmd, *extra_args]


class PluginProcessError(AssertionError):
    """The daemon did not start, register or stop as expected."""


@dataclass(frozen=True)
class LogRecord:
    msg: str
    level: str
    fields: Mapping[str, Any]
    line: str


class GpuPluginProcess:
    """The real daemon as a subprocess (see the module docstring)."""

    def __init__(
        self,
        host: FakeHost,
        socket: Path,
        workdir: Path,
        *,
        config: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.socket = socket
        self.log_file = workdir / "nvidia-nri-plugin.log"
        self.stderr_file = workdir / "nvidia-nri-plugin.stderr"
        self.command = plugin_command(host, socket, self.log_file, config=config, extra_args=extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    # --- log ---------------------------------------------------------------------------------------

    def records(self) -> list[LogRecord]:
        """Every JSON record the daemon wrote so far (all starts)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out: list[LogRecord] = []
        for line in text.splitlines():
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("msg"), str):
                fields = {k: v for k, v in doc.items() if k not in ("ts", "level", "msg")}
                out.append(LogRecord(doc["msg"], str(doc.get("level", "")), fields, line))
        return out

    def find(self, msg: str, **fields: Any) -> list[LogRecord]:
        """Records with message ``msg`` whose fields include ``fields``."""
        return [
            r for r in self.records() if r.msg == msg and all(r.fields.get(k) == v for k, v in fields.items())
        ]

    def diagnostics(self) -> str:
        stderr = self.stderr_file.read_text(errors="replace") if self.stderr_file.exists() else ""
        log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return (
            f"command: {' '.join(self.command)}\n--- log ({self.log_file}) ---\n{log[-4000:]}"
            f"\n--- stderr ---\n{stderr[-2000:]}"
        )

    def wait_for(self, msg: str, count: int = 1, timeout: float = 15.0, **fields: Any) -> LogRecord:
        """Wait until at least ``count`` records ``msg`` (with ``fields``) were logged; return the last."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.find(msg, **fields)
            if len(found) >= count:
                return found[-1]
            if self._proc is not None and self._proc.poll() is not None:
                raise PluginProcessError(
                    f"nvidia-nri-plugin exited with {self._proc.returncode} while waiting for "
                    f"{msg!r} #{count}\n{self.diagnostics()}"
                )
            if time.monotonic() > deadline:
                raise PluginProcessError(
                    f"nvidia-nri-plugin did not log {msg!r} #{count} within {timeout}s\n{self.diagnostics()}"
                )
            time.sleep(0.02)

    # --- lifecycle -----------------------------------------------------------------------------------

    def discoveries(self) -> int:
        """How many first discoveries finished (with or without a driver) in all starts so far."""
        return sum(
            1
            for r in self.records()
            if r.msg == "host driver discovered" or r.msg.startswith("no usable NVIDIA driver")
        )

    def start(self, timeout: float = 20.0, *, wait_discovery: bool = True) -> LogRecord:
        """Start the daemon; return its ``registered`` record once containerd accepted it.

        The daemon registers without waiting for its first driver discovery (by design); unless
        ``wait_discovery`` is False this also waits for that discovery, so that a test's first GPU
        container is not refused with "discovery in progress" on a loaded machine."""
        discovered_before = self.discoveries()
        if self.pid is not None:
            raise PluginProcessError(f"nvidia-nri-plugin is already running (pid {self.pid})")
        registered_before = len(self.find("registered"))
        env = {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO_ROOT),
            # No toolkit config.toml of the machine may leak in: only --config (when given) counts.
            "XDG_CONFIG_HOME": str(self.log_file.parent / "xdg"),
        }
        with open(self.stderr_file, "ab") as err:
            self._proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self.starts += 1
        record = self.wait_for("registered", count=registered_before + 1, timeout=timeout)
        deadline = time.monotonic() + 30
        while wait_discovery and self.discoveries() <= discovered_before:
            if time.monotonic() > deadline:
                raise PluginProcessError(f"no driver discovery logged within 30 s\n{self.diagnostics()}")
            time.sleep(0.02)
        return record

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM the recorded PID; return its exit code (SIGKILL after ``timeout``)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
                raise PluginProcessError(
                    f"nvidia-nri-plugin did not stop within {timeout}s of SIGTERM\n{self.diagnostics()}"
                ) from None
        return int(proc.returncode)

    def kill(self) -> None:
        """Best-effort cleanup: SIGKILL the recorded PID if it still runs."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def __enter__(self) -> GpuPluginProcess:
        """Started, registered AND with its first discovery done: the daemon registers after at
        most 0.5 s of discovery, and on a loaded machine a GPU create could otherwise meet the
        by-design "discovery still in progress" refusal (tests of that use :meth:`start`)."""
        self.start()
        self.wait_for("host driver discovered", count=self.starts, timeout=30)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self.kill()


# --- CRI helpers --------------------------------------------------------------------------------------


def run_in_pod(cri: CriClient, pod: Pod, req: ContainerRequest, *, timeout: float = 30.0) -> ContainerResult:
    """Run ``req`` to completion in ``pod``; the container is removed afterwards, the pod stays.

    CreateContainer errors (e.g. an NRI plugin refused the container) propagate as ``CriError``.
    """
    cid = cri.create_container(pod, req)
    try:
        spec = cri.container_spec(cid)
        cri.start_container(cid)
        code = cri.wait_exit(cid, timeout)
        log = cri.read_log(cid)
        return ContainerResult(spec=spec, exit_code=code, log=log, container_id=cid)
    finally:
        cri.remove_container(cid)


# --- OCI spec accessors -----------------------------------------------------------------------------


def spec_devices(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("linux", {}).get("devices") or [])


def spec_device_rules(spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(spec.get("linux", {}).get("resources", {}).get("devices") or [])


def nvidia_devices(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``linux.devices`` entries whose path starts with ``/dev/nvidia``, by path."""
    return {d["path"]: d for d in spec_devices(spec) if str(d.get("path", "")).startswith("/dev/nvidia")}


def device_rule_for(spec: Mapping[str, Any], dev_type: str, major: int, minor: int) -> dict[str, Any] | None:
    """The last cgroup rule naming exactly this device (the one that decides), or None."""
    match = None
    for rule in spec_device_rules(spec):
        if rule.get("type") == dev_type and rule.get("major") == major and rule.get("minor") == minor:
            match = rule
    return match


def mounts_by_destination(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["destination"]: m for m in spec.get("mounts") or []}


def driver_mounts(spec: Mapping[str, Any], host: FakeHost) -> dict[str, dict[str, Any]]:
    """Mounts whose source lies inside the fake host's tree."""
    prefix = str(host.root).rstrip("/") + "/"
    return {
        d: m for d, m in mounts_by_destination(spec).items() if str(m.get("source", "")).startswith(prefix)
    }


__all__ = [
    "CTL_MINOR",
    "NVIDIA_MAJOR",
    "GpuPluginProcess",
    "LogRecord",
    "PluginProcessError",
    "build_e2e_host",
    "device_rule_for",
    "driver_mounts",
    "mounts_by_destination",
    "nvidia_devices",
    "plugin_command",
    "run_in_pod",
    "spec_device_rules",
    "spec_devices",
]

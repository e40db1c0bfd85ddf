"""A private containerd (1.7 or 2.1) with NRI, started and cleaned up by the tests themselves.

Built from the verified facts in ``/work/shared/reference/containerd-e2e.md``. Everything lives
under one work directory: root, state, the gRPC/ttrpc sockets, the NRI socket, ``plugin_path``,
``plugin_config_path``, CNI dirs, the private runc root, the log. Containers run under
bookworm's runc 1.1.5 (``BinaryName``) with ``restrict_oom_score_adj = true`` and the overlayfs
snapshotter; pods get a private cgroup parent so leftovers can be removed. The only path used
outside the work directory is ``/run/containerd/s/`` (containerd 1.7's shims hard-code it).

Reusable pieces (other e2e tests should build on these):

``Containerd(version, workdir, deps, nri_plugin_path=None, nri_config_path=None, extra_config=None)``
    ``start()`` / ``stop()`` / ``restart()`` / ``kill()`` (SIGKILL, a crash) / ``ensure_running()``;
    ``import_image(archive)``, ``ctr(*args)``, ``cri`` (a :class:`~tests.e2e.cri.CriClient`),
    ``nri_socket``, ``plugin_path``, ``plugin_config_path``, ``package_version``,
    ``log_text()`` (containerd's own log), ``install_plugin(...)`` (a runtime-launched plugin).
    ``extra_config`` is a nested dict deep-merged into the generated TOML (use the real section
    names of the version: see :func:`base_config`).
``write_launched_plugin(dir, index, name, body)``
    An ``NN-name`` executable whose shebang is the venv's python, that works with containerd's
    empty environment.

The pytest fixtures built from these live in ``conftest.py``: ``containerd`` (session scope, one
per version, ids ``ctrd17`` / ``ctrd21``), ``cri`` (its client, cleaned after each test),
``e2e_images``, ``e2e_deps``, ``make_containerd`` (extra private instances for one test).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cri import CriClient, CriError, CriModules
from .deps import REPO_ROOT, E2EDeps

CGROUP_ROOT = Path("/sys/fs/cgroup")


class ContainerdError(RuntimeError):
    """The private containerd failed to start, stop or do what was asked."""


# --- TOML ------------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as a TOML value")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else f'"{k}"'


def to_toml(doc: Mapping[str, Any]) -> str:
    """Serialize nested dicts (tables), scalars and lists to TOML."""
    lines: list[str] = []

    def table(prefix: list[str], d: Mapping[str, Any]) -> None:
        scalars = [(k, v) for k, v in d.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in d.items() if isinstance(v, Mapping)]
        if prefix:
            lines.append("[" + ".".join(_toml_key(p) for p in prefix) + "]")
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        lines.append("")
        for k, v in tables:
            table([*prefix, k], v)

    table([], doc)
    return "\n".join(lines)


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# --- configuration -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """All private paths of one containerd instance."""

    workdir: Path

    @property
    def root(self) -> Path:
        return self.workdir / "root"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def address(self) -> Path:
        return self.workdir / "ctrd.sock"

    @property
    def ttrpc_address(self) -> Path:
        return self.workdir / "ctrd.ttrpc"

    @property
    def nri_socket(self) -> Path:
        return self.workdir / "nri" / "nri.sock"

    @property
    def plugin_path(self) -> Path:
        return self.workdir / "nri-plugins"

    @property
    def plugin_config_path(self) -> Path:
        return self.workdir / "nri-conf.d"

    @property
    def runc_root(self) -> Path:
        return self.workdir / "runc"

    @property
    def cni_bin(self) -> Path:
        return self.workdir / "cni" / "bin"

    @property
    def cni_conf(self) -> Path:
        return self.workdir / "cni" / "net.d"

    @property
    def pod_logs(self) -> Path:
        return self.workdir / "pod-logs"

    @property
    def config_file(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def log_file(self) -> Path:
        return self.workdir / "containerd.log"

    @property
    def opt(self) -> Path:
        return self.workdir / "opt"


def base_config(
    version: str,
    layout: Layout,
    runc: Path,
    *,
    sandbox_image: str,
    plugin_path: Path,
    plugin_config_path: Path,
) -> dict[str, Any]:
    """The generated configuration (before ``extra_config``), v2 for 1.7 and v3 for 2.1.

    Section names follow ``containerd --config /dev/null config default`` of each version.
    """
    runc_runtime = {
        "runtime_type": "io.containerd.runc.v2",
        "options": {
            "BinaryName": str(runc),
            "Root": str(layout.runc_root),
            "SystemdCgroup": False,
        },
    }
    cni = {"bin_dir": str(layout.cni_bin), "conf_dir": str(layout.cni_conf)}
    nri = {
        "disable": False,
        "disable_connections": False,
        "socket_path": str(layout.nri_socket),
        "plugin_path": str(plugin_path),
        "plugin_config_path": str(plugin_config_path),
        "plugin_registration_timeout": "5s",
        "plugin_request_timeout": "2s",
    }
    common: dict[str, Any] = {
        "root": str(layout.root),
        "state": str(layout.state),
        "grpc": {"address": str(layout.address)},
        "ttrpc": {"address": str(layout.ttrpc_address)},
        "debug": {"level": "info"},
    }
    if version == "1.7":
        return {
            "version": 2,
            **common,
            "disabled_plugins": [
                "io.containerd.snapshotter.v1.aufs",
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.zfs",
                "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.blockfile",
                "io.containerd.tracing.processor.v1.otlp",
                "io.containerd.internal.v1.tracing",
            ],
            "plugins": {
                "io.containerd.grpc.v1.cri": {
                    "sandbox_image": sandbox_image,
                    "disable_apparmor": True,
                    "enable_selinux": False,
                    "enable_cdi": False,
                    "restrict_oom_score_adj": True,
                    "netns_mounts_under_state_dir": True,
                    "stream_server_address": "127.0.0.1",
                    "stream_server_port": "0",
                    "containerd": {
                        "snapshotter": "overlayfs",
                        "default_runtime_name": "runc",
                        "runtimes": {"runc": runc_runtime},
                    },
                    "cni": cni,
                },
                "io.containerd.nri.v1.nri": nri,
                "io.containerd.internal.v1.opt": {"path": str(layout.opt)},
            },
        }
    if version == "2.1":
        return {
            "version": 3,
            **common,
            "disabled_plugins": [
                "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.devmapper",
                "io.containerd.snapshotter.v1.blockfile",
                "io.containerd.snapshotter.v1.erofs",
                "io.containerd.snapshotter.v1.zfs",
                "io.containerd.tracing.processor.v1.otlp",
                "io.containerd.internal.v1.tracing",
            ],
            "plugins": {
                "io.containerd.cri.v1.images": {
                    "snapshotter": "overlayfs",
                    "pinned_images": {"sandbox": sandbox_image},
                },
                "io.containerd.cri.v1.runtime": {
                    "disable_apparmor": True,
                    "enable_selinux": False,
                    "enable_cdi": False,
                    "cdi_spec_dirs": [str(layout.workdir / "cdi")],
                    "restrict_oom_score_adj": True,
                    "netns_mounts_under_state_dir": True,
                    "containerd": {"default_runtime_name": "runc", "runtimes": {"runc": runc_runtime}},
                    "cni": {"bin_dirs": [str(layout.cni_bin)], "conf_dir": str(layout.cni_conf)},
                },
                "io.containerd.grpc.v1.cri": {
                    "stream_server_address": "127.0.0.1",
                    "stream_server_port": "0",
                },
                "io.containerd.image-verifier.v1.bindir": {"bin_dir": str(layout.opt / "image-verifier")},
                "io.containerd.nri.v1.nri": nri,
                "io.containerd.internal.v1.opt": {"path": str(layout.opt)},
            },
        }
    raise ValueError(f"containerd version {version!r} is not supported; use '1.7' or '2.1'")


def write_launched_plugin(plugin_dir: Path, index: str, name: str, body: str) -> Path:
    """Install a runtime-launched plugin ``<plugin_dir>/<index>-<name>``.

    ``body`` is Python source run after the repository root is put on ``sys.path``. The shebang
    is the absolute path of this venv's python (containerd gives an empty environment: no PATH).
    """
    if len(index) != 2 or not index.isdigit():
        raise ValueError(f"plugin index {index!r} must be exactly two digits, e.g. '10'")
    plugin_dir.mkdir(parents=True, exist_ok=True)
    path = plugin_dir / f"{index}-{name}"
    python = Path(sys.prefix) / "bin" / "python"
    path.write_text(f"#!{python}\nimport sys\nsys.path.insert(0, {str(REPO_ROOT)!r})\n{body}\n")
    path.chmod(0o755)
    return path


# --- process housekeeping ----------------------------------------------------------------------


def _proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _proc_cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.02)
    return False


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie (pid 1 here reaps orphans lazily)."""
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _shim_socket(cmdline: list[str]) -> Path | None:
    """containerd 1.7's shim socket: /run/containerd/s/<sha256 of address/namespace/id>."""
    args = dict(itertools.pairwise(cmdline))
    address, namespace, cid = args.get("-address"), args.get("-namespace"), args.get("-id")
    if not (address and namespace and cid):
        return None
    digest = hashlib.sha256(os.path.join(address, namespace, cid).encode()).hexdigest()
    return Path("/run/containerd/s") / digest


def _mounts_under(prefix: Path) -> list[str]:
    out: list[str] = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            mount_point = line.split()[4].replace("\\040", " ")
            if mount_point == str(prefix) or mount_point.startswith(str(prefix) + "/"):
                out.append(mount_point)
    return out


class Containerd:
    """One private containerd; see the module docstring."""

    def __init__(
        self,
        version: str,
        workdir: Path,
        deps: E2EDeps,
        cri_modules: CriModules,
        *,
        sandbox_image: str,
        nri_plugin_path: Path | None = None,
        nri_config_path: Path | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> None:
        if version not in deps.containerd:
            raise ValueError(
                f"containerd version {version!r} is not supported; use one of {sorted(deps.containerd)}"
            )
        self.version = version
        self.binaries = deps.containerd[version]
        self.deps = deps
        self.layout = Layout(workdir)
        self.plugin_path = nri_plugin_path or self.layout.plugin_path
        self.plugin_config_path = nri_config_path or self.layout.plugin_config_path
        # Unique per work directory: concurrent test sessions must not share a cgroup parent.
        self.cgroup_parent = f"/nri-e2e-{hashlib.sha256(str(workdir.resolve()).encode()).hexdigest()[:12]}"
        self.config = deep_merge(
            base_config(
                version,
                self.layout,
                deps.runc,
                sandbox_image=sandbox_image,
                plugin_path=self.plugin_path,
                plugin_config_path=self.plugin_config_path,
            ),
            extra_config or {},
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self._cri_modules = cri_modules
        self._cri: CriClient | None = None
        self.starts = 0

    # --- paths / identity ---

    @property
    def package_version(self) -> str:
        return self.binaries.package_version

    @property
    def address(self) -> Path:
        return self.layout.address

    @property
    def nri_socket(self) -> Path:
        return self.layout.nri_socket

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def cri(self) -> CriClient:
        if self._cri is None:
            self._cri = CriClient(
                self._cri_modules,
                self.address,
                log_root=self.layout.pod_logs,
                cgroup_parent=self.cgroup_parent,
            )
        return self._cri

    def log_text(self, tail: int | None = None) -> str:
        try:
            text = self.layout.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def _env(self) -> dict[str, str]:
        # containerd finds containerd-shim-runc-v2 on PATH: the private one must come first.
        system = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        path = f"{self.binaries.bin_dir}:{self.deps.runc.parent}:{system}"
        return {"PATH": path, "HOME": "/root", "LANG": "C.UTF-8"}

    # --- lifecycle ---

    def start(self, timeout: float = 30.0) -> None:
        if self.pid is not None:
            raise ContainerdError(
                f"containerd {self.version} in {self.layout.workdir} is already running (pid {self.pid})"
            )
        for d in (
            self.layout.root,
            self.layout.state,
            self.layout.runc_root,
            self.layout.cni_bin,
            self.layout.cni_conf,
            self.layout.pod_logs,
            self.plugin_path,
            self.plugin_config_path,
            self.layout.opt,
            self.layout.nri_socket.parent,
        ):
            d.mkdir(parents=True, exist_ok=True)
        self.layout.config_file.write_text(to_toml(self.config))
        log = open(self.layout.log_file, "ab")  # noqa: SIM115 - handed to the child
        try:
            self._proc = subprocess.Popen(
                [str(self.binaries.containerd), "--config", str(self.layout.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env(),
                cwd=self.layout.workdir,
                start_new_session=True,
            )
        finally:
            log.close()
        self.starts += 1
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error = "socket not there yet"
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ContainerdError(
                    f"containerd {self.version} exited with {self._proc.returncode} during start-up; "
                    f"its log ({self.layout.log_file}) ends with:\n{self.log_text(tail=30)}"
                )
            if self.address.exists():
                try:
                    self.cri.version(timeout=2.0)
                    nri_wanted = not self.config["plugins"]["io.containerd.nri.v1.nri"].get("disable", False)
                    if not nri_wanted or self.nri_socket.exists():
                        return
                    last_error = f"NRI socket {self.nri_socket} missing"
                except CriError as exc:
                    last_error = exc.message
            time.sleep(0.05)
        raise ContainerdError(
            f"containerd {self.version} not ready within {timeout}s ({last_error}); "
            f"its log ({self.layout.log_file}) ends with:\n{self.log_text(tail=30)}"
        )

    def ensure_running(self) -> None:
        if self.pid is None:
            self._reap()
            self.start()

    def kill(self) -> None:
        """SIGKILL containerd (a crash); shims and containers survive, as in production."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
        self._reap()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``: only the PID this object started."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._reap()

    def restart(self, *, kill: bool = False) -> None:
        """Stop (or crash, with ``kill=True``) and start again with the same state."""
        if kill:
            self.kill()
        else:
            self.stop()
        self.start()

    def _reap(self) -> None:
        if self._cri is not None:
            self._cri.close()
            self._cri = None

    def shutdown(self) -> None:
        """Full teardown: remove pods via CRI, stop containerd, clean shims, cgroups and mounts."""
        if self.pid is not None:
            with contextlib.suppress(CriError):
                self.cri.remove_all()
        self.stop()
        self.cleanup_leftovers()

    def shim_pids(self) -> list[int]:
        """Shims of this instance: our shim binary and our containerd address on the command line."""
        shim = str(self.binaries.bin_dir / "containerd-shim-runc-v2")
        found = []
        for pid in _pids():
            if _proc_exe(pid) == shim and str(self.address) in _proc_cmdline(pid) and pid_alive(pid):
                found.append(pid)
        return found

    def cleanup_leftovers(self) -> None:
        """Remove what a crashed or killed instance left: containers (through the private runc
        root, one sub-root per containerd namespace), our shims by PID (and their sockets in
        /run/containerd/s), mounts under the work directory, the private cgroup parent."""
        runc = str(self.deps.runc)
        runc_root = self.layout.runc_root
        roots = [p for p in runc_root.iterdir() if p.is_dir()] if runc_root.is_dir() else []
        for root in roots:
            listing = subprocess.run(
                [runc, "--root", str(root), "list", "-q"], capture_output=True, text=True
            )
            for cid in listing.stdout.split():
                subprocess.run([runc, "--root", str(root), "delete", "--force", cid], capture_output=True)
        for pid in self.shim_pids():
            socket = _shim_socket(_proc_cmdline(pid))
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 5)
            if socket is not None:
                with contextlib.suppress(OSError):
                    socket.unlink()
        for mount_point in sorted(_mounts_under(self.layout.workdir), key=len, reverse=True):
            subprocess.run(["umount", "-l", mount_point], capture_output=True)
        name = self.cgroup_parent.strip("/")
        if CGROUP_ROOT.is_dir():
            for hierarchy in CGROUP_ROOT.iterdir():
                top = hierarchy / name
                if top.is_dir():
                    for d in sorted(
                        (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
                    ):
                        with contextlib.suppress(OSError):
                            d.rmdir()
                    with contextlib.suppress(OSError):
                        top.rmdir()

    # --- images / ctr ---

    def ctr(self, *args: str, timeout: float = 60.0) -> str:
        cmd = [str(self.binaries.ctr), "--address", str(self.address), "-n", "k8s.io", *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self._env())
        if res.returncode != 0:
            raise ContainerdError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def import_image(self, archive: Path) -> None:
        self.ctr("images", "import", str(archive))

    def install_plugin(self, index: str, name: str, body: str, config: str | None = None) -> Path:
        """Install a runtime-launched plugin (takes effect at the next start) and its config."""
        path = write_launched_plugin(self.plugin_path, index, name, body)
        if config is not None:
            self.plugin_config_path.mkdir(parents=True, exist_ok=True)
            (self.plugin_config_path / f"{index}-{name}.conf").write_text(config)
        return path

    def uninstall_plugins(self) -> None:
        for p in (self.plugin_path, self.plugin_config_path):
            if p.is_dir():
                for f in p.iterdir():
                    f.unlink()

"""``nvidia-nri-plugin doctor``: is this node ready for the plugin, and is anything in its way?

Checks, each with a class; the exit code is the OR of the classes that have a failing check
(0: nothing failed; warnings never fail):

=====  =========  ===========================================================================
 bit   class      checks
=====  =========  ===========================================================================
   8   nri        the NRI socket exists and is a socket; a probe plugin can register with the
                  runtime (RegisterPlugin, Configure, Synchronize) and disconnect again
  16   injector   no other GPU injector: containerd's default runtime is not the NVIDIA runtime,
                  no NVIDIA CDI spec in the CDI directories, no other NVIDIA NRI plugin in the
                  plugin directory, not more than one instance of this plugin on the same socket
  32   driver     a driver snapshot exists under the configured roots; NVML loads (a warning
                  when only /proc/driver/nvidia answered)
  64   devchar    with the systemd cgroup driver: a /dev/char/M:m link for every NVIDIA device
                  node (runc turns spec device rules into DeviceAllow=/dev/char/M:m)
=====  =========  ===========================================================================

``2`` is a usage or configuration error, as for every subcommand. Then the effective configuration
with the source of each value. ``--output json`` prints the same as one object.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TextIO

from nri_plugin.cli.common import add_config_flags, host_snapshot, load_layers

if TYPE_CHECKING:
    from nri_plugin.config import Layer, Settings

NAME = "doctor"
HELP = "check the node: NRI, other GPU injectors, the driver, /dev/char links"
DESCRIPTION = (
    "Check that containerd's NRI is enabled and accepts a plugin, that no other GPU injector is "
    "active, that the driver is usable and that /dev/char links exist where runc needs them; print "
    "the effective configuration with the source of each value. Exit code: the OR of 8 (NRI), "
    "16 (another injector), 32 (driver), 64 (/dev/char) for the classes with a failing check."
)

CLASS_BITS = {"nri": 8, "injector": 16, "driver": 32, "devchar": 64}
PROBE_NAME, PROBE_INDEX = "nvidia-nri-doctor", "99"
REGISTER_TIMEOUT_S = 6.0


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    cls: str
    status: str  # PASS, FAIL, WARN, SKIP
    message: str
    fix: str = ""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", choices=("text", "json"), default="text")
    p.add_argument(
        "--containerd-config",
        metavar="FILE",
        default="/etc/containerd/config.toml",
        help="containerd's config file (default runtime, cgroup driver)",
    )
    p.add_argument(
        "--cdi-dir",
        action="append",
        metavar="DIR",
        help="CDI spec directory (repeatable; default /etc/cdi and /var/run/cdi)",
    )
    p.add_argument(
        "--nri-plugin-dir",
        metavar="DIR",
        default="/opt/nri/plugins",
        help="containerd's NRI plugin_path (runtime-launched plugins)",
    )
    p.add_argument("--no-register", action="store_true", help="do not try to register a probe plugin")
    add_config_flags(p)


# --- NRI -------------------------------------------------------------------------------------------


def check_nri(socket_path: str, register: bool) -> list[Check]:
    import stat

    try:
        is_socket = stat.S_ISSOCK(os.stat(socket_path).st_mode)
    except OSError as e:
        return [
            Check(
                "nri.socket",
                "nri",
                "FAIL",
                f"NRI socket {socket_path}: {e.strerror}",
                "enable NRI in containerd (1.7: disable = false, deploy/containerd-1.7-nri.toml), restart "
                "it, or point nri-plugin.socket-path / --socket at the right path",
            )
        ]
    if not is_socket:
        return [Check("nri.socket", "nri", "FAIL", f"{socket_path} exists but is not a socket", "")]
    checks = [Check("nri.socket", "nri", "PASS", f"{socket_path} is a socket")]
    if register:
        checks.append(_probe_registration(socket_path))
    return checks


def _probe_registration(socket_path: str) -> Check:
    import asyncio

    try:
        runtime = asyncio.run(_register_once(socket_path))
    except Exception as e:
        return Check(
            "nri.register",
            "nri",
            "FAIL",
            f"could not register a probe plugin on {socket_path}: {type(e).__name__}: {e}",
            "check containerd's log for NRI errors; disable_connections must be false for external plugins",
        )
    return Check(
        "nri.register",
        "nri",
        "PASS",
        f"registered with {runtime} as {PROBE_INDEX}-{PROBE_NAME} and disconnected",
    )


async def _register_once(socket_path: str) -> str:
    import asyncio
    import logging

    from nri_plugin.wire import Plugin, Stub, api

    class Probe(Plugin):
        async def remove_pod_sandbox(self, pod: api.PodSandbox) -> None:  # a harmless event
            return None

    quiet = logging.getLogger("nri_plugin.doctor.probe")
    quiet.propagate = False
    stub = Stub(
        Probe(), name=PROBE_NAME, index=PROBE_INDEX, socket_path=socket_path, reconnect=False, logger=quiet
    )
    # Two local tasks and asyncio.wait rather than a TaskScope (nri_plugin.wire.tasks): the probe
    # waits for whichever ends first, and an exception of stub.run() is the check's result,
    # re-raised to the caller below, not a failure for a scope to log; the finally ends both.
    task = asyncio.get_running_loop().create_task(stub.run())
    waiter = asyncio.get_running_loop().create_task(stub.registered.wait())
    try:
        done, _ = await asyncio.wait(
            {task, waiter}, timeout=REGISTER_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter not in done:
            raise TimeoutError(f"not registered within {REGISTER_TIMEOUT_S:.0f} s")
        return f"{stub.runtime_name} {stub.runtime_version}".strip()
    finally:
        waiter.cancel()
        stub.stop()
        await asyncio.wait_for(task, 5)


# --- other GPU injectors ---------------------------------------------------------------------------


def _walk(doc: object, path: tuple[str, ...] = ()) -> Iterable[tuple[tuple[str, ...], object]]:
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*path, str(k)), v
            yield from _walk(v, (*path, str(k)))


def load_containerd_config(path: str) -> tuple[dict[str, Any] | None, str]:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f), ""
    except FileNotFoundError:
        return None, f"{path} does not exist (containerd runs on its defaults)"
    except (OSError, tomllib.TOMLDecodeError) as e:
        return None, f"{path}: {e}"


def check_default_runtime(doc: Mapping[str, Any] | None, why: str) -> Check:
    if doc is None:
        return Check("injector.runtime", "injector", "SKIP", why)
    defaults = [(p, v) for p, v in _walk(doc) if p[-1] == "default_runtime_name"]
    nvidia = [(p, v) for p, v in defaults if isinstance(v, str) and "nvidia" in v.lower()]
    if nvidia:
        return Check(
            "injector.runtime",
            "injector",
            "FAIL",
            f"containerd's default runtime is {nvidia[0][1]!r} ({'.'.join(nvidia[0][0])}): every container "
            "would get GPUs from nvidia-container-runtime AND from this plugin",
            'set default_runtime_name = "runc"; keep the nvidia runtime class only for pods that select it',
        )
    return Check(
        "injector.runtime", "injector", "PASS", "containerd's default runtime is not the NVIDIA runtime"
    )


def check_cdi(dirs: Iterable[str]) -> Check:
    found: list[str] = []
    for d in dirs:
        try:
            names = sorted(os.listdir(d))
        except OSError:
            continue
        for name in names:
            path = os.path.join(d, name)
            if not name.endswith((".yaml", ".yml", ".json")) or not os.path.isfile(path):
                continue
            try:
                with open(path, errors="replace") as f:
                    head = f.read(65536)
            except OSError:
                continue
            if "nvidia.com/" in head:
                found.append(path)
    if found:
        return Check(
            "injector.cdi",
            "injector",
            "FAIL",
            f"NVIDIA CDI spec(s) present: {', '.join(found)}; containers requesting CDI devices get GPUs "
            "from CDI as well (two injectors: 'both tried to set device' or doubled mounts)",
            "remove the specs (nvidia-ctk cdi generate output) or stop requesting GPUs through CDI",
        )
    return Check("injector.cdi", "injector", "PASS", "no NVIDIA CDI spec in " + ", ".join(dirs))


def check_nri_plugin_dir(plugin_dir: str) -> Check:
    from nri_plugin.cli.install import INSTALL_MARKER

    others: list[str] = []
    try:
        names = sorted(os.listdir(plugin_dir))
    except OSError:
        names = []
    for name in names:
        if "nvidia" not in name.lower():
            continue
        path = os.path.join(plugin_dir, name)
        try:
            with open(path, "rb") as f:
                ours = INSTALL_MARKER.encode() in f.read(8192)
        except OSError:
            ours = False
        if not ours:
            others.append(path)
    if others:
        return Check(
            "injector.nri-plugin",
            "injector",
            "FAIL",
            f"another NVIDIA NRI plugin is installed: {', '.join(others)} (e.g. the toolkit's)",
            "remove it: two plugins setting the same device fail every GPU container",
        )
    return Check("injector.nri-plugin", "injector", "PASS", f"no other NVIDIA NRI plugin in {plugin_dir}")


def _instances(socket_path: str, proc_root: str = "/proc") -> list[int]:
    """PIDs of ``nvidia-nri-plugin run`` processes that use ``socket_path`` (not this one)."""
    from nri_plugin.config import Settings

    default = Settings().socket_path
    pids: list[int] = []
    for entry in os.listdir(proc_root):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"{proc_root}/{entry}/cmdline", "rb") as f:
                argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            continue
        joined = " ".join(argv)
        if "run" not in argv or not ("nvidia-nri-plugin" in joined or "nri_plugin" in joined):
            continue
        sock = argv[argv.index("--socket") + 1] if "--socket" in argv[:-1] else default
        if os.path.normpath(sock) == os.path.normpath(socket_path):
            pids.append(int(entry))
    return pids


def check_instances(socket_path: str) -> Check:
    pids = _instances(socket_path)
    if len(pids) > 1:
        return Check(
            "injector.instances",
            "injector",
            "FAIL",
            f"{len(pids)} instances of this plugin use {socket_path}: pids {pids}",
            "run exactly one (the systemd unit OR the DaemonSet, not both)",
        )
    state = f"one instance running (pid {pids[0]})" if pids else "no instance running"
    return Check("injector.instances", "injector", "PASS", f"{state} on {socket_path}")


# --- driver and /dev/char --------------------------------------------------------------------------


def check_driver(settings: Settings) -> list[Check]:
    snap, why = host_snapshot(settings)
    if snap is None:
        return [
            Check(
                "driver.snapshot",
                "driver",
                "FAIL",
                f"no usable NVIDIA driver under {settings.roots}: {why or 'not found'}",
                "load the driver (nvidia-smi works on the host) or set [nvidia-container-cli] root / "
                "--driver-root, --dev-root, --proc-root to where it is",
            )
        ]
    checks = [
        Check(
            "driver.snapshot",
            "driver",
            "PASS",
            f"driver {snap.driver_version}, CUDA {snap.cuda_version or '?'}, {len(snap.gpus)} GPU(s), "
            f"{sum(len(g.mig_devices) for g in snap.gpus)} MIG device(s)",
        )
    ]
    if snap.source == "nvml":
        checks.append(Check("driver.nvml", "driver", "PASS", "NVML answered (libnvidia-ml.so.1)"))
    elif settings.use_nvml:
        checks.append(
            Check(
                "driver.nvml",
                "driver",
                "WARN",
                "NVML did not answer; GPUs were read from /proc/driver/nvidia (no CUDA version, "
                "brand or compute capability: NVIDIA_REQUIRE_* checks may fail)",
                "check libnvidia-ml.so.1 in the driver root's ld.so.cache",
            )
        )
    else:
        checks.append(Check("driver.nvml", "driver", "SKIP", "use-nvml = false"))
    return checks


def systemd_cgroups(doc: Mapping[str, Any] | None) -> bool:
    return doc is not None and any(p[-1] == "SystemdCgroup" and v is True for p, v in _walk(doc))


def check_dev_char(doc: Mapping[str, Any] | None, dev_root: str) -> Check:
    import stat

    if not systemd_cgroups(doc):
        return Check("devchar.links", "devchar", "SKIP", "containerd does not use the systemd cgroup driver")
    dev = os.path.join(dev_root, "dev")
    missing: list[str] = []
    names = sorted(n for n in os.listdir(dev) if n.startswith("nvidia")) if os.path.isdir(dev) else []
    nodes = [os.path.join(dev, n) for n in names]
    caps = os.path.join(dev, "nvidia-caps")
    if os.path.isdir(caps):
        nodes += [os.path.join(caps, n) for n in sorted(os.listdir(caps))]
    for node in nodes:
        st = os.lstat(node)
        if not stat.S_ISCHR(st.st_mode):
            continue
        link = os.path.join(dev, "char", f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
        if not os.path.exists(link) or not os.path.samefile(link, node):
            missing.append(f"{link} -> {node}")
    if missing:
        return Check(
            "devchar.links",
            "devchar",
            "FAIL",
            f"{len(missing)} NVIDIA device node(s) without /dev/char link: {', '.join(missing[:4])}"
            + (" ..." if len(missing) > 4 else ""),
            "nvidia-ctk system create-dev-char-symlinks --create-all (or the toolkit's udev rule)",
        )
    return Check(
        "devchar.links", "devchar", "PASS", f"{len(nodes)} NVIDIA node(s), each with its /dev/char link"
    )


# --- the command -----------------------------------------------------------------------------------


def run_checks(args: argparse.Namespace, settings: Settings) -> list[Check]:
    doc, why = load_containerd_config(args.containerd_config)
    checks = check_nri(settings.socket_path, register=not args.no_register)
    checks += [
        check_default_runtime(doc, why),
        check_cdi(args.cdi_dir or ["/etc/cdi", "/var/run/cdi"]),
        check_nri_plugin_dir(args.nri_plugin_dir),
        check_instances(settings.socket_path),
    ]
    checks += check_driver(settings)
    checks.append(check_dev_char(doc, settings.roots.dev_root))
    return checks


def exit_code(checks: Iterable[Check]) -> int:
    code = 0
    for c in checks:
        if c.status == "FAIL":
            code |= CLASS_BITS[c.cls]
    return code


def effective_config(settings: Settings, *layers: Layer) -> dict[str, dict[str, object]]:
    from nri_plugin import config as cfg

    sources = cfg.provenance(*layers)
    return {
        key: {"value": value, "source": sources.get(key, "default")}
        for key, value in cfg.to_toml_keys(settings).items()
    }


def render_text(
    checks: list[Check], config: Mapping[str, Mapping[str, object]], code: int, out: TextIO
) -> None:
    out.write("nvidia-nri-plugin doctor\n")
    width = max(len(c.id) for c in checks)
    for c in checks:
        out.write(f"{c.status:<4}  {c.id:<{width}}  {c.message}\n")
        if c.fix and c.status in ("FAIL", "WARN"):
            out.write(f"{'':<4}  {'':<{width}}  fix: {c.fix}\n")
    out.write("\neffective configuration (value, source):\n")
    for key, entry in config.items():
        out.write(f"  {key} = {entry['value']!r}  ({entry['source']})\n")
    failed = sorted({c.cls for c in checks if c.status == "FAIL"})
    warned = sum(c.status == "WARN" for c in checks)
    out.write(
        f"\nsummary: {sum(c.status == 'FAIL' for c in checks)} failed"
        + (f" ({', '.join(failed)})" if failed else "")
        + f", {warned} warning(s); exit {code}\n"
    )


def run(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import json

    from nri_plugin import config as cfg

    file_layer, flag_layer = load_layers(args, environ)
    settings = cfg.build(file_layer, flag_layer)
    checks = run_checks(args, settings)
    for warning in file_layer.warnings:
        checks.append(Check("config.toolkit", "config", "WARN", warning))
    code = exit_code(checks)
    config = effective_config(settings, file_layer, flag_layer)
    if args.output == "json":
        doc = {"checks": [asdict(c) for c in checks], "config": config, "exit_code": code}
        json.dump(doc, out, indent=2, default=str)
        out.write("\n")
    else:
        render_text(checks, config, code, out)
    return code

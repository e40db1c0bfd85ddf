"""``nvidia-nri-plugin``: run the NRI plugin, dry-run a container, show the host driver, install.

Start-up time counts against NRI's 5 s registration timeout, so this module imports only the
standard library at the top; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from nri_plugin.adjust import Adjustment
    from nri_plugin.config import Layer, Settings
    from nri_plugin.host import DriverSnapshot

EXIT_OK = 0
EXIT_CONTAINER_ERROR = 1
EXIT_USAGE = 2
EXIT_NO_DRIVER = 3
EXIT_REFUSED = 4
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports it
EXIT_CODES_HELP = """exit codes:
  0  success (run: stopped by SIGTERM/SIGINT or by the runtime)
  1  inspect: the container would fail (the error a user would get is printed);
     run: the plugin stopped on an unexpected error
  2  usage or configuration error
  3  info/inspect: no usable NVIDIA driver found on the host (info only; inspect reports it as 1)
  4  install: refused to overwrite or remove a file this tool did not write
  141  the output pipe was closed early (e.g. `| head`)
"""
INSTALL_MARKER = (
    "# written by `nvidia-nri-plugin install`; remove with `nvidia-nri-plugin install --uninstall`"
)
# How long start-up waits for the first driver discovery before registering anyway. Registration
# must not wait for a slow or hanging NVML (nvmlInit can take many seconds without persistence
# mode): while the plugin is not registered, containerd creates GPU containers without GPUs (NRI
# fails open), whereas a registered plugin fails them with "driver discovery in progress" until the
# snapshot exists. The short wait only keeps the usual log order (discovered, then registered).
DISCOVERY_WAIT_S = 0.5
CAPABILITIES = ("compute", "compat32", "graphics", "utility", "video", "display", "ngx")


class UsageError(Exception):
    """A bad command line (exit 2)."""


# ---------------------------------------------------------------------------------------------
# Parser


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34)


def _add_config_flags(p: argparse.ArgumentParser, *, host_only: bool = False) -> None:
    """--config, the flag of every declared setting (``config.SETTINGS``) and --set."""
    from nri_plugin import config as cfg

    g = p.add_argument_group("configuration (overrides the config file and the NRI config)")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="toolkit config.toml to read (must exist); default: $NVIDIA_CTK_CONFIG_FILE_PATH or "
        "/etc/nvidia-container-runtime/config.toml when present",
    )
    cfg.add_flags(g, host_only=host_only)
    g.add_argument(
        "--set",
        dest="set_",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config key, dotted, with a TOML value, e.g. "
        "--set accept-nvidia-visible-devices-as-volume-mounts=true (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nvidia-nri-plugin",
        formatter_class=_formatter,
        epilog=EXIT_CODES_HELP,
        description="containerd NRI plugin that gives containers NVIDIA GPUs (nvidia-container-runtime-hook "
        "semantics, as spec-visible adjustments).",
    )
    from nri_plugin import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser(
        "run",
        help="run the plugin (external or runtime-launched)",
        formatter_class=_formatter,
        epilog=EXIT_CODES_HELP,
        description=(
            "Connect to containerd's NRI socket (or use the socket handed over in "
            "$NRI_PLUGIN_SOCKET when the runtime launched us) and serve until SIGTERM/SIGINT."
        ),
    )
    _add_config_flags(run)

    ins = sub.add_parser(
        "inspect",
        help="dry-run one container: its request and the exact adjustment",
        formatter_class=_formatter,
        epilog=EXIT_CODES_HELP,
        description=(
            "Decide as the plugin would, without containerd. The container comes from "
            "--env/--mount/--privileged or from --container-json (an NRI Container in "
            "protobuf JSON)."
        ),
    )
    ins.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="container env entry (repeatable)"
    )
    ins.add_argument(
        "--mount", action="append", default=[], metavar="SRC:DST", help="container bind mount (repeatable)"
    )
    ins.add_argument("--privileged", action="store_true", help="treat the container as privileged")
    ins.add_argument("--container-json", metavar="FILE", help="NRI Container as protobuf JSON ('-' = stdin)")
    ins.add_argument("--output", choices=("text", "json"), default="text")
    _add_config_flags(ins, host_only=True)

    info = sub.add_parser(
        "info",
        help="show what the host driver offers",
        formatter_class=_formatter,
        epilog=EXIT_CODES_HELP,
        description=(
            "Discover the host driver as the plugin does and show GPUs, versions, and per "
            "driver capability what would be injected, and what is missing."
        ),
    )
    info.add_argument("--output", choices=("text", "json"), default="text")
    _add_config_flags(info, host_only=True)

    inst = sub.add_parser(
        "install",
        help="install as a runtime-launched plugin (/opt/nri/plugins/NN-NAME)",
        formatter_class=_formatter,
        epilog=EXIT_CODES_HELP,
        description=(
            "Write an executable NN-NAME into the NRI plugin directory that starts this "
            "plugin with this Python interpreter, independent of the (empty) environment "
            "containerd gives it; optionally install a config as <config-dir>/NN-NAME.conf."
        ),
    )
    inst.add_argument("--plugin-dir", default="/opt/nri/plugins", metavar="DIR")
    inst.add_argument("--config-dir", default="/etc/nri/conf.d", metavar="DIR")
    inst.add_argument("--index", default="10", metavar="NN", help="two digits (default 10)")
    inst.add_argument("--name", default="nvidia-gpu", metavar="NAME", help="default nvidia-gpu")
    inst.add_argument(
        "--config-file", metavar="FILE", help="TOML to install as <config-dir>/NN-NAME.conf (validated first)"
    )
    inst.add_argument(
        "--run-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `run` baked into the script, e.g. --run-arg=--log-file=/x.log",
    )
    inst.add_argument("--uninstall", action="store_true", help="remove what install wrote")
    return parser


# ---------------------------------------------------------------------------------------------
# Settings from flags


def _set_values(items: Sequence[str]) -> dict[str, object]:
    import tomllib

    out: dict[str, object] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: expected KEY=VALUE, e.g. --set disable-require=true")
        try:
            value: object = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string
        out[key.strip()] = value
    return out


def flag_values(args: argparse.Namespace) -> dict[str, object | None]:
    """Flags as dotted TOML keys (None = not given); --set items last."""
    from nri_plugin import config as cfg

    values = cfg.flag_values(args)
    values.update(_set_values(getattr(args, "set_", None) or []))
    return values


def load_layers(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Layer, Layer]:
    from nri_plugin import config as cfg

    return cfg.load_file(args.config, environ), cfg.layer_from_flags(flag_values(args))


# ---------------------------------------------------------------------------------------------
# run


def process_age_ms() -> float | None:
    """Milliseconds since this process was started (from /proc; 10 ms resolution)."""
    try:
        with open("/proc/self/stat") as f:
            stat = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        start_ticks = int(stat.rpartition(")")[2].split()[19])
        return max(0.0, (uptime - start_ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    except (OSError, ValueError, IndexError):
        return None


def cmd_run(args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    import asyncio

    from nri_plugin import config as cfg
    from nri_plugin import logs
    from nri_plugin.errors import ConfigError

    launched = bool(environ.get("NRI_PLUGIN_SOCKET"))
    try:
        file_layer, flag_layer = load_layers(args, environ)
        settings = cfg.build(file_layer, flag_layer)
    except (ConfigError, UsageError) as e:
        # stderr is /dev/null for a runtime-launched plugin: also log where the operator will look.
        print(f"nvidia-nri-plugin: {e}", file=sys.stderr)
        if launched:
            log_file = str(cfg.flag_values(args).get("nri-plugin.log-file") or "")
            fallback = logs.Logger(logs.launched_sink(log_file, "logfmt"))
            fallback.error("configuration error; not starting", error=str(e))
            fallback.close()
        return EXIT_USAGE

    from nri_plugin.plugin import make_sink

    logger = logs.Logger(make_sink(settings, launched), logs.parse_level(settings.log_level))
    try:
        return asyncio.run(_serve(file_layer, flag_layer, settings, logger, launched, environ))
    except ConfigError as e:  # e.g. a bad NRI_PLUGIN_NAME/IDX/SOCKET from the environment
        logger.error("configuration error; not starting", error=str(e))
        print(f"nvidia-nri-plugin: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        logger.close()


async def _serve(
    file_layer: Layer,
    flag_layer: Layer,
    settings: Settings,
    logger: Any,
    launched: bool,
    environ: Mapping[str, str],
) -> int:
    import asyncio
    import logging
    import signal

    from nri_plugin import logs
    from nri_plugin.errors import ConfigError
    from nri_plugin.metrics import StubCounts
    from nri_plugin.notify import Notifier
    from nri_plugin.plugin import GpuPlugin
    from nri_plugin.wire import Stub

    logs.bridge_stdlib(logger)
    stdlib_logger = logging.getLogger("nri_plugin.wire.stub")
    if file_layer.ignored:
        logger.debug(
            "ignoring toolkit keys this plugin does not use",
            source=file_layer.source,
            keys=list(file_layer.ignored),
        )
    stub_ref: list[Any] = []

    def counts() -> StubCounts:
        if not stub_ref:
            return StubCounts()
        stub = stub_ref[0]
        return StubCounts(stub.registrations, stub.reconnects, stub.registered.is_set())

    plugin = GpuPlugin(
        file_layer=file_layer,
        flag_layer=flag_layer,
        logger=logger,
        launched=launched,
        notifier=Notifier(environ),
        stub_counts=counts,
    )
    await plugin.discover(budget=DISCOVERY_WAIT_S)
    stub = Stub.from_environment(
        plugin,
        name=settings.plugin_name,
        index=settings.plugin_index,
        socket_path=settings.socket_path,
        logger=stdlib_logger,
    )
    stub_ref.append(stub)
    loop = asyncio.get_running_loop()
    stopping: list[int] = []

    def stop(signum: int) -> None:
        if not stopping:
            logger.info("stopping", signal=signal.Signals(signum).name)
            plugin.notifier.stopping()
        stopping.append(signum)
        stub.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    plugin.start_background()
    age = process_age_ms()
    logger.info(
        "ready to register",
        mode="runtime-launched" if launched else "external",
        plugin=f"{settings.plugin_index}-{settings.plugin_name}",
        socket="fd " + environ.get("NRI_PLUGIN_SOCKET", "") if launched else settings.socket_path,
        startup_ms=round(age) if age is not None else "",
        pid=os.getpid(),
    )
    code = EXIT_OK
    try:
        await stub.run()
    except ConfigError:  # e.g. NRI_PLUGIN_SOCKET is no socket: cmd_run reports it, exit 2
        raise
    except Exception as e:
        logger.exception("plugin stopped on an unexpected error", e)
        code = 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await plugin.close()
    logger.info("stopped", exit_code=code)
    return code


# ---------------------------------------------------------------------------------------------
# inspect / info


def _snapshot(settings: Settings) -> tuple[DriverSnapshot | None, str]:
    from nri_plugin.plugin import make_driver

    driver = make_driver(settings)
    try:
        driver.refresh()
    except Exception as e:  # the daemon logs and carries on; so do we, with the reason
        return None, f"{type(e).__name__}: {e}"
    return driver.snapshot(), driver.last_error or driver.no_driver_reason or ""


def _container_inputs(args: argparse.Namespace) -> tuple[list[str], list[Any], bool, str]:
    """(env, mounts, privileged, label) from --container-json or the flags."""
    from nri_plugin.request import Mount

    if args.container_json:
        from google.protobuf import json_format

        from nri_plugin.request import request_inputs
        from nri_plugin.wire import api

        try:
            if args.container_json == "-":
                text = sys.stdin.read()
            else:
                with open(args.container_json, encoding="utf-8") as f:
                    text = f.read()
        except OSError as e:
            raise UsageError(f"--container-json {args.container_json!r}: {e.strerror}") from None
        try:
            container = json_format.Parse(text, api.Container())
        except json_format.ParseError as e:
            raise UsageError(
                f"--container-json {args.container_json!r} is not an NRI Container in protobuf JSON: {e}"
            ) from None
        env, mounts, privileged = request_inputs(container)
        return list(env), list(mounts), privileged or args.privileged, container.name or container.id
    for entry in args.env:
        if "=" not in entry:
            raise UsageError(f"--env {entry!r}: expected K=V, e.g. --env NVIDIA_VISIBLE_DEVICES=all")
    mounts = []
    for m in args.mount:
        src, sep, dst = m.partition(":")
        if not sep or not dst.startswith("/"):
            raise UsageError(
                f"--mount {m!r}: expected SRC:DST with an absolute DST, e.g. "
                f"--mount /dev/null:/var/run/nvidia-container-devices/0"
            )
        mounts.append(Mount(source=src, destination=dst))
    return list(args.env), mounts, bool(args.privileged), "inspect"


def _gpu_dict(g: Any) -> dict[str, object]:
    return {
        "index": g.index,
        "uuid": g.uuid,
        "minor": g.minor,
        "bus_id": g.bus_id,
        "name": g.model,
        "brand": g.brand,
        "compute_capability": g.compute_capability,
        "mig_enabled": g.mig_enabled,
        "mig_devices": [
            {
                "index": m.index,
                "uuid": m.uuid,
                "gpu_instance_id": m.gpu_instance_id,
                "compute_instance_id": m.compute_instance_id,
            }
            for m in g.mig_devices
        ],
    }


def render_adjustment(adj: Adjustment, out: TextIO, indent: str = "  ") -> None:
    out.write(f"{indent}devices ({len(adj.devices)}):\n")
    for d in adj.devices:
        out.write(
            f"{indent}  {d.path}  {d.type} {d.major}:{d.minor}  mode {d.file_mode:04o}  uid {d.uid} "
            f"gid {d.gid}  (host {d.host_path})\n"
        )
    out.write(f"{indent}mounts ({len(adj.mounts)}):\n")
    for m in adj.mounts:
        out.write(f"{indent}  {m.destination} <- {m.source}  [{m.type}: {','.join(m.options)}]\n")
    out.write(f"{indent}env ({len(adj.env)}):\n")
    for k, v in adj.env:
        out.write(f"{indent}  {k}={v}\n")
    out.write(f"{indent}createContainer hooks ({len(adj.create_container_hooks)}):\n")
    for h in adj.create_container_hooks:
        out.write(
            f"{indent}  {h.path} args={list(h.args)} env={list(h.env)}"
            + (f" timeout={h.timeout}" if h.timeout is not None else "")
            + "\n"
        )


def cmd_inspect(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import dataclasses
    import json

    from nri_plugin import config as cfg
    from nri_plugin.adjust import EMPTY_SELECTION, decide
    from nri_plugin.errors import ContainerError

    file_layer, flag_layer = load_layers(args, environ)
    settings = cfg.build(file_layer, flag_layer)
    env, mounts, privileged, label = _container_inputs(args)
    snapshot, why = _snapshot(settings)
    try:
        decision = decide(env, mounts, privileged, settings.hook, snapshot)
    except ContainerError as e:
        if args.output == "json":
            json.dump({"container": label, "error": str(e), "reason": type(e).__name__}, out, indent=2)
            out.write("\n")
        else:
            out.write(f"container {label}: would FAIL ({type(e).__name__}):\n  {e}\n")
            if snapshot is None and why:
                out.write(f"  (host driver: {why})\n")
        return EXIT_CONTAINER_ERROR
    req, adj = decision.request, decision.adjustment
    selection = decision.selection or EMPTY_SELECTION
    if args.output == "json":
        from google.protobuf import json_format

        from nri_plugin.adjust import to_proto

        doc: dict[str, object] = {
            "container": label,
            "request": None if req is None else dataclasses.asdict(req),
            "gpus": [] if req is None else [_gpu_dict(g) for g in selection.gpus],
            "mig_devices": [] if req is None else [m.uuid for m in selection.mig_devices],
            "adjustment": json_format.MessageToDict(to_proto(adj), preserving_proto_field_name=True),
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
        return EXIT_OK
    if req is None:
        out.write(f"container {label}: no GPU requested; the plugin returns an empty adjustment\n")
        return EXIT_OK
    out.write(f"container {label}: GPU request\n")
    out.write(f"  devices:       {req.devices or '(none: GPU container without GPUs)'}\n")
    out.write(f"  capabilities:  {req.driver_capabilities}\n")
    out.write(
        f"  requirements:  {' ; '.join(req.requirements) or '(none)'}"
        f"{' (disabled by NVIDIA_DISABLE_REQUIRE/disable-require)' if req.disable_require else ''}\n"
    )
    if req.mig_config_devices or req.mig_monitor_devices:
        out.write(f"  mig config:    {req.mig_config_devices}\n  mig monitor:   {req.mig_monitor_devices}\n")
    out.write("resolved GPUs:\n")
    for g in selection.gpus:
        out.write(f"  {g.index}  {g.uuid}  /dev/nvidia{g.minor}  {g.bus_id}  {g.model}\n")
    for m in selection.mig_devices:
        out.write(f"  {m.parent_index}:{m.index}  {m.uuid}\n")
    out.write("adjustment:\n")
    render_adjustment(adj, out)
    return EXIT_OK


def capability_report(snapshot: DriverSnapshot, settings: Settings) -> dict[str, dict[str, object]]:
    """Per capability, what a privileged ``NVIDIA_VISIBLE_DEVICES=all`` container would get."""
    import dataclasses

    from nri_plugin.adjust import decide
    from nri_plugin.errors import ContainerError

    hook = dataclasses.replace(settings.hook, supported_driver_capabilities=",".join(CAPABILITIES))
    report: dict[str, dict[str, object]] = {}
    for cap in CAPABILITIES:
        env = [
            "NVIDIA_VISIBLE_DEVICES=all",
            f"NVIDIA_DRIVER_CAPABILITIES={cap}",
            "NVIDIA_DISABLE_REQUIRE=true",
        ]
        try:
            adj = decide(env, [], True, hook, snapshot).adjustment
        except ContainerError as e:
            report[cap] = {"error": str(e)}
            continue
        report[cap] = {
            "devices": [d.path for d in adj.devices],
            "mounts": [m.destination for m in adj.mounts],
            "hooks": [h.path for h in adj.create_container_hooks],
        }
    return report


def cmd_info(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import json

    from nri_plugin import config as cfg

    file_layer, flag_layer = load_layers(args, environ)
    settings = cfg.build(file_layer, flag_layer)
    snap, why = _snapshot(settings)
    if snap is None:
        msg = (
            f"no usable NVIDIA driver under {settings.roots}: {why or 'not found'}; check the driver is "
            f"loaded (/proc/driver/nvidia/version) or point --driver-root/--proc-root/--dev-root at it"
        )
        if args.output == "json":
            json.dump({"error": msg}, out, indent=2)
            out.write("\n")
        else:
            out.write(msg + "\n")
        return EXIT_NO_DRIVER
    caps = capability_report(snap, settings)
    if args.output == "json":
        doc = {
            "source": snap.source,
            "driver_version": snap.driver_version,
            "cuda_version": snap.cuda_version,
            "roots": vars_of(snap.roots),
            "gpus": [_gpu_dict(g) for g in snap.gpus],
            "char_majors": dict(snap.char_majors),
            "mig_minors": dict(snap.mig_minors),
            "capabilities": caps,
            "missing": list(snap.missing),
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(
        f"driver {snap.driver_version}, CUDA {snap.cuda_version or 'unknown (no NVML)'}, "
        f"source {snap.source}\n"
    )
    out.write(f"roots: {snap.roots}\n")
    out.write(f"GPUs ({len(snap.gpus)}):\n")
    for g in snap.gpus:
        out.write(
            f"  {g.index}  {g.uuid}  minor {g.minor}  {g.bus_id}  {g.model or '?'}  brand "
            f"{g.brand or '?'}  cc {g.compute_capability or '?'}"
            + ("  MIG enabled" if g.mig_enabled else "")
            + "\n"
        )
        for m in g.mig_devices:
            out.write(
                f"     {g.index}:{m.index}  {m.uuid}  gi {m.gpu_instance_id} ci {m.compute_instance_id}\n"
            )
    out.write("char majors: " + ", ".join(f"{k}={v}" for k, v in sorted(snap.char_majors.items())) + "\n")
    ok = [c for c in CAPABILITIES if "error" not in caps[c]]
    common: set[str] = set()
    if ok:
        common = set.intersection(*(set(_items(caps[c])) for c in ok))
    out.write(f"injected for every capability ({len(common)}):\n")
    for item in sorted(common):
        out.write(f"  {item}\n")
    for cap in CAPABILITIES:
        entry = caps[cap]
        if "error" in entry:
            out.write(f"capability {cap}: ERROR {entry['error']}\n")
            continue
        extra = [i for i in _items(entry) if i not in common]
        out.write(f"capability {cap} (+{len(extra)}):\n")
        for item in extra:
            out.write(f"  {item}\n")
    out.write(f"missing ({len(snap.missing)}):\n")
    for note in snap.missing:
        out.write(f"  {note}\n")
    return EXIT_OK


def vars_of(value: object) -> dict[str, object]:
    import dataclasses

    return dataclasses.asdict(value)  # type: ignore[call-overload, no-any-return]


def _items(entry: Mapping[str, object]) -> list[str]:
    out: list[str] = []
    for kind in ("devices", "mounts", "hooks"):
        seq = entry.get(kind)
        if isinstance(seq, list):
            out.extend(f"{kind[:-1]} {p}" for p in seq)
    return out


# ---------------------------------------------------------------------------------------------
# install


def _package_parent() -> str:
    import nri_plugin

    return os.path.dirname(os.path.dirname(os.path.abspath(nri_plugin.__file__)))


def install_script(
    run_args: Sequence[str], executable: str | None = None, package_parent: str | None = None
) -> str:
    """The text of the runtime-launched executable."""
    exe = os.path.abspath(executable or sys.executable)
    parent = package_parent or _package_parent()
    return (
        f"#!{exe} -I\n"
        f"{INSTALL_MARKER}\n"
        "# containerd starts this with an empty environment (only NRI_PLUGIN_*) and stdout/stderr on\n"
        "# /dev/null; -I ignores PYTHON* variables and the user site, the path below finds the package.\n"
        "import sys\n"
        f"sys.path.insert(0, {parent!r})\n"
        "from nri_plugin.cli import main\n"
        f"sys.exit(main({['run', *run_args]!r}))\n"
    )


def _ours(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except FileNotFoundError:
        return True  # nothing to protect
    except OSError:
        return False
    return INSTALL_MARKER in head.splitlines()[:3]


def _write_atomic(path: str, data: str, mode: int) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


def _suppress() -> Any:
    import contextlib

    return contextlib.suppress(OSError)


def cmd_install(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO) -> int:
    import re
    import subprocess

    from nri_plugin import config as cfg

    if not re.fullmatch(r"[0-9][0-9]", args.index):
        raise UsageError(f"--index {args.index!r}: must be two digits 00-99, e.g. --index 10")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", args.name):
        raise UsageError(f"--name {args.name!r}: use only [A-Za-z0-9_.+-], e.g. --name nvidia-gpu")
    base = f"{args.index}-{args.name}"
    script = os.path.join(args.plugin_dir, base)
    conf = os.path.join(args.config_dir, base + ".conf")
    targets = [script, conf]
    for path in targets:
        if not _ours(path):
            out.write(
                f"refusing to {'remove' if args.uninstall else 'overwrite'} {path}: it was not written by "
                f"`nvidia-nri-plugin install`; move it away or pick another --index/--name\n"
            )
            return EXIT_REFUSED
    if args.uninstall:
        for path in targets:
            try:
                os.unlink(path)
                out.write(f"removed {path}\n")
            except FileNotFoundError:
                pass
        return EXIT_OK
    conf_text = None
    if args.config_file:
        try:
            with open(args.config_file, encoding="utf-8") as f:
                body = f.read()
        except OSError as e:
            raise UsageError(f"--config-file {args.config_file!r}: {e.strerror}") from None
        cfg.parse_toml(body, args.config_file)  # raises ConfigError naming the key
        conf_text = f"{INSTALL_MARKER}\n{body}"
    # The interpreter must import the package without any environment: check before writing.
    text = install_script(args.run_arg)
    probe = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            f"import sys; sys.path.insert(0, {_package_parent()!r}); import nri_plugin.cli",
        ],
        env={},
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        raise UsageError(
            f"{sys.executable} cannot import nri_plugin with an empty environment: "
            f"{probe.stderr.strip().splitlines()[-1:]}; install the package for that interpreter"
        )
    os.makedirs(args.plugin_dir, exist_ok=True)
    _write_atomic(script, text, 0o755)
    out.write(f"installed {script}\n")
    if conf_text is not None:
        os.makedirs(args.config_dir, exist_ok=True)
        _write_atomic(conf, conf_text, 0o644)
        out.write(f"installed {conf}\n")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# main


def main(
    argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None, out: TextIO | None = None
) -> int:
    from nri_plugin.errors import ConfigError

    env = os.environ if environ is None else environ
    stdout = sys.stdout if out is None else out
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    commands: dict[str, Callable[[], int]] = {
        "run": lambda: cmd_run(args, env),
        "inspect": lambda: cmd_inspect(args, env, stdout),
        "info": lambda: cmd_info(args, env, stdout),
        "install": lambda: cmd_install(args, env, stdout),
    }
    try:
        return commands[args.command]()
    except (UsageError, ConfigError) as e:
        print(f"nvidia-nri-plugin {args.command}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `... | head`: stop quietly, as shell tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE

"""What every subcommand shares: exit codes, errors, the configuration flags and layers, the
host snapshot, and the rendering of adjustments and GPUs.

Start-up time counts against NRI's 5 s registration timeout, so the ``cli`` modules import only
the standard library at the top; each command imports what it needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
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
  8|16|32|64  doctor: OR of the failing check classes: 8 NRI, 16 another GPU injector,
     32 driver, 64 /dev/char links
  141  the output pipe was closed early (e.g. `| head`)
"""

CAPABILITIES = ("compute", "compat32", "graphics", "utility", "video", "display", "ngx")


class UsageError(Exception):
    """A bad command line (exit 2)."""


def formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34)


def add_config_flags(p: argparse.ArgumentParser, *, host_only: bool = False) -> None:
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


def host_snapshot(settings: Settings) -> tuple[DriverSnapshot | None, str]:
    from nri_plugin.plugin import make_driver

    driver = make_driver(settings)
    try:
        driver.refresh()
    except Exception as e:  # the daemon logs and carries on; so do we, with the reason
        return None, f"{type(e).__name__}: {e}"
    return driver.snapshot(), driver.last_error or driver.no_driver_reason or ""


def gpu_dict(g: Any) -> dict[str, object]:
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


def vars_of(value: Any) -> dict[str, object]:
    """The fields of a dataclass value as they were given (derived ``init=False`` fields left out)."""
    import dataclasses

    def plain(item: object) -> object:
        return sorted(item) if isinstance(item, frozenset) else item

    return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}


def items(entry: Mapping[str, object]) -> list[str]:
    out: list[str] = []
    for kind in ("devices", "mounts", "hooks"):
        seq = entry.get(kind)
        if isinstance(seq, list):
            out.extend(f"{kind[:-1]} {p}" for p in seq)
    return out

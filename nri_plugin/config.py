"""Daemon configuration: one frozen ``Settings`` value built from layered sources.

Sources, lowest precedence first (a later source overrides only the keys it sets):

====  =================================  ==================================================================
 #    source                             notes
====  =================================  ==================================================================
 1    built-in defaults                  the toolkit's defaults for its keys; ours below
 2    toolkit file                       ``--config FILE`` (must exist), else
                                         ``$NVIDIA_CTK_CONFIG_FILE_PATH``, else
                                         ``$XDG_CONFIG_HOME/nvidia-container-runtime/config.toml``
                                         when ``XDG_CONFIG_HOME`` is set, else
                                         ``/etc/nvidia-container-runtime/config.toml``; a missing
                                         file means "defaults" (as in the toolkit), except --config
 3    NRI Configure config string        TOML, same schema; a runtime-launched plugin receives its
                                         ``/etc/nri/conf.d/NN-name.conf`` here, an external plugin ``""``
 4    command-line flags                 ``nvidia-nri-plugin run --driver-root ...``
====  =================================  ==================================================================

Schema (identical in the file and the NRI config string):

* toolkit top-level keys: ``accept-nvidia-visible-devices-envvar-when-unprivileged`` (bool, true),
  ``accept-nvidia-visible-devices-as-volume-mounts`` (bool, false), ``swarm-resource`` (string, ""),
  ``supported-driver-capabilities`` (string), ``disable-require`` (bool, false);
* ``[nvidia-container-cli]``: ``root`` (driver root, "" = "/"), ``ldcache`` (a path inside the driver
  root, "" = ``/etc/ld.so.cache``); the toolkit's other keys of that table (``path``, ``environment``,
  ``debug``, ``load-kmods``, ``no-pivot``, ``no-cgroups``, ``user``, ``ldconfig``) are ignored;
* the toolkit's other tables (``[nvidia-container-runtime]``, ``[nvidia-container-runtime-hook]``,
  ``[nvidia-ctk]``, ``[features]``) are accepted and ignored;
* ``[nri-plugin]``: our own keys, see ``_OWN_KEYS``.

Any other key, or a value of the wrong type, is a ``ConfigError`` naming the key, the source and the
expected type.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nri_plugin.errors import ConfigError
from nri_plugin.host import HostRoots
from nri_plugin.request import HookConfig

DEFAULT_TOOLKIT_CONFIG = "/etc/nvidia-container-runtime/config.toml"
TOOLKIT_CONFIG_ENV = "NVIDIA_CTK_CONFIG_FILE_PATH"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")
_INDEX_RE = re.compile(r"[0-9][0-9]")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon is configured with. Field names are the snake_case of the TOML keys."""

    hook: HookConfig = field(default_factory=HookConfig)
    # [nvidia-container-cli]
    driver_root: str = "/"
    ldcache: str = ""  # path inside the driver root; "" = /etc/ld.so.cache
    # [nri-plugin]
    plugin_name: str = "nvidia-gpu"
    plugin_index: str = "10"
    socket_path: str = "/var/run/nri/nri.sock"
    dev_root: str = "/"
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    run_root: str = "/"
    # Where the host's / is mounted in this process's view ("/host" in a DaemonSet pod): prefixed
    # to driver-root, dev-root and run-root for reading, stripped from the mount sources handed to
    # containerd. proc-root and sys-root are not prefixed: a container's procfs/sysfs are the host
    # kernel's, so /proc/driver/nvidia and /proc/devices read the same in a pod.
    host_root: str = "/"
    use_nvml: bool = True
    refresh_interval: float = 10.0
    log_level: str = "info"
    log_format: str = "logfmt"
    log_file: str = ""
    metrics_address: str = ""  # "" = no metrics endpoint; "127.0.0.1:9400"
    mps_pipe_dir: str = "/tmp/nvidia-mps"  # inside run_root

    @property
    def roots(self) -> HostRoots:
        def under_host(path: str) -> str:
            return os.path.normpath(os.path.join(self.host_root, path.lstrip("/")))

        return HostRoots(
            driver_root=under_host(self.driver_root or "/"),
            dev_root=under_host(self.dev_root),
            proc_root=self.proc_root,
            sys_root=self.sys_root,
            run_root=under_host(self.run_root),
            host_root=self.host_root,
        )

    @property
    def ldcache_path(self) -> str:
        """The ld.so.cache to read, as a path inside the driver root (as nvidia-container-cli takes it)."""
        return self.ldcache or "/etc/ld.so.cache"

    def discovery_key(self) -> tuple[object, ...]:
        """The settings host discovery depends on: a change needs a new HostDriver."""
        return (self.roots, self.ldcache_path, self.use_nvml, self.mps_pipe_dir)


# ---------------------------------------------------------------------------------------------
# Key table


@dataclass(frozen=True, slots=True)
class _Key:
    attr: str  # "hook.<field>" or a Settings field name
    type_name: str
    convert: Callable[[Any], object]  # raises ValueError with a hint (the type has been checked)
    check: Callable[[object], bool]


def _is_bool(v: object) -> bool:
    return isinstance(v, bool)


def _is_str(v: object) -> bool:
    return isinstance(v, str)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int_or_str(v: object) -> bool:
    return isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))


def _same(v: Any) -> object:
    return v


def _index(v: Any) -> object:
    s = f"{v:02d}" if isinstance(v, int) else str(v)
    if not _INDEX_RE.fullmatch(s):
        raise ValueError("must be two digits 00-99 (NRI orders plugins by it), e.g. 10")
    return s


def _name(v: Any) -> object:
    if not _NAME_RE.fullmatch(v):
        raise ValueError("must be non-empty and use only [A-Za-z0-9_.+-], e.g. nvidia-gpu")
    return v


def _abs_path(v: Any) -> object:
    if not os.path.isabs(v):
        raise ValueError("must be an absolute path")
    return os.path.normpath(v)


def _opt_abs_path(v: Any) -> object:
    return v if v == "" else _abs_path(v)


def _interval(v: Any) -> object:
    f = float(v)
    if not math.isfinite(f) or f <= 0:
        raise ValueError("must be a number of seconds > 0, e.g. 10")
    return f


def _choice(choices: Iterable[str]) -> Callable[[Any], object]:
    allowed = tuple(choices)

    def conv(v: Any) -> object:
        low = str(v).lower()
        if low == "warn":
            low = "warning"
        if low not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return low

    return conv


def parse_address(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9400"``, ``"[::1]:9400"``, ``":9400"`` (all addresses) -> (host, port)."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError("must be HOST:PORT with a port 0-65535, e.g. 127.0.0.1:9400")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_s)


def _address(v: Any) -> object:
    if v:
        parse_address(v)
    return v


def _k(
    attr: str, type_name: str, check: Callable[[object], bool], convert: Callable[[Any], object] = _same
) -> _Key:
    return _Key(attr, type_name, convert, check)


_STR = "a string"
_BOOL = "a boolean (true/false)"
_TOP_KEYS: Mapping[str, _Key] = {
    "accept-nvidia-visible-devices-envvar-when-unprivileged": _k(
        "hook.accept_envvar_unprivileged", _BOOL, _is_bool
    ),
    "accept-nvidia-visible-devices-as-volume-mounts": _k("hook.accept_volume_mounts", _BOOL, _is_bool),
    "swarm-resource": _k("hook.swarm_resource", _STR, _is_str),
    "supported-driver-capabilities": _k("hook.supported_driver_capabilities", _STR, _is_str),
    "disable-require": _k("hook.disable_require", _BOOL, _is_bool),
}
_CLI_KEYS: Mapping[str, _Key] = {
    "root": _k("driver_root", _STR, _is_str, lambda v: "/" if v == "" else _abs_path(v)),
    "ldcache": _k("ldcache", _STR, _is_str, _opt_abs_path),
}
_OWN_KEYS: Mapping[str, _Key] = {
    "plugin-name": _k("plugin_name", _STR, _is_str, _name),
    "plugin-index": _k("plugin_index", "a two-digit string or an integer 0-99", _is_int_or_str, _index),
    "socket-path": _k("socket_path", _STR, _is_str, _abs_path),
    "dev-root": _k("dev_root", _STR, _is_str, _abs_path),
    "proc-root": _k("proc_root", _STR, _is_str, _abs_path),
    "sys-root": _k("sys_root", _STR, _is_str, _abs_path),
    "run-root": _k("run_root", _STR, _is_str, _abs_path),
    "host-root": _k("host_root", _STR, _is_str, _abs_path),
    "use-nvml": _k("use_nvml", _BOOL, _is_bool),
    "refresh-interval": _k("refresh_interval", "a number of seconds", _is_number, _interval),
    "log-level": _k("log_level", _STR, _is_str, _choice(LOG_LEVELS)),
    "log-format": _k("log_format", _STR, _is_str, _choice(LOG_FORMATS)),
    "log-file": _k("log_file", _STR, _is_str, _opt_abs_path),
    "metrics-address": _k("metrics_address", _STR, _is_str, _address),
    "mps-pipe-dir": _k("mps_pipe_dir", _STR, _is_str, _abs_path),
}
# The toolkit's other [nvidia-container-cli] keys (api/config/v1 CLIConfig): meaningful to
# nvidia-container-cli only, accepted so an existing config.toml can be shared, and ignored.
_IGNORED_CLI_KEYS = frozenset(
    {"path", "environment", "debug", "load-kmods", "no-pivot", "no-cgroups", "user", "ldconfig"}
)
# Toolkit tables we accept and ignore entirely.
_IGNORED_TABLES = frozenset(
    {"nvidia-container-runtime", "nvidia-container-runtime-hook", "nvidia-ctk", "features"}
)
OWN_TABLE = "nri-plugin"
_ATTR_TO_KEY: Mapping[str, str] = {
    **{k.attr: name for name, k in _TOP_KEYS.items()},
    **{k.attr: f"nvidia-container-cli.{name}" for name, k in _CLI_KEYS.items()},
    **{k.attr: f"{OWN_TABLE}.{name}" for name, k in _OWN_KEYS.items()},
}


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True, slots=True)
class Layer:
    """The keys one source sets: attr ("hook.x" or a Settings field) -> validated value."""

    source: str
    values: Mapping[str, object] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # toolkit keys present in the source and deliberately ignored


def _convert(spec: _Key, dotted: str, value: object, source: str) -> object:
    if not spec.check(value):
        raise ConfigError(
            f"{source}: key {dotted!r} must be {spec.type_name}, got {type(value).__name__} {value!r}"
        )
    try:
        return spec.convert(value)
    except ValueError as e:
        raise ConfigError(f"{source}: key {dotted!r} = {value!r} {e}") from None


def _table(doc: Mapping[str, object], name: str, source: str) -> Mapping[str, object]:
    t = doc[name]
    if not isinstance(t, dict):
        raise ConfigError(f"{source}: {name!r} must be a table ([{name}]), got {type(t).__name__} {t!r}")
    return t


def layer_from_mapping(doc: Mapping[str, object], source: str) -> Layer:
    """Validate a parsed TOML document against the schema."""
    values: dict[str, object] = {}
    ignored: list[str] = []
    for key, value in doc.items():
        if key in _TOP_KEYS:
            spec = _TOP_KEYS[key]
            values[spec.attr] = _convert(spec, key, value, source)
        elif key == "nvidia-container-cli":
            for sub, subval in _table(doc, key, source).items():
                dotted = f"{key}.{sub}"
                if sub in _CLI_KEYS:
                    spec = _CLI_KEYS[sub]
                    values[spec.attr] = _convert(spec, dotted, subval, source)
                elif sub in _IGNORED_CLI_KEYS:
                    ignored.append(dotted)
                else:
                    # A typo here (`roots = ...`) would silently leave the driver root at "/".
                    raise ConfigError(
                        f"{source}: unknown key {dotted!r}; [{key}] keys are "
                        f"{', '.join(sorted([*_CLI_KEYS, *_IGNORED_CLI_KEYS]))} "
                        f"(only {', '.join(sorted(_CLI_KEYS))} are used by this plugin)"
                    )
        elif key in _IGNORED_TABLES:
            ignored.append(key)
        elif key == OWN_TABLE:
            for sub, subval in _table(doc, key, source).items():
                dotted = f"{key}.{sub}"
                if sub not in _OWN_KEYS:
                    raise ConfigError(
                        f"{source}: unknown key {dotted!r}; known keys of [{OWN_TABLE}]: "
                        f"{', '.join(sorted(_OWN_KEYS))}"
                    )
                spec = _OWN_KEYS[sub]
                values[spec.attr] = _convert(spec, dotted, subval, source)
        else:
            raise ConfigError(
                f"{source}: unknown key {key!r}; expected a toolkit config.toml key "
                f"({', '.join(sorted(_TOP_KEYS))}, [nvidia-container-cli], ...) or the [{OWN_TABLE}] table"
            )
    return Layer(source, values, tuple(ignored))


def parse_toml(text: str, source: str) -> Layer:
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}; fix the syntax") from None
    return layer_from_mapping(doc, source)


def default_config_path(environ: Mapping[str, str]) -> tuple[str, bool]:
    """The toolkit file to read and whether it must exist (never: the toolkit falls back to defaults)."""
    explicit = environ.get(TOOLKIT_CONFIG_ENV, "")
    if explicit:
        return explicit, False
    xdg = environ.get("XDG_CONFIG_HOME", "")
    if xdg:
        return os.path.join(xdg, "nvidia-container-runtime", "config.toml"), False
    return DEFAULT_TOOLKIT_CONFIG, False


def load_file(path: str | None, environ: Mapping[str, str] | None = None) -> Layer:
    """Read the toolkit file. ``path`` is ``--config`` (must exist); None = the default lookup."""
    env = os.environ if environ is None else environ
    required = True
    if path is None:
        path, required = default_config_path(env)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        if required:
            raise ConfigError(
                f"config file {path!r} (--config) does not exist; fix the path, or drop --config "
                f"to read {DEFAULT_TOOLKIT_CONFIG} (or ${TOOLKIT_CONFIG_ENV}) or use the defaults"
            ) from None
        return Layer(f"{path} (absent: defaults)")
    except OSError as e:
        raise ConfigError(f"config file {path!r} cannot be read: {e.strerror}; fix its permissions") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 ({e}); TOML files must be UTF-8") from None
    return parse_toml(text, path)


def layer_from_flags(values: Mapping[str, object | None]) -> Layer:
    """Command-line flags keyed by dotted TOML key (``"nri-plugin.log-level"``,
    ``"nvidia-container-cli.root"``, or a top-level toolkit key); None (flag not given) is skipped."""
    doc: dict[str, Any] = {}
    for dotted, value in values.items():
        if value is None:
            continue
        table, _, key = dotted.rpartition(".")
        if table:
            doc.setdefault(table, {})[key] = value
        else:
            doc[key] = value
    return layer_from_mapping(doc, "command line")


def build(*layers: Layer) -> Settings:
    """Merge layers (later wins) over the defaults."""
    merged: dict[str, object] = {}
    for layer in layers:
        merged.update(layer.values)
    hook_values = {a.removeprefix("hook."): v for a, v in merged.items() if a.startswith("hook.")}
    own_values = {a: v for a, v in merged.items() if not a.startswith("hook.")}
    hook = dataclasses.replace(HookConfig(), **hook_values)  # type: ignore[arg-type]
    return dataclasses.replace(Settings(), hook=hook, **own_values)  # type: ignore[arg-type]


def provenance(*layers: Layer) -> dict[str, str]:
    """TOML key -> the source that set it last (for start-up logs)."""
    out: dict[str, str] = {}
    for layer in layers:
        for attr in layer.values:
            out[_ATTR_TO_KEY[attr]] = layer.source
    return out


def to_toml_keys(settings: Settings) -> dict[str, object]:
    """Settings as dotted TOML keys -> values (for ``inspect``/``info`` output and logs)."""
    out: dict[str, object] = {}
    for attr, key in _ATTR_TO_KEY.items():
        if attr.startswith("hook."):
            out[key] = getattr(settings.hook, attr.removeprefix("hook."))
        else:
            out[key] = getattr(settings, attr)
    return out

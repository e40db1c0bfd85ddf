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
  ``[nvidia-ctk]``, ``[features]``) are accepted and ignored; those of their keys that change what a
  container gets under the toolkit (``mode = "cdi"``/``"csv"``, ``modes.csv``, ``[features]``) give a
  warning saying what this plugin does instead;
* ``[nri-plugin]``: our own keys: every ``Settings`` field declares its key (``Setting``), and the
  schema, the command-line flags, the provenance and the apply step are derived from that.

An unknown key in the toolkit's namespace (top level, ``[nvidia-container-cli]``, another table) is
a warning (``Layer.warnings``, with the closest known key): a toolkit upgrade that adds keys must not
stop the plugin fleet-wide. An unknown ``[nri-plugin]`` key or a value of the wrong type is a
``ConfigError`` naming the key, the source and the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

from nri_plugin.errors import ConfigError
from nri_plugin.host import HostRoots
from nri_plugin.request import HookConfig

DEFAULT_TOOLKIT_CONFIG = "/etc/nvidia-container-runtime/config.toml"
TOOLKIT_CONFIG_ENV = "NVIDIA_CTK_CONFIG_FILE_PATH"
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("logfmt", "json")
_NAME_RE = re.compile(r"[A-Za-z0-9_.+-]+")
_INDEX_RE = re.compile(r"[0-9][0-9]")


# ---------------------------------------------------------------------------------------------
# Value checks and conversions


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


def _root(v: Any) -> object:
    return "/" if v == "" else _abs_path(v)


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


class Effect(enum.Enum):
    """What the running daemon must do when a setting changes (``GpuPlugin.apply``)."""

    REQUEST = "request"  # read on every CreateContainer: nothing to do
    DISCOVERY = "discovery"  # rediscover the host driver with a new HostDriver
    WATCH = "watch"  # restart the driver watch
    LOGGING = "logging"  # reconfigure the logger
    METRICS = "metrics"  # (re)start the metrics endpoint
    LOADER = "loader"  # a new image loader service (container ld.so.cache; its memos start empty)
    RESTART = "restart"  # takes effect at the next start only (logged)


@dataclass(frozen=True, slots=True)
class Setting:
    """The declaration of one setting, attached to its ``Settings`` field (``dataclasses.field``
    metadata): the TOML key, how a value is checked and converted, the help text, the command-line
    flag if it has one, whether the NVIDIA toolkit's config.toml has the key with this meaning,
    and what a change needs at run time (``effect``, plus ``also`` for a setting two parts of the
    daemon read). The TOML schema, the flags, the provenance and the apply step all derive from
    these declarations."""

    key: str  # dotted TOML key: a top-level toolkit key, "nvidia-container-cli.<k>", "nri-plugin.<k>"
    type_name: str
    check: Callable[[object], bool]
    help: str
    convert: Callable[[Any], object] = _same  # raises ValueError with a hint
    flag: str | None = None  # e.g. "--driver-root"
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    flag_type: Callable[[str], object] | None = None  # argparse type= (TOML types come from tomllib)
    negative_flag: bool = False  # the flag is a switch that sets the value to False (--no-nvml)
    run_only: bool = False  # only `run` has the flag (`inspect`/`info` take the host flags only)
    toolkit: bool = False
    effect: Effect = Effect.REQUEST
    also: tuple[Effect, ...] = ()

    @property
    def effects(self) -> tuple[Effect, ...]:
        return (self.effect, *self.also)


def _setting(default: Any, **declaration: Any) -> Any:
    return field(default=default, metadata={"setting": Setting(**declaration)})


def _boolean(default: bool, key: str, help: str, **more: Any) -> Any:
    return _setting(default, key=key, type_name=_BOOL, check=_is_bool, help=help, **more)


def _string(default: str, key: str, help: str, **more: Any) -> Any:
    return _setting(default, key=key, type_name=_STR, check=_is_str, help=help, **more)


def _seconds(default: float, key: str, help: str, **more: Any) -> Any:
    """A duration in seconds, > 0 (a flag takes a float)."""
    if "flag" in more:
        more.setdefault("metavar", "SECONDS")
        more.setdefault("flag_type", float)
    return _setting(
        default,
        key=key,
        type_name="a number of seconds",
        check=_is_number,
        convert=_interval,
        help=help,
        **more,
    )


def _root_dir(default: str, key: str, help: str, flag: str | None = None, **more: Any) -> Any:
    """An absolute directory the host is read from: a change means rediscovery."""
    more.setdefault("metavar", "DIR")
    return _string(default, key, help, convert=_abs_path, flag=flag, effect=Effect.DISCOVERY, **more)


_STR = "a string"
_BOOL = "a boolean (true/false)"
_HOOK = HookConfig()  # the toolkit's defaults for its keys
# HookConfig's fields are Settings fields of the same name: ``Settings.hook`` is built from them.
_HOOK_FIELDS = tuple(f.name for f in dataclasses.fields(HookConfig) if f.init)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon is configured with; each field declares its setting (:class:`Setting`).
    ``hook`` is derived: the toolkit keys the request model reads, as one value."""

    # --- the toolkit's top-level keys ------------------------------------------------------
    accept_envvar_unprivileged: bool = _boolean(
        _HOOK.accept_envvar_unprivileged,
        key="accept-nvidia-visible-devices-envvar-when-unprivileged",
        help="unprivileged containers may request GPUs by environment variable",
        toolkit=True,
    )
    accept_volume_mounts: bool = _boolean(
        _HOOK.accept_volume_mounts,
        key="accept-nvidia-visible-devices-as-volume-mounts",
        help="read the device list from /var/run/nvidia-container-devices mounts",
        toolkit=True,
    )
    swarm_resource: str = _string(
        _HOOK.swarm_resource,
        key="swarm-resource",
        help="environment variables (comma-separated) that carry the device list first",
        toolkit=True,
    )
    supported_driver_capabilities: str = _string(
        _HOOK.supported_driver_capabilities,
        key="supported-driver-capabilities",
        help="driver capabilities containers may ask for",
        toolkit=True,
    )
    disable_require: bool = _boolean(
        _HOOK.disable_require,
        key="disable-require",
        help="ignore NVIDIA_REQUIRE_* for every container",
        toolkit=True,
    )
    # --- [nvidia-container-cli] ------------------------------------------------------------
    driver_root: str = _string(
        "/",
        key="nvidia-container-cli.root",
        help="host driver root (nvidia-container-cli.root), e.g. /run/nvidia/driver",
        convert=_root,
        flag="--driver-root",
        metavar="DIR",
        toolkit=True,
        effect=Effect.DISCOVERY,
    )
    ldcache: str = _string(
        "",  # "" = /etc/ld.so.cache
        key="nvidia-container-cli.ldcache",
        help="ld.so.cache inside the driver root (default /etc/ld.so.cache)",
        convert=_opt_abs_path,
        flag="--ldcache",
        metavar="FILE",
        toolkit=True,
        effect=Effect.DISCOVERY,
    )
    # --- [nri-plugin] ----------------------------------------------------------------------
    dev_root: str = _root_dir(
        "/",
        key="nri-plugin.dev-root",
        help="root of the /dev tree with the NVIDIA device nodes",
        flag="--dev-root",
    )
    proc_root: str = _root_dir(
        "/proc",
        key="nri-plugin.proc-root",
        help="procfs to read /driver/nvidia from (default /proc)",
        flag="--proc-root",
    )
    sys_root: str = _root_dir(
        "/sys",
        key="nri-plugin.sys-root",
        help="sysfs root (default /sys)",
        flag="--sys-root",
    )
    run_root: str = _root_dir(
        "/",
        key="nri-plugin.run-root",
        help="root for IPC sockets (persistenced, MPS)",
        flag="--run-root",
    )
    # Where the host's / is mounted in this process's view ("/host" in a DaemonSet pod): prefixed
    # to driver-root, dev-root and run-root for reading, stripped from the mount sources handed to
    # containerd. proc-root and sys-root are not prefixed: a container's procfs/sysfs are the host
    # kernel's, so /proc/driver/nvidia and /proc/devices read the same in a pod.
    host_root: str = _root_dir(
        "/",
        key="nri-plugin.host-root",
        help="where the host's / is mounted in this process's view (e.g. /host in a pod); prefixed "
        "to the driver/dev/run roots, stripped from the mount sources given to containerd",
        flag="--host-root",
        also=(Effect.LOADER,),  # the image layers are read under it too
    )
    use_nvml: bool = _boolean(
        True,
        key="nri-plugin.use-nvml",
        help="read GPUs from /proc/driver/nvidia instead of NVML",
        flag="--no-nvml",
        negative_flag=True,
        effect=Effect.DISCOVERY,
    )
    nvml_timeout: float = _seconds(
        20.0,
        key="nri-plugin.nvml-timeout",
        help="how long one NVML query during discovery may take before it counts as hung (default "
        "20; nvmlInit can take seconds without persistence mode); the plugin registers without waiting",
        flag="--nvml-timeout",
        effect=Effect.DISCOVERY,
    )
    mps_pipe_dir: str = _root_dir(
        "/tmp/nvidia-mps",
        key="nri-plugin.mps-pipe-dir",
        help="the MPS pipe directory, inside the run root",
    )
    socket_path: str = _string(
        "/var/run/nri/nri.sock",
        key="nri-plugin.socket-path",
        help="NRI socket of an external plugin (default /var/run/nri/nri.sock)",
        convert=_abs_path,
        flag="--socket",
        metavar="PATH",
        run_only=True,
        effect=Effect.RESTART,
    )
    plugin_name: str = _string(
        "nvidia-gpu",
        key="nri-plugin.plugin-name",
        help="plugin name (default nvidia-gpu)",
        convert=_name,
        flag="--name",
        metavar="NAME",
        run_only=True,
        effect=Effect.RESTART,
    )
    plugin_index: str = _setting(
        "10",
        key="nri-plugin.plugin-index",
        type_name="a two-digit string or an integer 0-99",
        check=_is_int_or_str,
        convert=_index,
        help="plugin index, two digits (default 10)",
        flag="--index",
        metavar="NN",
        run_only=True,
        effect=Effect.RESTART,
    )
    log_level: str = _string(
        "info",
        key="nri-plugin.log-level",
        help="debug, info, warning or error",
        convert=_choice(LOG_LEVELS),
        flag="--log-level",
        choices=LOG_LEVELS,
        run_only=True,
        effect=Effect.LOGGING,
    )
    log_format: str = _string(
        "logfmt",
        key="nri-plugin.log-format",
        help="logfmt or json",
        convert=_choice(LOG_FORMATS),
        flag="--log-format",
        choices=LOG_FORMATS,
        run_only=True,
        effect=Effect.LOGGING,
    )
    log_file: str = _string(
        "",
        key="nri-plugin.log-file",
        help="log to FILE instead of stderr/the journal",
        convert=_opt_abs_path,
        flag="--log-file",
        metavar="FILE",
        run_only=True,
        effect=Effect.LOGGING,
    )
    metrics_address: str = _string(
        "",  # "" = no metrics endpoint
        key="nri-plugin.metrics-address",
        help="serve Prometheus metrics, e.g. 127.0.0.1:9400",
        convert=_address,
        flag="--metrics-address",
        metavar="HOST:PORT",
        run_only=True,
        effect=Effect.METRICS,
    )
    accept_cdi_annotations: bool = _boolean(
        _HOOK.accept_cdi_annotations,
        key="nri-plugin.accept-cdi-annotations",
        help="read nvidia.com/gpu CDI device names from cdi.k8s.io/* container annotations (pod-controlled: "
        "enable only where pods may choose their GPUs, as with the env-var policy)",
    )
    fail_unprivileged_envvar: bool = _boolean(
        _HOOK.fail_unprivileged_envvar,
        key="nri-plugin.fail-unprivileged-envvar-requests",
        help="with accept-nvidia-visible-devices-envvar-when-unprivileged = false, fail an unprivileged "
        "container that asks for GPUs by env var (the legacy hook) instead of giving it no GPUs",
    )
    refresh_interval: float = _seconds(
        10.0,
        key="nri-plugin.refresh-interval",
        help="how often to check whether the driver changed (default 10)",
        flag="--refresh-interval",
        run_only=True,
        effect=Effect.WATCH,
    )
    # --- the container's loader cache (ld.so.cache) and CUDA forward compat -------------------
    container_ldcache: str = _string(
        "auto",
        key="nri-plugin.container-ldcache",
        help="generate each GPU container's /etc/ld.so.cache from its image (auto) or not (off)",
        convert=_choice(("auto", "off")),
        flag="--container-ldcache",
        choices=("auto", "off"),
        run_only=True,
        effect=Effect.LOADER,
    )
    runtime_dir: str = _string(
        "/run/nvidia-nri-plugin",
        key="nri-plugin.runtime-dir",
        help="host directory for the generated per-container files (default /run/nvidia-nri-plugin)",
        convert=_abs_path,
        flag="--runtime-dir",
        metavar="DIR",
        effect=Effect.LOADER,
    )
    containerd_socket: str = _string(
        "/run/containerd/containerd.sock",
        key="nri-plugin.containerd-socket",
        help="containerd's gRPC API socket (its grpc.address), to find a container's snapshot",
        convert=_abs_path,
        flag="--containerd-socket",
        metavar="PATH",
        run_only=True,
        effect=Effect.LOADER,
    )
    containerd_namespace: str = _string(
        "k8s.io",
        key="nri-plugin.containerd-namespace",
        help="containerd namespace of the CRI containers (default k8s.io)",
        convert=_name,
        run_only=True,
        effect=Effect.LOADER,
    )
    snapshotter: str = _string(
        "overlayfs",
        key="nri-plugin.snapshotter",
        help="containerd's CRI snapshotter (default overlayfs; native also works)",
        convert=_name,
        run_only=True,
        effect=Effect.LOADER,
    )
    image_read_timeout: float = _seconds(
        0.5,
        key="nri-plugin.image-read-timeout",
        help="time budget for reading a new image's loader files (default 0.5; containerd waits 2 s)",
        run_only=True,
        effect=Effect.LOADER,
    )
    cuda_compat_mode: str = _string(
        "ldconfig",
        key="nvidia-container-runtime.modes.legacy.cuda-compat-mode",
        help="CUDA forward compat from the image: ldconfig (default), mount or hook (all: through the "
        "generated cache), disabled; empty = follow features.allow-cuda-compat-libs-from-container",
        convert=_choice(("ldconfig", "mount", "hook", "disabled", "")),
        toolkit=True,
        effect=Effect.LOADER,
    )
    allow_cuda_compat_libs_from_container: bool = _boolean(
        False,
        key="features.allow-cuda-compat-libs-from-container",
        help="with an empty cuda-compat-mode: use the image's CUDA forward-compat libraries",
        toolkit=True,
        effect=Effect.LOADER,
    )
    health_address: str = _string(
        "",  # "" = no health endpoint
        key="nri-plugin.health-address",
        help="serve /readyz and /healthz over HTTP, e.g. 0.0.0.0:9402 (independent of metrics)",
        convert=_address,
        flag="--health-address",
        metavar="HOST:PORT",
        run_only=True,
        effect=Effect.RESTART,
    )
    evict_unadjusted: bool = _boolean(
        False,
        key="nri-plugin.evict-unadjusted",
        help="stop containers found at Synchronize without their GPUs so that they are recreated "
        "with them (never those created before this plugin first registered on the node)",
        run_only=True,
    )
    state_dir: str = _string(
        "/var/lib/nvidia-nri-plugin",
        key="nri-plugin.state-dir",
        help="directory for the small state file recording when this plugin first registered",
        convert=_abs_path,
        flag="--state-dir",
        metavar="DIR",
        run_only=True,
        effect=Effect.RESTART,
    )
    hook: HookConfig = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        hook = HookConfig(**{name: getattr(self, name) for name in _HOOK_FIELDS})
        object.__setattr__(self, "hook", hook)  # derived once: read on every CreateContainer

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
        return tuple(getattr(self, attr) for attr, s in SETTINGS.items() if Effect.DISCOVERY in s.effects)

    def changes(self, other: Settings) -> dict[Effect, list[str]]:
        """The fields whose value differs in ``other``, by the effect a change has (a field with
        two effects is listed under both)."""
        out: dict[Effect, list[str]] = {}
        for attr, s in SETTINGS.items():
            if getattr(self, attr) != getattr(other, attr):
                for effect in s.effects:
                    out.setdefault(effect, []).append(attr)
        return out


# Every declared setting, field name -> declaration, in declaration order.
SETTINGS: Mapping[str, Setting] = MappingProxyType(
    {f.name: f.metadata["setting"] for f in dataclasses.fields(Settings) if "setting" in f.metadata}
)
_BY_KEY: Mapping[str, tuple[str, Setting]] = MappingProxyType({s.key: (a, s) for a, s in SETTINGS.items()})
TOOLKIT_CLI_TABLE = "nvidia-container-cli"
OWN_TABLE = "nri-plugin"
# The toolkit's other [nvidia-container-cli] keys (api/config/v1 CLIConfig): meaningful to
# nvidia-container-cli only, accepted so an existing config.toml can be shared, and ignored.
_IGNORED_CLI_KEYS = frozenset(
    {"path", "environment", "debug", "load-kmods", "no-pivot", "no-cgroups", "user", "ldconfig"}
)
# Toolkit tables we accept and ignore entirely.
_IGNORED_TABLES = frozenset(
    {"nvidia-container-runtime", "nvidia-container-runtime-hook", "nvidia-ctk", "features"}
)


def _keys_of(table: str) -> list[str]:
    """The declared keys of ``table`` ("" = top level), without the table prefix."""
    if not table:
        return sorted(k for k in _BY_KEY if "." not in k)
    return sorted(k.removeprefix(table + ".") for k in _BY_KEY if k.startswith(table + "."))


# ---------------------------------------------------------------------------------------------
# Command-line flags, generated from the declarations


def add_flags(group: Any, *, host_only: bool = False) -> None:
    """Add the flag of every setting that has one to an argparse group (``host_only``: only the
    host-reading settings, for ``inspect``/``info``)."""
    for s in SETTINGS.values():
        if s.flag is None or (host_only and s.run_only):
            continue
        kwargs: dict[str, Any] = {"dest": _flag_dest(s), "help": s.help, "default": None}
        if s.negative_flag:
            kwargs.update(action="store_const", const=False)
        else:
            kwargs.update(metavar=s.metavar, choices=s.choices, type=s.flag_type)
        group.add_argument(s.flag, **{k: v for k, v in kwargs.items() if v is not None or k == "default"})


def _flag_dest(s: Setting) -> str:
    return "setting:" + s.key


def flag_values(namespace: Any) -> dict[str, object | None]:
    """The declared flags of a parsed namespace, by dotted TOML key (None = not given)."""
    values = vars(namespace)
    return {s.key: values.get(_flag_dest(s)) for s in SETTINGS.values() if s.flag is not None}


# ---------------------------------------------------------------------------------------------
# Layers


@dataclass(frozen=True, slots=True)
class Layer:
    """The keys one source sets: ``Settings`` field name -> validated value."""

    source: str
    values: Mapping[str, object] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()  # toolkit keys present in the source and deliberately ignored
    # One message per toolkit key this plugin does not know (a newer toolkit's?) or that changes what
    # a container gets under the toolkit (mode = "cdi", csv, [features]): logged at warning level.
    warnings: tuple[str, ...] = ()


def _convert(spec: Setting, dotted: str, value: object, source: str) -> object:
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


def _did_you_mean(name: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_toolkit_key(source: str, dotted: str, known: Iterable[str]) -> str:
    """The warning for a key in the toolkit's namespace that this plugin does not know."""
    return (
        f"{source}: unknown toolkit key {dotted!r} ignored (from a newer NVIDIA Container Toolkit? "
        f"this plugin does not use it){_did_you_mean(dotted.rpartition('.')[2], known)}"
    )


def _toolkit_behaviour_notes(doc: Mapping[str, object], source: str) -> list[str]:
    """Toolkit keys that change what a container gets under the toolkit, and what we do instead."""
    notes: list[str] = []
    runtime = doc.get("nvidia-container-runtime")
    if isinstance(runtime, dict):
        mode = runtime.get("mode")
        if mode in ("cdi", "csv"):
            notes.append(
                f"{source}: nvidia-container-runtime.mode = {mode!r} makes the toolkit inject "
                + ("CDI specs" if mode == "cdi" else "the files listed in CSV mount specs (Tegra)")
                + "; this plugin ignores the mode and gives containers device nodes and driver files "
                "discovered under the driver root, with the hook's request semantics"
            )
        modes = runtime.get("modes")
        if isinstance(modes, dict) and "csv" in modes:
            notes.append(
                f"{source}: [nvidia-container-runtime.modes.csv] (Tegra CSV mount specs) is not "
                "supported by this plugin; those files are not injected"
            )
    features = doc.get("features")
    if isinstance(features, dict) and features:
        on = sorted(k for k, v in features.items() if v is not False)
        if on:
            notes.append(
                f"{source}: toolkit [features] {', '.join(on)} have no effect here; this plugin "
                "injects neither IMEX channels nor the gated GDS/MOFED/GDRCOPY/NVSwitch files"
            )
    return notes


def layer_from_mapping(doc: Mapping[str, object], source: str) -> Layer:
    """Validate a parsed TOML document against the schema (the declared settings).

    Unknown keys of [nri-plugin] and wrong types are errors; unknown keys in the toolkit's
    namespace (top level, [nvidia-container-cli], other tables) are warnings (``Layer.warnings``):
    a toolkit upgrade that adds keys must not stop the plugin on every node.
    """
    values: dict[str, object] = {}
    ignored: list[str] = []
    warnings: list[str] = _toolkit_behaviour_notes(doc, source)

    def take(dotted: str, value: object) -> None:
        attr, spec = _BY_KEY[dotted]
        values[attr] = _convert(spec, dotted, value, source)

    for key, value in doc.items():
        if key in _BY_KEY:
            take(key, value)
        elif key == TOOLKIT_CLI_TABLE:
            for sub, subval in _table(doc, key, source).items():
                dotted = f"{key}.{sub}"
                if dotted in _BY_KEY:
                    take(dotted, subval)
                elif sub in _IGNORED_CLI_KEYS:
                    ignored.append(dotted)
                else:
                    # A typo here (`roots = ...`) leaves the driver root at "/": say so loudly.
                    known = [*_keys_of(key), *_IGNORED_CLI_KEYS]
                    warnings.append(_unknown_toolkit_key(source, dotted, known))
        elif key in _IGNORED_TABLES:
            _take_nested(doc, key, source, take, ignored)
        elif key == OWN_TABLE:
            for sub, subval in _table(doc, key, source).items():
                dotted = f"{key}.{sub}"
                if dotted not in _BY_KEY:
                    raise ConfigError(
                        f"{source}: unknown key {dotted!r}{_did_you_mean(sub, _keys_of(OWN_TABLE))}; "
                        f"known keys of [{OWN_TABLE}]: {', '.join(_keys_of(OWN_TABLE))}"
                    )
                take(dotted, subval)
        else:
            warnings.append(_unknown_toolkit_key(source, key, [*_keys_of(""), *_IGNORED_TABLES]))
    return Layer(source, values, tuple(ignored), tuple(warnings))


def _take_nested(
    doc: Mapping[str, object], key: str, source: str, take: Callable[[str, object], None], ignored: list[str]
) -> None:
    """A toolkit table we mostly ignore: its keys we declare (nested, dotted) are taken."""
    wanted = [k for k in _BY_KEY if k.startswith(key + ".")]
    if not wanted:
        ignored.append(key)
        return
    for dotted in wanted:
        node: object = doc
        for part in dotted.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING:
            take(dotted, node)
    ignored.append(key)


_MISSING = object()


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
        *tables, key = dotted.split(".")
        node = doc
        for table in tables:
            node = node.setdefault(table, {})
        node[key] = value
    return layer_from_mapping(doc, "command line")


def build(*layers: Layer) -> Settings:
    """Merge layers (later wins) over the defaults."""
    merged: dict[str, object] = {}
    for layer in layers:
        merged.update(layer.values)
    # Every value was checked and converted against its field's declaration (_convert).
    return Settings(**cast(dict[str, Any], merged))


def provenance(*layers: Layer) -> dict[str, str]:
    """TOML key -> the source that set it last (for start-up logs)."""
    out: dict[str, str] = {}
    for layer in layers:
        for attr in layer.values:
            out[SETTINGS[attr].key] = layer.source
    return out


def to_toml_keys(settings: Settings) -> dict[str, object]:
    """Settings as dotted TOML keys -> values (for ``inspect``/``info`` output and logs)."""
    return {s.key: getattr(settings, attr) for attr, s in SETTINGS.items()}

"""Resolve a container's GPU request with the exact semantics of ``nvidia-container-runtime-hook``.

The specification is the seed hook (``reference/seed/container_config.go``, ``getNvidiaConfig``
and the helpers it calls).  Every branch of the seed is reproduced, every ``log.Panicln`` becomes
a :class:`~nri_plugin.errors.RequestError` carrying the seed's message text, and nothing else may
escape.  The deliberate deviations, each tested as ``test_deviation_<n>_…``:

1. A swarm-resource variable takes precedence over ``NVIDIA_VISIBLE_DEVICES``, as the seed's own
   comment says.  The seed's loop has no ``break`` so there the *last* present variable of
   ``[swarm, NVIDIA_VISIBLE_DEVICES]`` wins; upstream fixed that.  ``swarm_resource`` is a
   comma-separated list (as in the current toolkit); the first listed variable present in the
   environment wins and its raw value is used with the seed's special values.  (The current
   toolkit concatenates the trimmed elements of *all* present swarm variables; with a single
   configured name — the only case the seed supports — both rules give the same devices.)
2. Volume-mount requests need a path boundary after ``/var/run/nvidia-container-devices``: the
   seed's plain string-prefix test also accepted ``/var/run/nvidia-container-devicesX/0``.
3. Environment entries without ``=`` are ignored with a warning; the seed panicked
   ("environment error"), failing every such container, although containerd drops those
   entries itself when it rebuilds the environment.
4. ``NVIDIA_DRIVER_CAPABILITIES`` is checked against ``supported-driver-capabilities`` as the
   current toolkit does; ``all`` (and the legacy default) resolve to the supported set.
5. Every variable read has a size limit (``request.limits``), checked when it is read and before
   it is parsed, so that one container cannot keep the handler busy past containerd's timeout.
6. With ``accept-nvidia-visible-devices-envvar-when-unprivileged = false``, an unprivileged
   container whose environment asks for GPUs gets **no GPUs and a warning**, as the current
   toolkit does; the seed failed it ("insufficient privileges ..."), so every CPU-only pod built
   from a CUDA base image (which sets ``NVIDIA_VISIBLE_DEVICES=all``) failed to start in the secure
   setup the toolkit documents. The seed's behaviour is the plugin key
   ``fail-unprivileged-envvar-requests = true``.
7. ``NVIDIA_IMEX_CHANNELS=all`` (a newer variable the seed does not read) gives every channel of the
   node to a privileged container, and nothing (with a warning) to an unprivileged one; the
   current toolkit ignores ``all`` from the environment for every container.

Beyond the seed (newer request forms, each with its own tests): CDI device names in any device
list (``request.devices``), ``cdi.k8s.io/*`` container annotations (key ``accept-cdi-annotations``,
read before the volume mounts and the environment, as the toolkit's CDI mode does), the device
plugin's ``cdi/`` and ``imex/`` volume mounts, ``NVIDIA_IMEX_CHANNELS`` (same privilege rule as the
device list) and the gated features ``NVIDIA_GDS``/``_MOFED``/``_GDRCOPY``/``_NVSWITCH=enabled``.

Requirements are returned sorted (by variable name, the legacy ``cuda>=X.Y`` last) because the
seed's map iteration order is random.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nri_plugin.errors import RequestError
from nri_plugin.request.devices import parse_device_list, parse_imex_channel
from nri_plugin.request.limits import (
    DEVICE_LIST_LIMIT,
    MAX_ANNOTATION_TOTAL,
    MAX_DEVICE_MOUNTS,
    MAX_REQUIREMENT_TERMS,
    MAX_REQUIREMENT_TOTAL,
    PATH_LIMIT,
    checked,
    requirement_terms,
    shorten,
)
from nri_plugin.request.model import (
    ALL_DRIVER_CAPABILITIES,
    CDI_ANNOTATION_PREFIX,
    DEFAULT_DRIVER_CAPABILITIES,
    DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT,
    FEATURE_VARIABLES,
    GpuRequest,
    HookConfig,
    Mount,
    split_list,
)

__all__ = [
    "ENV_CUDA_VERSION",
    "ENV_DISABLE_REQUIRE",
    "ENV_DRIVER_CAPABILITIES",
    "ENV_IMEX_CHANNELS",
    "ENV_MIG_CONFIG_DEVICES",
    "ENV_MIG_MONITOR_DEVICES",
    "ENV_REQUIRE_CUDA",
    "ENV_REQUIRE_PREFIX",
    "ENV_VISIBLE_DEVICES",
    "env_map",
    "go_clean_path",
    "parse_cuda_version",
    "parse_go_bool",
    "resolve_request",
]

ENV_CUDA_VERSION = "CUDA_VERSION"
ENV_REQUIRE_PREFIX = "NVIDIA_REQUIRE_"
ENV_REQUIRE_CUDA = ENV_REQUIRE_PREFIX + "CUDA"
ENV_DISABLE_REQUIRE = "NVIDIA_DISABLE_REQUIRE"
ENV_VISIBLE_DEVICES = "NVIDIA_VISIBLE_DEVICES"
ENV_MIG_CONFIG_DEVICES = "NVIDIA_MIG_CONFIG_DEVICES"
ENV_MIG_MONITOR_DEVICES = "NVIDIA_MIG_MONITOR_DEVICES"
ENV_DRIVER_CAPABILITIES = "NVIDIA_DRIVER_CAPABILITIES"
ENV_IMEX_CHANNELS = "NVIDIA_IMEX_CHANNELS"

_ALL = "all"
_ALL_CAPS_ORDER: tuple[str, ...] = tuple(ALL_DRIVER_CAPABILITIES.split(","))
_DEFAULT_CAPS_ORDER: tuple[str, ...] = tuple(DEFAULT_DRIVER_CAPABILITIES.split(","))


# --------------------------------------------------------------------------------------------
# Go library behaviour the seed relies on
# --------------------------------------------------------------------------------------------

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_go_bool(value: str) -> bool | None:
    """Go's ``strconv.ParseBool``: the accepted spellings only, ``None`` when unparsable."""
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    return None


def go_clean_path(path: str) -> str:
    """Go's ``path/filepath.Clean`` on Unix (lexical; unlike ``posixpath.normpath`` it also
    folds a leading ``//`` to ``/``)."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for element in path.split("/"):
        if element in ("", "."):
            continue
        if element == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            # ".." at the root of a rooted path is dropped
            continue
        parts.append(element)
    body = "/".join(parts)
    if rooted:
        return "/" + body
    return body or "."


# Go fmt's isSpace: the unicode.White_Space ranges below U+10000.
_GO_SPACE_RANGES = (
    (0x0009, 0x000D),
    (0x0020, 0x0020),
    (0x0085, 0x0085),
    (0x00A0, 0x00A0),
    (0x1680, 0x1680),
    (0x2000, 0x200A),
    (0x2028, 0x2029),
    (0x202F, 0x202F),
    (0x205F, 0x205F),
    (0x3000, 0x3000),
)
_EOF = ""
_UINT32_MAX = 0xFFFFFFFF


_GO_SPACES = frozenset(chr(c) for lo, hi in _GO_SPACE_RANGES for c in range(lo, hi + 1))


def _go_is_space(ch: str) -> bool:
    return ch in _GO_SPACES  # "" (EOF) is not in it


class _ScanFailed(Exception):
    """Internal: one ``fmt.Sscanf`` attempt returned an error."""


class _Scanner:
    """The subset of Go's ``fmt.Sscanf`` that the seed uses: ``%d`` into ``uint32``, literal
    runes, and runs of white space / newlines in the format (``Sscanf``: newlines are not
    spaces and do not end the input).  Input after the end of the format is ignored, as in Go."""

    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def getc(self) -> str:
        if self.pos >= len(self.text):
            return _EOF
        ch = self.text[self.pos]
        self.pos += 1
        return ch

    def unget(self) -> None:
        self.pos -= 1

    def skip_space(self) -> None:
        """``ss.SkipSpace`` with ``nlIsSpace == false``: a newline is an error."""
        while True:
            ch = self.getc()
            if ch == _EOF:
                return
            if ch == "\n":
                raise _ScanFailed("unexpected newline")
            if not _go_is_space(ch):
                self.unget()
                return

    def scan_uint32(self) -> int:
        self.skip_space()  # doScanf skips before every verb but %c …
        self.skip_space()  # … and scanUint skips once more (harmless, kept for fidelity)
        start = self.pos
        while self.pos < len(self.text) and "0" <= self.text[self.pos] <= "9":
            self.pos += 1
        token = self.text[start : self.pos]
        if not token:
            raise _ScanFailed("expected integer")  # also covers EOF, signs and "_"
        significant = token.lstrip("0")
        # ParseUint has no digit limit (leading zeros are fine); Python's int() refuses strings
        # over sys.get_int_max_str_digits(), so only short ones reach it.
        if len(significant) > len(str(_UINT32_MAX)):
            raise _ScanFailed("integer overflow")
        value = int(significant or "0")
        if value > _UINT32_MAX:  # ParseUint range error or "unsigned integer overflow"
            raise _ScanFailed("integer overflow")
        return value

    def match_spaces(self, newlines: int, trailing_space: bool) -> None:
        """``ss.advance`` for one run of white space in the format."""
        for _ in range(newlines):
            ch = self.getc()
            while _go_is_space(ch) and ch != "\n":
                ch = self.getc()
            if ch not in ("\n", _EOF):
                raise _ScanFailed("newline in format does not match input")
        if trailing_space:
            ch = self.getc()
            if newlines == 0:
                if not _go_is_space(ch) and ch != _EOF:
                    raise _ScanFailed("expected space in input to match format")
                if ch == "\n":
                    raise _ScanFailed("newline in input does not match format")
            while _go_is_space(ch) and ch != "\n":
                ch = self.getc()
            if ch != _EOF:
                self.unget()


def _go_sscanf_uint32(text: str, fmt: str) -> tuple[int, ...]:
    """Run ``fmt.Sscanf(text, fmt, &uint32...)`` for a format made of ``%d``, literals and
    white space; raise :class:`_ScanFailed` where Go returns an error."""
    scanner = _Scanner(text)
    values: list[int] = []
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        if _go_is_space(ch):
            newlines = 0
            trailing = False
            while i < len(fmt) and _go_is_space(fmt[i]):
                if fmt[i] == "\n":
                    newlines += 1
                    trailing = False
                else:
                    trailing = True
                i += 1
            scanner.match_spaces(newlines, trailing)
            continue
        if ch == "%":
            if fmt[i + 1 : i + 2] != "d":
                raise ValueError(f"unsupported verb in format {fmt!r}")
            values.append(scanner.scan_uint32())
            i += 2
            continue
        got = scanner.getc()
        if got == _EOF:
            raise _ScanFailed("unexpected EOF")
        if got != ch:
            raise _ScanFailed("input does not match format")
        i += 1
    return tuple(values)


def parse_cuda_version(value: str) -> tuple[int, int, int]:
    """The seed's ``parseCudaVersion``: ``%d.%d.%d\\n``, then ``%d.%d\\n``, then ``%d\\n``.

    Go ``Sscanf`` rules that matter here: white space (not newline) may precede every number
    and follow the last one; a newline may end the match, after which anything is ignored
    (``"12.4\\nxyz"`` is 12.4); signs, ``_``, trailing garbage and values above 2**32-1 fail the
    attempt.  Raises ``RequestError("invalid CUDA version: <value>")`` when all three fail.
    """
    for fmt in ("%d.%d.%d\n", "%d.%d\n", "%d\n"):
        try:
            parsed = _go_sscanf_uint32(value, fmt)
        except _ScanFailed:
            continue
        padded = (*parsed, 0, 0)
        return padded[0], padded[1], padded[2]
    raise RequestError(f"invalid CUDA version: {value}")


# --------------------------------------------------------------------------------------------
# The seed's helpers
# --------------------------------------------------------------------------------------------


def env_map(env: Sequence[str], skipped: list[str] | None = None) -> dict[str, str]:
    """``getEnvMap``: split each entry at the first ``=``; later duplicates win.

    Deviation 3: entries without ``=`` are skipped instead of failing; they are appended to
    ``skipped`` when given (the caller warns once per container, see :func:`_skipped_note`).
    """
    result: dict[str, str] = {}
    for entry in env:
        key, sep, value = entry.partition("=")
        if not sep:
            if skipped is not None:
                skipped.append(entry)
            continue
        result[key] = value
    return result


def _skipped_note(skipped: Sequence[str]) -> str:
    """One bounded warning for all of a container's entries without ``=`` (a pod controls their
    number and size: neither may make the log line long)."""
    first = ", ".join(shorten(entry) for entry in skipped[:3])
    more = f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return (
        f"ignoring {len(skipped)} environment entr{'y' if len(skipped) == 1 else 'ies'} without '=': "
        f"{first}{more} (containerd drops such entries; write them as NAME=value)"
    )


def _is_legacy_image(env: Mapping[str, str]) -> bool:
    return len(env.get(ENV_CUDA_VERSION, "")) > 0 and len(env.get(ENV_REQUIRE_CUDA, "")) == 0


def _devices_from_envvar(env: Mapping[str, str], legacy: bool, config: HookConfig) -> tuple[str, str] | None:
    """The device list from the environment and the variable it came from."""
    devices: str | None = None
    source = ENV_VISIBLE_DEVICES
    for name in (*split_list(config.swarm_resource), ENV_VISIBLE_DEVICES):
        value = checked(env, name)
        if value is not None:  # Deviation 1: the first present variable wins
            devices, source = value, name
            break
    if devices is None and legacy:
        return "all", f"{ENV_CUDA_VERSION} (a legacy CUDA image: all GPUs)"
    if devices is None or devices == "" or devices == "void":
        return None
    if devices == "none":
        return "", source
    return devices, source


_VOLUME_ROOT = go_clean_path(DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT)
VOLUME_MOUNTS_SOURCE = f"the device-list mounts under {DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT}"


def _mount_device(rest: str) -> tuple[str, str]:
    """What one mount below the device-list root asks for: ("device", id or CDI name),
    ("imex", channel) or ("invalid", why); the device plugin's ``cdi/<vendor>/<class>=<name>`` (or
    ``cdi/<vendor>/<class>/<name>``) and ``imex/<channel>`` forms included."""
    if rest.startswith("cdi/"):
        parts = rest[4:].split("/")
        if len(parts) == 2 and "=" in parts[1]:
            return "device", f"{parts[0]}/{parts[1]}"
        if len(parts) == 3:
            return "device", f"{parts[0]}/{parts[1]}={parts[2]}"
        # As the toolkit does: a malformed CDI mount is skipped with a warning, not failed.
        return "invalid", f"{DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT}/{rest} is not a CDI device name"
    if rest.startswith("imex/") and rest[5:]:
        return "imex", parse_imex_channel(rest[5:], VOLUME_MOUNTS_SOURCE)
    return "device", rest


def _devices_from_mounts(
    mounts: Sequence[Mount], notes: list[str] | None = None
) -> tuple[str | None, tuple[str, ...]]:
    """The device list (or ``None``) and the IMEX channels that the volume mounts ask for."""
    devices: list[str] = []
    imex: list[str] = []
    for mount in mounts:
        if len(mount.source) > PATH_LIMIT or len(mount.destination) > PATH_LIMIT:
            continue  # not a path the kernel could mount, hence not a device request
        if go_clean_path(mount.source) != "/dev/null":
            continue
        destination = go_clean_path(mount.destination)
        if not destination.startswith(_VOLUME_ROOT):
            continue
        device = destination[len(_VOLUME_ROOT) :]
        if device and device[0] != "/":
            continue  # Deviation 2: "/var/run/nvidia-container-devicesX/…" is not a request
        device = device[1:]
        if not device:
            continue
        kind, value = _mount_device(device)
        if kind == "invalid":
            if notes is not None:
                notes.append(f"ignoring a device-list mount: {value}")
            continue
        (imex if kind == "imex" else devices).append(value)
        if len(devices) + len(imex) > MAX_DEVICE_MOUNTS:
            raise RequestError(
                f"more than {MAX_DEVICE_MOUNTS} device-list mounts under {DEVICE_LIST_AS_VOLUME_MOUNTS_ROOT} "
                "(the NVIDIA NRI plugin's limit); request at most one mount per device, or 'all'"
            )
    return (",".join(devices) if devices else None), tuple(imex)


def _devices_from_annotations(annotations: Mapping[str, str]) -> str | None:
    """``cdi.k8s.io/*`` annotations (keys sorted, values comma lists), when one names a device
    this plugin owns; ``None`` otherwise (the other sources are read then)."""
    names: list[str] = []
    keys = sorted(k for k in annotations if k.startswith(CDI_ANNOTATION_PREFIX))
    total = sum(len(annotations[k]) for k in keys)
    if total > MAX_ANNOTATION_TOTAL:
        raise RequestError(
            f"the {len(keys)} {CDI_ANNOTATION_PREFIX}* annotations are {total} characters long together, "
            f"over the NVIDIA NRI plugin's limit of {MAX_ANNOTATION_TOTAL}; fix the pod spec"
        )
    for key in keys:
        value = annotations[key]
        if len(value) > DEVICE_LIST_LIMIT:
            raise RequestError(
                f"annotation {key}={shorten(value)}: {len(value)} characters, over the NVIDIA NRI "
                f"plugin's limit of {DEVICE_LIST_LIMIT} for a device list; fix the pod spec"
            )
        names.extend(split_list(value))
    if not names or not parse_device_list(names, "cdi.k8s.io annotations").ours:
        return None
    return ",".join(names)


@dataclass(frozen=True, slots=True)
class _Devices:
    devices: str  # "" = none
    source: str
    imex: tuple[str, ...] = ()
    from_env: bool = False


def _devices(
    config: HookConfig,
    env: Mapping[str, str],
    mounts: Sequence[Mount],
    annotations: Mapping[str, str],
    legacy: bool,
    notes: list[str] | None,
) -> _Devices | None:
    """Where the device list comes from, in the toolkit's order: CDI annotations (when enabled),
    volume mounts (when enabled), then the environment."""
    if config.accept_cdi_annotations:
        from_annotations = _devices_from_annotations(annotations)
        if from_annotations is not None:
            return _Devices(from_annotations, "cdi.k8s.io annotations")
    imex: tuple[str, ...] = ()
    if config.accept_volume_mounts:
        from_mounts, imex = _devices_from_mounts(mounts, notes)
        if from_mounts is not None:
            return _Devices(from_mounts, VOLUME_MOUNTS_SOURCE, imex)
    found = _devices_from_envvar(env, legacy, config)
    if found is None:
        return None
    return _Devices(found[0], found[1], imex, from_env=True)


def _imex_from_env(env: Mapping[str, str]) -> tuple[str, ...]:
    value = checked(env, ENV_IMEX_CHANNELS)
    if not value:
        return ()
    return tuple(parse_imex_channel(e, f"{ENV_IMEX_CHANNELS}={shorten(value)}") for e in split_list(value))


def _features(env: Mapping[str, str]) -> frozenset[str]:
    return frozenset(feature for name, feature in FEATURE_VARIABLES if env.get(name) == "enabled")


def _driver_capabilities(env: Mapping[str, str], legacy: bool, config: HookConfig) -> str:
    """``getDriverCapabilities`` plus the toolkit's supported-set check (Deviation 4).

    ``all`` and the legacy default resolve to the supported set, written in the seed's
    ``ALL_DRIVER_CAPABILITIES`` order, so with the default configuration the result is the
    seed's string byte for byte.  An explicit list is returned as written once every element
    is supported (the seed returns it raw; ``GpuRequest.capabilities`` trims).
    """
    supported = set(split_list(config.supported_driver_capabilities))
    supports_all = _ALL in supported

    def allowed(cap: str) -> bool:
        return supports_all or cap in supported

    requested = checked(env, ENV_DRIVER_CAPABILITIES)
    if requested is None and legacy:
        return ",".join(c for c in _ALL_CAPS_ORDER if allowed(c))
    if requested is None or requested == "":
        return ",".join(c for c in _DEFAULT_CAPS_ORDER if allowed(c))
    caps = split_list(requested)
    if _ALL in caps:
        return ",".join(c for c in _ALL_CAPS_ORDER if allowed(c))
    unsupported = sorted({c for c in caps if not allowed(c)})
    if unsupported:
        supported_text = ",".join(sorted(supported))
        raise RequestError(
            f"{ENV_DRIVER_CAPABILITIES}={shorten(requested)}: "
            f"unsupported capabilities found in '{','.join(sorted(set(caps)))}' "
            f"(allowed '{supported_text}'): {', '.join(repr(c) for c in unsupported)} not supported; "
            f"set {ENV_DRIVER_CAPABILITIES} to a comma-separated subset of the allowed capabilities "
            "or 'all', or extend supported-driver-capabilities in the toolkit config"
        )
    return requested


def _requirements(
    env: Mapping[str, str], legacy: bool, *, count_terms: bool = True
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The requirement values and, parallel to them, the variable each came from. ``count_terms``:
    apply the term limit (evaluation is what it bounds: not when requirements are disabled)."""
    names = sorted(name for name in env if name.startswith(ENV_REQUIRE_PREFIX))
    requirements = [checked(env, name) or "" for name in names]
    total = sum(map(len, requirements))
    if total > MAX_REQUIREMENT_TOTAL:
        raise RequestError(
            f"the NVIDIA_REQUIRE_* variables ({len(names)}: {', '.join(names)[:200]}) are {total} "
            f"characters long together, over the NVIDIA NRI plugin's limit of {MAX_REQUIREMENT_TOTAL}; "
            "no real image needs that much: fix the image or pod spec that sets them"
        )
    terms = sum(map(requirement_terms, requirements)) if count_terms else 0
    if terms > MAX_REQUIREMENT_TERMS:
        raise RequestError(
            f"the NVIDIA_REQUIRE_* variables ({len(names)}: {', '.join(names)[:200]}) have {terms} terms "
            f"together, over the NVIDIA NRI plugin's limit of {MAX_REQUIREMENT_TERMS} (NVIDIA_REQUIRE_CUDA "
            "of the CUDA images has about 90): fix the image or pod spec that sets them"
        )
    sources = list(names)
    if legacy:
        value = checked(env, ENV_CUDA_VERSION) or ""
        try:
            major, minor, _ = parse_cuda_version(value)
        except RequestError as exc:
            raise RequestError(
                f"{ENV_CUDA_VERSION}={shorten(value)}: {exc}; expected MAJOR[.MINOR[.PATCH]] (e.g. 12.4.1): "
                f"fix the image's {ENV_CUDA_VERSION}, or set {ENV_REQUIRE_CUDA} (then {ENV_CUDA_VERSION} is "
                "not read as a requirement)"
            ) from None
        requirements.append(f"cuda>={major}.{minor}")
        sources.append(f"{ENV_CUDA_VERSION} (legacy image)")
    return tuple(requirements), tuple(sources)


def resolve_request(
    env: Sequence[str],
    mounts: Sequence[Mount],
    privileged: bool,
    config: HookConfig = HookConfig(),  # noqa: B008 - frozen, hence safe as a default
    *,
    annotations: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> GpuRequest | None:
    """The seed's ``getNvidiaConfig`` on an environment list: ``None`` for a non-GPU container.

    Checks run in the seed's order — devices, MIG config, MIG monitor, capabilities,
    requirements — and the first failing one raises :class:`RequestError`. ``annotations`` are
    the container's (read only with ``accept_cdi_annotations``). Warnings about requests that are
    ignored (an unprivileged env request under ``accept_envvar_unprivileged = false``, CDI names of
    other kinds) are appended to ``notes``.
    """
    skipped: list[str] = []
    variables = env_map(env, skipped)
    if skipped and notes is not None:
        notes.append(_skipped_note(skipped))
    legacy = _is_legacy_image(variables)

    found = _devices(config, variables, mounts, annotations or {}, legacy, notes)
    if found is None:
        return None
    if found.from_env and not privileged and not config.accept_envvar_unprivileged:
        if config.fail_unprivileged_envvar:  # the seed's behaviour (and text), kept behind a key
            raise RequestError(
                f"{found.source}={shorten(found.devices)}: insufficient privileges to read device list from "
                "NVIDIA_VISIBLE_DEVICES envvar; request GPUs through the device plugin's volume mounts, "
                "run the container privileged, or set fail-unprivileged-envvar-requests = false to start "
                "such containers without GPUs"
            )
        if notes is not None:  # Deviation 6: the current toolkit ignores the request
            notes.append(
                f"ignoring the GPU request of an unprivileged container in {found.source}: "
                "accept-nvidia-visible-devices-envvar-when-unprivileged = false on this node, so the "
                "container gets no GPUs; request GPUs through the device plugin (volume mounts or "
                "CDI) instead"
            )
        return None
    devices = found.devices
    # IMEX channels: from the volume mounts when there are any, else from the environment (under
    # the same privilege rule as the device list).
    imex = found.imex
    if not imex and (privileged or config.accept_envvar_unprivileged):
        imex = _imex_from_env(variables)
        if "all" in imex and not privileged:  # Deviation 7
            imex = tuple(c for c in imex if c != "all")
            if notes is not None:
                notes.append(
                    f"{ENV_IMEX_CHANNELS}=all in an unprivileged container: ignored (all IMEX channels "
                    "cross tenant boundaries; the toolkit ignores it for every container); list the "
                    "channels, or request them through the device plugin"
                )

    mig_config = checked(variables, ENV_MIG_CONFIG_DEVICES) or ""
    if not privileged and mig_config != "":
        raise RequestError(
            f"{ENV_MIG_CONFIG_DEVICES}={shorten(mig_config)}: cannot set MIG_CONFIG_DEVICES in non "
            f"privileged container; run the container privileged or unset {ENV_MIG_CONFIG_DEVICES}"
        )

    mig_monitor = checked(variables, ENV_MIG_MONITOR_DEVICES) or ""
    if not privileged and mig_monitor != "":
        raise RequestError(
            f"{ENV_MIG_MONITOR_DEVICES}={shorten(mig_monitor)}: cannot set MIG_MONITOR_DEVICES in non "
            f"privileged container; run the container privileged or unset {ENV_MIG_MONITOR_DEVICES}"
        )

    capabilities = _driver_capabilities(variables, legacy, config)
    disable_require = (
        bool(parse_go_bool(checked(variables, ENV_DISABLE_REQUIRE) or "")) or config.disable_require
    )
    requirements, sources = _requirements(variables, legacy, count_terms=not disable_require)

    request = GpuRequest(
        devices=devices,
        mig_config_devices=mig_config,
        mig_monitor_devices=mig_monitor,
        driver_capabilities=capabilities,
        requirements=requirements,
        disable_require=disable_require,
        imex_channels=imex,
        features=_features(variables),
        privileged=privileged,
        devices_source=found.source,
        requirement_sources=sources,
    )
    if request.foreign_devices and notes is not None:
        shown = ", ".join(request.foreign_devices[:4])
        notes.append(f"{found.source}: leaving CDI devices of other kinds to the runtime: {shown}")
    if not request.devices_ours:
        return None  # only names of kinds we do not own: not our container (IMEX env alone neither)
    return request

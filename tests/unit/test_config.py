"""Configuration: schema, toolkit keys, precedence, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from nri_plugin import config as cfg
from nri_plugin.errors import ConfigError
from nri_plugin.host.model import HostRoots
from nri_plugin.request.model import DEFAULT_SUPPORTED_DRIVER_CAPABILITIES, HookConfig

# A toolkit config.toml as `nvidia-ctk config default` writes it (plus [features]).
TOOLKIT_FILE = """
accept-nvidia-visible-devices-as-volume-mounts = true
accept-nvidia-visible-devices-envvar-when-unprivileged = false
disable-require = false
supported-driver-capabilities = "compat32,compute,display,graphics,ngx,utility,video"
swarm-resource = "DOCKER_RESOURCE_GPU"

[nvidia-container-cli]
environment = []
ldconfig = "@/sbin/ldconfig"
load-kmods = true
no-cgroups = false
root = "/run/nvidia/driver"
ldcache = "/etc/ld.so.cache.d/nvidia"

[nvidia-container-runtime]
log-level = "info"
mode = "auto"
runtimes = ["docker-runc", "runc", "crun"]

[nvidia-container-runtime.modes.cdi]
annotation-prefixes = ["cdi.k8s.io/"]
default-kind = "nvidia.com/gpu"
spec-dirs = ["/etc/cdi", "/var/run/cdi"]

[nvidia-container-runtime-hook]
path = "nvidia-container-runtime-hook"
skip-mode-detection = false

[nvidia-ctk]
path = "nvidia-ctk"

[features]
allow-ldconfig-from-container = false
"""


def test_defaults_match_the_toolkit_and_the_brief() -> None:
    s = cfg.build()
    assert s.hook == HookConfig()
    assert s.hook.accept_envvar_unprivileged is True
    assert s.hook.supported_driver_capabilities == DEFAULT_SUPPORTED_DRIVER_CAPABILITIES
    assert (s.plugin_name, s.plugin_index, s.socket_path) == ("nvidia-gpu", "10", "/var/run/nri/nri.sock")
    assert s.roots == HostRoots()
    assert s.ldcache_path == "/etc/ld.so.cache"
    assert (s.use_nvml, s.refresh_interval, s.log_level, s.log_format) == (True, 10.0, "info", "logfmt")
    assert (s.log_file, s.metrics_address) == ("", "")


def test_toolkit_file_is_read_and_its_other_keys_ignored() -> None:
    layer = cfg.parse_toml(TOOLKIT_FILE, "config.toml")
    s = cfg.build(layer)
    assert s.hook.accept_volume_mounts is True
    assert s.hook.accept_envvar_unprivileged is False
    assert s.hook.swarm_resource == "DOCKER_RESOURCE_GPU"
    assert s.driver_root == "/run/nvidia/driver"
    assert s.roots.driver_root == "/run/nvidia/driver"
    assert s.ldcache_path == "/etc/ld.so.cache.d/nvidia"
    assert set(layer.ignored) == {
        "nvidia-container-cli.environment",
        "nvidia-container-cli.ldconfig",
        "nvidia-container-cli.load-kmods",
        "nvidia-container-cli.no-cgroups",
        "nvidia-container-runtime",
        "nvidia-container-runtime-hook",
        "nvidia-ctk",
        "features",
    }


def test_empty_driver_root_means_slash() -> None:
    s = cfg.build(cfg.parse_toml('[nvidia-container-cli]\nroot = ""\n', "f"))
    assert s.driver_root == "/"


def test_own_table() -> None:
    text = """
[nri-plugin]
plugin-name = "gpu"
plugin-index = 5
socket-path = "/run/nri/nri.sock"
dev-root = "/host"
proc-root = "/host/proc"
sys-root = "/host/sys"
run-root = "/host"
use-nvml = false
refresh-interval = 2.5
log-level = "WARN"
log-format = "json"
log-file = "/var/log/x.log"
metrics-address = "127.0.0.1:9400"
mps-pipe-dir = "/tmp/mps"
"""
    s = cfg.build(cfg.parse_toml(text, "f"))
    assert s.plugin_name == "gpu"
    assert s.plugin_index == "05"
    assert s.roots == HostRoots("/", "/host", "/host/proc", "/host/sys", "/host")
    assert (s.use_nvml, s.refresh_interval, s.log_level, s.log_format) == (False, 2.5, "warning", "json")
    assert (s.log_file, s.metrics_address, s.mps_pipe_dir) == ("/var/log/x.log", "127.0.0.1:9400", "/tmp/mps")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[nri-plugin]\nfoo = 1", ["unknown key 'nri-plugin.foo'", "plugin-name"]),
        ("[nri-plugin]\nlog-levle = 1", ["unknown key 'nri-plugin.log-levle'", "did you mean 'log-level'"]),
        ("disable-require = 'yes'", ["'disable-require'", "a boolean", "str"]),
        ("swarm-resource = 3", ["'swarm-resource'", "a string", "int"]),
        ("[nvidia-container-cli]\nroot = 5", ["'nvidia-container-cli.root'", "a string"]),
        ("[nvidia-container-cli]\nroot = 'relative/dir'", ["'nvidia-container-cli.root'", "absolute path"]),
        ("nvidia-container-cli = 1", ["'nvidia-container-cli' must be a table"]),
        ("[nri-plugin]\nplugin-index = '100'", ["'nri-plugin.plugin-index'", "two digits"]),
        ("[nri-plugin]\nplugin-index = true", ["'nri-plugin.plugin-index'", "integer"]),
        ("[nri-plugin]\nplugin-name = 'a b'", ["'nri-plugin.plugin-name'", "A-Za-z0-9"]),
        ("[nri-plugin]\nuse-nvml = 1", ["'nri-plugin.use-nvml'", "a boolean", "int"]),
        ("[nri-plugin]\nrefresh-interval = 0", ["'nri-plugin.refresh-interval'", "> 0"]),
        ("[nri-plugin]\nrefresh-interval = true", ["'nri-plugin.refresh-interval'", "a number"]),
        ("[nri-plugin]\nlog-level = 'loud'", ["'nri-plugin.log-level'", "debug, info"]),
        ("[nri-plugin]\nlog-format = 'xml'", ["'nri-plugin.log-format'", "logfmt, json"]),
        ("[nri-plugin]\nmetrics-address = 'localhost'", ["'nri-plugin.metrics-address'", "HOST:PORT"]),
        ("[nri-plugin]\nmetrics-address = 'h:99999'", ["'nri-plugin.metrics-address'", "65535"]),
        ("a = [", ["not valid TOML", "src.toml"]),
    ],
)
def test_errors_name_key_source_and_fix(text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        cfg.parse_toml(text, "src.toml")
    for fragment in fragments:
        assert fragment in str(info.value)


def test_precedence_defaults_file_nri_flags(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text(
        "disable-require = true\nswarm-resource = 'FROM_FILE'\n"
        "[nri-plugin]\nlog-level = 'debug'\nrefresh-interval = 30\nlog-format = 'json'\n"
    )
    file_layer = cfg.load_file(str(path), {})
    nri_layer = cfg.parse_toml(
        "swarm-resource = 'FROM_NRI'\n[nri-plugin]\nlog-level = 'warning'\nrefresh-interval = 20\n",
        "NRI config",
    )
    flags = cfg.layer_from_flags({"nri-plugin.log-level": "error", "nri-plugin.log-file": None})
    s = cfg.build(file_layer, nri_layer, flags)
    assert s.hook.disable_require is True  # only the file sets it
    assert s.hook.swarm_resource == "FROM_NRI"  # NRI over file
    assert s.refresh_interval == 20.0  # NRI over file
    assert s.log_level == "error"  # flags over NRI over file
    assert s.log_format == "json"  # file over defaults
    assert s.log_file == ""  # a flag not given changes nothing
    prov = cfg.provenance(file_layer, nri_layer, flags)
    assert prov["nri-plugin.log-level"] == "command line"
    assert prov["swarm-resource"] == "NRI config"
    assert prov["disable-require"] == str(path)


def test_missing_default_file_is_defaults_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    layer = cfg.load_file(None, {"NVIDIA_CTK_CONFIG_FILE_PATH": missing})
    assert layer.values == {}
    assert "absent" in layer.source
    with pytest.raises(ConfigError, match=r"nope\.toml.*--config.*does not exist"):
        cfg.load_file(missing, {})


def test_default_file_lookup_order(tmp_path: Path) -> None:
    assert cfg.default_config_path({}) == (cfg.DEFAULT_TOOLKIT_CONFIG, False)
    xdg = cfg.default_config_path({"XDG_CONFIG_HOME": "/x"})
    assert xdg == ("/x/nvidia-container-runtime/config.toml", False)
    env = cfg.default_config_path({"XDG_CONFIG_HOME": "/x", "NVIDIA_CTK_CONFIG_FILE_PATH": "/y.toml"})
    assert env == ("/y.toml", False)
    path = tmp_path / "c.toml"
    path.write_text("disable-require = true\n")
    assert cfg.build(cfg.load_file(None, {"NVIDIA_CTK_CONFIG_FILE_PATH": str(path)})).hook.disable_require


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[nri-plugin]\nlog-level = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: key 'nri-plugin\.log-level' must be a string"):
        cfg.load_file(str(path), {})
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        cfg.load_file(str(path), {})


def test_flags_use_the_same_validation() -> None:
    with pytest.raises(ConfigError, match=r"command line: key 'nri-plugin\.plugin-index'"):
        cfg.layer_from_flags({"nri-plugin.plugin-index": "1"})
    s = cfg.build(cfg.layer_from_flags({"nvidia-container-cli.root": "/drv", "disable-require": True}))
    assert (s.driver_root, s.hook.disable_require) == ("/drv", True)


def test_discovery_key_changes_only_with_discovery_settings() -> None:
    base = cfg.build()
    same = cfg.build(cfg.layer_from_flags({"nri-plugin.log-level": "debug"}))
    other = cfg.build(cfg.layer_from_flags({"nri-plugin.dev-root": "/host"}))
    assert base.discovery_key() == same.discovery_key()
    assert base.discovery_key() != other.discovery_key()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("127.0.0.1:9400", ("127.0.0.1", 9400)), ("[::1]:0", ("::1", 0)), (":9400", ("0.0.0.0", 9400))],
)
def test_parse_address(value: str, expected: tuple[str, int]) -> None:
    assert cfg.parse_address(value) == expected


def test_to_toml_keys_round_trips() -> None:
    s = cfg.build(cfg.parse_toml(TOOLKIT_FILE, "f"))
    keys = cfg.to_toml_keys(s)
    assert keys["nvidia-container-cli.root"] == "/run/nvidia/driver"
    doc: dict[str, object] = {}
    for dotted, value in keys.items():
        *tables, key = dotted.split(".")  # toolkit keys may be nested: modes.legacy.cuda-compat-mode
        node = doc
        for table in tables:
            sub = node.setdefault(table, {})
            assert isinstance(sub, dict)
            node = sub
        node[key] = value
    assert cfg.build(cfg.layer_from_mapping(doc, "round trip")) == s


def test_host_root_prefixes_read_roots_but_not_procfs() -> None:
    text = '[nvidia-container-cli]\nroot = "/run/nvidia/driver"\n[nri-plugin]\nhost-root = "/host"\n'
    roots = cfg.build(cfg.parse_toml(text, "f")).roots
    assert roots == HostRoots(
        driver_root="/host/run/nvidia/driver",
        dev_root="/host",
        proc_root="/proc",
        sys_root="/sys",
        run_root="/host",
        host_root="/host",
    )
    assert roots.to_host("/host/run/nvidia/driver/usr/lib64/libcuda.so.1") == (
        "/run/nvidia/driver/usr/lib64/libcuda.so.1"
    )
    with pytest.raises(ConfigError, match="host-root"):
        cfg.build(cfg.parse_toml('[nri-plugin]\nhost-root = "relative"\n', "f"))


def test_unknown_toolkit_keys_are_warnings_that_name_the_closest_key() -> None:
    # A newer toolkit's key must not stop the plugin fleet-wide; a typo of `root` is still loud.
    layer = cfg.parse_toml(
        'bogus = 1\n[nvidia-container-cli]\nroots = "/run/nvidia/driver"\n[mystery]\na = 1\n', "f.toml"
    )
    assert cfg.build(layer).driver_root == "/"
    by_key = {w.split("'")[1]: w for w in layer.warnings}
    assert set(by_key) == {"bogus", "nvidia-container-cli.roots", "mystery"}
    assert "did you mean 'root'?" in by_key["nvidia-container-cli.roots"]
    assert all(w.startswith("f.toml: unknown toolkit key") for w in layer.warnings)
    # The toolkit's own keys of that table are accepted and ignored without a warning.
    layer = cfg.parse_toml('[nvidia-container-cli]\nload-kmods = true\nldconfig = "@/sbin/ldconfig"\n', "f")
    assert set(layer.ignored) == {"nvidia-container-cli.load-kmods", "nvidia-container-cli.ldconfig"}
    assert layer.warnings == ()


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('[nvidia-container-runtime]\nmode = "cdi"', "mode = 'cdi' makes the toolkit inject CDI specs"),
        ('[nvidia-container-runtime]\nmode = "csv"', "CSV mount specs"),
        ('[nvidia-container-runtime.modes.csv]\nmount-spec-path = "/etc/x"', "modes.csv"),
        ("[features]\nallow-gdrcopy = true\ndisable-imex-channel-creation = false", "[features] allow-gdrc"),
    ],
)
def test_toolkit_keys_that_change_injection_are_warned_about(text: str, fragment: str) -> None:
    layer = cfg.parse_toml(text, "config.toml")
    assert len(layer.warnings) == 1 and fragment in layer.warnings[0], layer.warnings
    assert "this plugin" in layer.warnings[0]


def test_toolkit_modes_without_an_effect_give_no_warning() -> None:
    for text in ('[nvidia-container-runtime]\nmode = "auto"', "[features]\nallow-gdrcopy = false"):
        assert cfg.parse_toml(text, "f").warnings == (), text


# --- one declaration per setting -------------------------------------------------------------


def test_every_setting_is_declared_once_and_everything_derives_from_it() -> None:
    import dataclasses

    from nri_plugin.cli import build_parser

    fields = [f.name for f in dataclasses.fields(cfg.Settings) if f.init]
    assert list(cfg.SETTINGS) == fields  # every configurable field declares its setting
    keys = [s.key for s in cfg.SETTINGS.values()]
    flags = [s.flag for s in cfg.SETTINGS.values() if s.flag]
    assert len(set(keys)) == len(keys) and len(set(flags)) == len(flags)
    defaults = cfg.Settings()
    assert cfg.to_toml_keys(defaults) == {s.key: getattr(defaults, a) for a, s in cfg.SETTINGS.items()}
    # each declared key is accepted by the TOML schema with its own default value ...
    for attr, s in cfg.SETTINGS.items():
        *tables, key = s.key.split(".")
        doc: dict[str, object] = {key: getattr(defaults, attr)}
        for table in reversed(tables):  # nested toolkit tables: nvidia-container-runtime.modes.legacy
            doc = {table: doc}
        layer = cfg.layer_from_mapping(doc, "t")
        assert layer.values == {attr: getattr(defaults, attr)}, s.key
        assert cfg.provenance(layer) == {s.key: "t"}
    # ... and each flag exists on `run` and sets exactly its key
    parser = build_parser()
    run_help = parser.parse_known_args(["run"])[0]
    assert all(v is None for v in cfg.flag_values(run_help).values())
    for attr, s in cfg.SETTINGS.items():
        if s.flag is None:
            continue
        argv = ["run", s.flag] if s.negative_flag else ["run", s.flag, str(getattr(defaults, attr) or "/x")]
        if s.choices:
            argv[-1] = s.choices[-1]
        given = {k: v for k, v in cfg.flag_values(parser.parse_args(argv)).items() if v is not None}
        assert list(given) == [s.key], (s.flag, given)
    # the toolkit's own keys are marked as such
    assert {s.key for s in cfg.SETTINGS.values() if s.toolkit} == {
        "accept-nvidia-visible-devices-envvar-when-unprivileged",
        "accept-nvidia-visible-devices-as-volume-mounts",
        "swarm-resource",
        "supported-driver-capabilities",
        "disable-require",
        "nvidia-container-cli.root",
        "nvidia-container-cli.ldcache",
        "nvidia-container-runtime.modes.legacy.cuda-compat-mode",
        "features.allow-cuda-compat-libs-from-container",
    }


def test_settings_changes_are_grouped_by_effect() -> None:
    old = cfg.Settings()
    new = dataclasses.replace(old, driver_root="/run/nvidia/driver", log_level="debug", plugin_name="x")
    assert old.changes(new) == {
        cfg.Effect.DISCOVERY: ["driver_root"],
        cfg.Effect.RESTART: ["plugin_name"],
        cfg.Effect.LOGGING: ["log_level"],
    }
    assert new.hook == old.hook  # hook-less changes keep the request model's view
    assert dataclasses.replace(old, disable_require=True).hook.disable_require is True


def test_loader_settings_have_their_own_effect() -> None:
    """What ``plugin.loader_config`` reads is declared LOADER (host-root also rediscovers)."""
    loader = {a for a, s in cfg.SETTINGS.items() if cfg.Effect.LOADER in s.effects}
    assert loader == {
        "container_ldcache", "runtime_dir", "containerd_socket", "containerd_namespace", "snapshotter",
        "image_read_timeout", "cuda_compat_mode", "allow_cuda_compat_libs_from_container", "host_root",
    }  # fmt: skip
    old = cfg.Settings()
    new = dataclasses.replace(old, snapshotter="native", host_root="/host", swarm_resource="X")
    assert old.changes(new) == {
        cfg.Effect.REQUEST: ["swarm_resource"],
        cfg.Effect.DISCOVERY: ["host_root"],
        cfg.Effect.LOADER: ["host_root", "snapshotter"],
    }
    assert new.discovery_key() != old.discovery_key()


def test_what_changes_the_loader_config_is_declared_loader() -> None:
    """Every setting whose change changes ``plugin.loader_config`` declares Effect.LOADER (so
    ``changes()`` reports it); checked by changing each setting on its own."""
    from nri_plugin.plugin import loader_config

    base = cfg.Settings()
    checked = 0
    for f in dataclasses.fields(cfg.Settings):
        if not f.init or f.name not in cfg.SETTINGS:
            continue
        value = getattr(base, f.name)
        if isinstance(value, bool):
            other: object = not value
        elif isinstance(value, int | float):
            other = value + 1
        elif isinstance(value, str):
            other = "/other" if value.startswith("/") else "native" if value == "overlayfs" else value + "x"
        else:
            continue
        variant = dataclasses.replace(base)
        object.__setattr__(variant, f.name, other)  # one field changed (frozen dataclass)
        changed = loader_config(variant) != loader_config(base)
        declared = cfg.Effect.LOADER in cfg.SETTINGS[f.name].effects
        assert not changed or declared, f"{f.name} changes the loader config but is not declared LOADER"
        checked += 1
    assert checked > 30


def test_the_hook_config_is_built_from_the_settings_of_the_same_name() -> None:
    s = dataclasses.replace(cfg.Settings(), swarm_resource="A,B", accept_volume_mounts=True)
    for f in dataclasses.fields(HookConfig):
        if f.init:
            assert getattr(s.hook, f.name) == getattr(s, f.name), f.name
    assert s.hook.trigger_prefixes[-2:] == ("A=", "B=")


def test_request_model_keys_of_the_plugin_reach_the_hook_config() -> None:
    s = cfg.build()
    assert (s.hook.accept_cdi_annotations, s.hook.fail_unprivileged_envvar) == (False, False)
    text = "[nri-plugin]\naccept-cdi-annotations = true\nfail-unprivileged-envvar-requests = true\n"
    s = cfg.build(cfg.parse_toml(text, "plugin.toml"))
    assert (s.hook.accept_cdi_annotations, s.hook.fail_unprivileged_envvar) == (True, True)
    with pytest.raises(ConfigError, match="accept-cdi-annotations"):
        cfg.build(cfg.parse_toml('[nri-plugin]\naccept-cdi-annotations = "yes"\n', "plugin.toml"))

"""Checks of the node packaging: systemd unit, Kubernetes manifests, containerd snippets, docs,
and that pre-commit runs the linters of ``scripts/check``.

The manifests are validated against the Kubernetes OpenAPI schemas bundled with
``kubernetes-validate`` (offline, strict: unknown fields fail). The containerd snippets are parsed
with ``tomllib`` and, where the e2e cache holds real containerd binaries, fed to ``containerd config
dump``. The plugin configuration inside the ConfigMap is parsed by the daemon's own config loader, so
a renamed key breaks this test instead of a node.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml  # type: ignore[import-untyped]

from nri_plugin import config as plugin_config
from nri_plugin.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
UNIT = REPO / "systemd" / "nvidia-nri-plugin.service"
OPERATIONS = REPO / "docs" / "operations.md"
E2E_CACHE = Path(os.environ.get("NRI_E2E_CACHE", REPO / ".cache" / "e2e"))

# Oldest Kubernetes minor we claim to support (DaemonSet maxSurge is GA since 1.25) and the newest
# schema kubernetes-validate ships.
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
NRI_SECTION = "io.containerd.nri.v1.nri"
TOLERATE_KEY = "tolerate-missing-plugins.noderesource.dev"


# ---------------------------------------------------------------------------------------------
# helpers


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A small systemd unit parser: section -> key -> every value in order (keys may repeat).

    Handles comments, blank lines and backslash continuations; an empty assignment (``Key=``) is
    kept as ``""`` because for systemd it means "reset", which is exactly what we assert on.
    """
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        if current is None:
            raise AssertionError(f"directive outside a section: {line!r}")
        key, sep, value = line.partition("=")
        if not sep:
            raise AssertionError(f"not a Key=Value line: {line!r}")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    return values[-1]


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        with path.open() as f:
            for doc in yaml.safe_load_all(f):
                if doc is None or doc.get("apiVersion", "").startswith("kustomize.config.k8s.io/"):
                    continue
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


def find(kind: str) -> dict[str, Any]:
    matches = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    assert len(matches) == 1, f"expected exactly one {kind} in deploy/, found {len(matches)}"
    return matches[0]


def plugin_container() -> dict[str, Any]:
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = [c for c in pod["containers"] if c["name"] == "nvidia-nri-plugin"]
    assert len(containers) == 1
    return containers[0]


def configmap_toml() -> str:
    text = find("ConfigMap")["data"]["config.toml"]
    assert isinstance(text, str)
    return text


def uncomment_validator_block(text: str) -> str:
    """The 2.x snippet ships the 2.2+ default_validator table commented out; return it enabled."""
    out: list[str] = []
    in_block = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# [plugins.") and "default_validator" in stripped:
            in_block = True
        if in_block and stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if body.startswith("[") or re.match(r"^[a-z_]+ = ", body):
                out.append(body)
            continue
        out.append(line)
    return "\n".join(out)


def containerd_binary(series: str) -> Path | None:
    path = E2E_CACHE / f"containerd-{series}" / "root" / "usr" / "bin" / "containerd"
    return path if path.is_file() and os.access(path, os.X_OK) else None


# ---------------------------------------------------------------------------------------------
# systemd unit


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return parse_unit(UNIT.read_text())


def test_unit_parser_rejects_garbage() -> None:
    with pytest.raises(AssertionError):
        parse_unit("ExecStart=/bin/true\n")
    parsed = parse_unit("[Service]\nEnvironment=A=1\nEnvironment=B=2 \\\n C=3\nCapabilityBoundingSet=\n")
    assert parsed["Service"]["Environment"] == ["A=1", "B=2  C=3"]
    assert parsed["Service"]["CapabilityBoundingSet"] == [""]


def test_unit_ordering_and_restart(unit: dict[str, dict[str, list[str]]]) -> None:
    assert "containerd.service" in last(unit, "Unit", "After").split()
    assert "containerd.service" in last(unit, "Unit", "Wants").split()
    # BindsTo/Requires would stop the plugin on every containerd restart (it reconnects itself).
    assert "BindsTo" not in unit["Unit"] and "Requires" not in unit["Unit"]
    assert last(unit, "Unit", "StartLimitIntervalSec") == "0"
    assert last(unit, "Service", "Restart") == "always"
    assert last(unit, "Service", "RestartSec") == "100ms"  # issue 12: fail-open window
    assert last(unit, "Service", "RestartPreventExitStatus") == "2"  # config errors: no loop
    assert last(unit, "Install", "WantedBy") == "multi-user.target"
    # kubelet waits for READY=1 (registered): no pod on the node before injection works
    assert "kubelet.service" in last(unit, "Unit", "Before").split()
    assert "/var/lib/" + last(unit, "Service", "StateDirectory") == plugin_config.Settings().state_dir


def test_unit_notify_and_logging(unit: dict[str, dict[str, list[str]]]) -> None:
    assert last(unit, "Service", "Type") == "notify"
    assert last(unit, "Service", "NotifyAccess") == "main"
    assert last(unit, "Service", "StandardOutput") == "journal"
    assert last(unit, "Service", "StandardError") == "journal"
    assert last(unit, "Service", "SyslogIdentifier") == "nvidia-nri-plugin"
    env = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    assert env["PYTHONUNBUFFERED"] == "1"  # log lines reach the journal as they are written
    assert env["TMPDIR"] == "/run/" + last(unit, "Service", "RuntimeDirectory")


def test_unit_execstart_is_the_console_script(unit: dict[str, dict[str, list[str]]]) -> None:
    argv = last(unit, "Service", "ExecStart").split()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(argv[0]).is_absolute()
    assert Path(argv[0]).name in scripts, f"{argv[0]} is not a console script of pyproject.toml"
    assert argv[1] == "run"


def test_unit_keeps_gpu_devices_and_driver_files_reachable(unit: dict[str, dict[str, list[str]]]) -> None:
    svc = unit["Service"]
    # PrivateDevices=yes replaces /dev with a minimal tmpfs: no /dev/nvidia* at all.
    assert last(unit, "Service", "PrivateDevices") == "no"
    # Any DeviceAllow= (also the one ProtectClock= implies) turns the device cgroup into an allow
    # list and NVML's open("/dev/nvidiactl") fails with EPERM.
    assert "DeviceAllow" not in svc
    assert last(unit, "Service", "DevicePolicy") == "auto"
    assert svc.get("ProtectClock", ["no"])[-1] == "no"
    # ProcSubset=pid hides /proc/devices and /proc/driver/nvidia.
    assert last(unit, "Service", "ProcSubset") == "all"
    # PrivateTmp would hide the host's /tmp/nvidia-mps.
    assert last(unit, "Service", "PrivateTmp") == "no"
    assert "AF_UNIX" in last(unit, "Service", "RestrictAddressFamilies").split()
    assert "PrivateNetwork" not in svc and "PrivateUsers" not in svc
    assert "User" not in svc or last(unit, "Service", "User") == "root"  # the NRI socket is root-only


def test_unit_hardening(unit: dict[str, dict[str, list[str]]]) -> None:
    expected = {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectControlGroups": "yes",
        "ProtectProc": "invisible",
        "MemoryDenyWriteExecute": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "SystemCallFilter": "@system-service",
        "RuntimeDirectory": "nvidia-nri-plugin",
        "RuntimeDirectoryMode": "0700",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }
    for key, value in expected.items():
        assert last(unit, "Service", key) == value, key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify also checks that ExecStart= exists; the console script is not installed here, so point
    # it at /bin/true in a copy and let systemd check every other directive.
    text = UNIT.read_text()
    exec_path = last(parse_unit(text), "Service", "ExecStart").split()[0]
    copy = tmp_path / UNIT.name
    text = text.replace(exec_path, "/bin/true")
    copy.write_text(text)
    res = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0 and UNIT.name not in res.stderr, res.stderr
    # and it does catch a broken unit
    copy.write_text(text.replace("Type=notify", "Type=notifyy"))
    res = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )
    assert "Failed to parse service type" in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# Kubernetes manifests


def _doc_ids() -> Iterator[str]:
    return (name for name, _ in k8s_documents())


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", list(_doc_ids()))
def test_manifest_is_valid_kubernetes(name: str, version: str) -> None:
    doc = dict(k8s_documents())[name]
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    ds = find("DaemonSet")
    broken = yaml.safe_load(yaml.safe_dump(ds))
    broken["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_manifests_cover_the_expected_kinds() -> None:
    kinds = sorted(doc["kind"] for _, doc in k8s_documents())
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "ServiceAccount"]
    ns = find("Namespace")["metadata"]["name"]
    for kind in ("ConfigMap", "DaemonSet", "ServiceAccount"):
        assert find(kind)["metadata"]["namespace"] == ns


def test_kustomization_lists_every_manifest() -> None:
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == manifests
    assert kust["images"][0]["name"] == plugin_container()["image"].rsplit(":", 1)[0]


def test_daemonset_scheduling_and_updates() -> None:
    ds = find("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["priorityClassName"] == "system-node-critical"
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    # two instances on one node would both claim the same devices: NRI conflict
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert pod.get("hostPID", False) is False and pod.get("hostNetwork", False) is False
    assert pod["automountServiceAccountToken"] is False
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations[TOLERATE_KEY] == "true"


def test_daemonset_container_security_and_resources() -> None:
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    c = plugin_container()
    assert pod["securityContext"]["runAsUser"] == 0  # root-only NRI socket
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["privileged"] is True  # NVML must open /dev/nvidiactl; see deploy/README.md
    assert "limits" in c["resources"] and "cpu" not in c["resources"]["limits"]
    assert "memory" in c["resources"]["limits"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "void"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probes = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe, path in probes.items():
        assert c[probe]["httpGet"] == {"path": path, "port": "health"}, probe
    settings = plugin_config.build(plugin_config.parse_toml(configmap_toml(), "ConfigMap"))
    assert plugin_config.parse_address(settings.health_address)[1] == ports["health"]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert mounts["node-state"] == settings.state_dir  # survives pod restarts: a hostPath
    assert c["command"][:2] == ["nvidia-nri-plugin", "run"]


def test_daemonset_mounts_match_host_paths() -> None:
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in plugin_container()["volumeMounts"]}
    assert set(mounts) <= set(volumes)
    host_paths = {name: v["hostPath"] for name, v in volumes.items() if "hostPath" in v}
    # The socket directory, never the socket file (containerd re-creates the socket).
    assert host_paths["nri-socket-dir"] == {"path": "/var/run/nri", "type": "Directory"}
    # Every host path is mounted at the same path: mount sources handed to containerd are host paths.
    for name, hp in host_paths.items():
        assert mounts[name]["mountPath"] == hp["path"], name
    for name in ("driver-root", "dev", "host-tmp"):
        assert mounts[name]["mountPropagation"] == "HostToContainer", name
    assert not any(m["mountPath"].startswith(("/proc", "/sys")) for m in mounts.values())
    state = mounts["state"]["mountPath"]
    assert plugin_container()["terminationMessagePath"].startswith(state + "/")


def test_configmap_is_accepted_by_the_plugin_config_loader() -> None:
    layer = plugin_config.parse_toml(configmap_toml(), "deploy ConfigMap config.toml")
    settings = plugin_config.build(layer)
    pod = find("DaemonSet")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in plugin_container()["volumeMounts"]}
    assert settings.driver_root == mounts["driver-root"]
    assert os.path.dirname(settings.socket_path) == mounts["nri-socket-dir"]
    assert (settings.plugin_index, settings.plugin_name) == ("10", "nvidia-gpu")
    _, port = plugin_config.parse_address(settings.metrics_address)
    ports = {p["name"]: p["containerPort"] for p in plugin_container()["ports"]}
    assert ports["metrics"] == port
    command = plugin_container()["command"]
    config_path = command[command.index("--config") + 1]
    assert os.path.dirname(config_path) == mounts["config"]
    assert (
        pod["volumes"][[v["name"] for v in pod["volumes"]].index("config")]["configMap"]["name"]
        == (find("ConfigMap")["metadata"]["name"])
    )


def test_configmap_loader_check_can_fail() -> None:
    with pytest.raises(ConfigError):
        plugin_config.parse_toml(configmap_toml() + 'bogus-key = "x"\n', "mutated ConfigMap")


# ---------------------------------------------------------------------------------------------
# containerd snippets


def test_containerd_17_snippet() -> None:
    doc = tomllib.loads((DEPLOY / "containerd-1.7-nri.toml").read_text())
    assert doc["version"] == 2
    nri = doc["plugins"][NRI_SECTION]
    assert nri["disable"] is False  # 1.7's default is true
    assert nri["disable_connections"] is False
    assert nri["socket_path"] == "/var/run/nri/nri.sock"
    assert nri["plugin_path"] == "/opt/nri/plugins"
    assert nri["plugin_config_path"] == "/etc/nri/conf.d"
    assert re.fullmatch(r"\d+s", nri["plugin_registration_timeout"])
    assert re.fullmatch(r"\d+s", nri["plugin_request_timeout"])


def test_containerd_2x_snippet() -> None:
    text = (DEPLOY / "containerd-2.x-nri.toml").read_text()
    doc = tomllib.loads(text)
    assert doc["version"] == 3
    assert "plugins.'io.containerd.nri.v1.nri'" in text  # the v3 quoting style
    nri = doc["plugins"][NRI_SECTION]
    assert nri["disable"] is False
    assert nri["socket_path"] == "/var/run/nri/nri.sock"
    assert "default_validator" not in nri  # 2.2+ only: shipped commented out


def test_containerd_2x_validator_block_matches_the_plugin() -> None:
    enabled = tomllib.loads(uncomment_validator_block((DEPLOY / "containerd-2.x-nri.toml").read_text()))
    validator = enabled["plugins"][NRI_SECTION]["default_validator"]
    assert validator["enable"] is True
    settings = plugin_config.build(plugin_config.parse_toml(configmap_toml(), "ConfigMap"))
    assert settings.plugin_name in validator["required_plugins"]
    assert validator["tolerate_missing_plugins_annotation"] == TOLERATE_KEY


@pytest.mark.parametrize(
    ("series", "snippet"), [("1.7", "containerd-1.7-nri.toml"), ("2.1", "containerd-2.x-nri.toml")]
)
def test_real_containerd_accepts_snippet(series: str, snippet: str) -> None:
    binary = containerd_binary(series)
    if binary is None:
        pytest.skip(f"no containerd {series} in {E2E_CACHE} (scripts/fetch-e2e-deps downloads it)")
    res = subprocess.run(
        [str(binary), "--config", str(DEPLOY / snippet), "config", "dump"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "level=warning" not in res.stderr and "level=error" not in res.stderr, res.stderr
    dumped = tomllib.loads(res.stdout)["plugins"][NRI_SECTION]
    expected = tomllib.loads((DEPLOY / snippet).read_text())["plugins"][NRI_SECTION]
    for key, value in expected.items():
        assert dumped[key] == value, key


# ---------------------------------------------------------------------------------------------
# docs


def test_operations_doc_documents_every_config_key() -> None:
    text = OPERATIONS.read_text()
    for dotted in plugin_config.to_toml_keys(plugin_config.Settings()):
        key = dotted.rpartition(".")[2]
        assert f"`{key}`" in text, f"docs/operations.md does not document {dotted}"


def test_operations_doc_lists_the_error_messages() -> None:
    text = OPERATIONS.read_text()
    for message in (
        "insufficient privileges to read device list from NVIDIA_VISIBLE_DEVICES envvar",
        "invalid CUDA version",
        "cannot set MIG_CONFIG_DEVICES in non privileged container",
        "cannot set MIG_MONITOR_DEVICES in non privileged container",
        "unsupported capabilities found in",
        "unsatisfied condition",
        "unknown device",
        "plugin registration timed out",
        "both tried to set device",
    ):
        assert message in text, message


def test_image_tag_is_the_package_version_and_the_containerfile_uses_the_same_inputs() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    name, _, tag = plugin_container()["image"].rpartition(":")
    assert (kust["images"][0]["name"], kust["images"][0]["newTag"], tag) == (name, version, version)
    containerfile = (DEPLOY / "image" / "Containerfile").read_text()
    for used in ("deploy/image/requirements.txt", "deploy/image/nvidia-nri-plugin", "LICENSE"):
        assert used in containerfile and (REPO / used).exists(), used
    assert "--require-hashes" in containerfile
    pins = (DEPLOY / "image" / "requirements.txt").read_text()
    for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = re.split(r"[<>=!~\[ ;]", dep, maxsplit=1)[0]
        assert f"{name}==" in pins, f"{name} (a pyproject dependency) is not pinned in deploy/image/"


def _linter_commands_of_scripts_check() -> dict[str, list[str]]:
    """``"$py" -m <tool> <args>`` lines of scripts/check, tool name -> args (pytest left out)."""
    out: dict[str, list[str]] = {}
    for line in (REPO / "scripts" / "check").read_text().splitlines():
        words = line.split()
        if words[:2] == ['"$py"', "-m"] and words[2] != "pytest":
            n = 4 if words[2] == "ruff" else 3  # ruff's subcommand is part of the tool's name
            out[" ".join(words[2:n])] = words[n:]
    return out


def _linter_commands_of_pre_commit() -> dict[str, list[str]]:
    doc = yaml.safe_load((REPO / ".pre-commit-config.yaml").read_text())
    out: dict[str, list[str]] = {}
    for repo in doc["repos"]:
        for hook in repo["hooks"]:
            words = hook["entry"].split()
            assert words[:2] == [".venv/bin/python", "-m"], hook  # the project's own environment
            n = 4 if words[2] == "ruff" else 3
            out[" ".join(words[2:n])] = words[n:]
    return out


def test_pre_commit_runs_the_linters_of_scripts_check_with_the_same_arguments() -> None:
    """scripts/check names the tree (``ruff check .``); pre-commit passes the changed files instead,
    with ``--force-exclude`` so that ruff's extend-exclude still applies to them. Past that, the
    commands must be the same, so a commit that pre-commit accepts also passes scripts/check."""
    check = _linter_commands_of_scripts_check()
    hooks = _linter_commands_of_pre_commit()
    assert set(check) == set(hooks) == {"ruff check", "ruff format", "mypy"}
    for tool, args in check.items():
        if tool.startswith("ruff"):
            assert args[-1] == "." and hooks[tool][-1] == "--force-exclude", (tool, args, hooks[tool])
            args, hooked = args[:-1], hooks[tool][:-1]
        else:
            hooked = hooks[tool]
        assert hooked == args, f"{tool}: pre-commit runs {hooked}, scripts/check runs {args}"

"""The test bed itself: dependency check, generated containerd configuration, cleanup."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from .containerd import Containerd, Layout, base_config, pid_alive, to_toml
from .cri import ContainerRequest
from .deps import FETCH_SCRIPT, E2EDeps, E2EDepsMissing
from .images import BuiltImages


def test_missing_downloads_name_the_fetch_script(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NRI_E2E_CACHE", str(tmp_path / "empty"))
    with pytest.raises(E2EDepsMissing) as info:
        E2EDeps.locate()
    assert str(FETCH_SCRIPT) in str(info.value)
    assert str(tmp_path / "empty" / "runc") in str(info.value)


def test_to_toml_round_trips() -> None:
    doc: dict[str, Any] = {
        "version": 2,
        "root": '/tmp/a "quoted" path',
        "disabled_plugins": ["a", "b.c"],
        "grpc": {"address": "/x.sock"},
        "plugins": {"io.containerd.nri.v1.nri": {"disable": False, "timeout": "2s", "sub": {"n": 1}}},
    }
    assert tomllib.loads(to_toml(doc)) == doc


def _missing_keys(ours: dict[str, Any], defaults: dict[str, Any], path: str = "") -> list[str]:
    missing = []
    for key, value in ours.items():
        here = f"{path}.{key}" if path else key
        if key not in defaults:
            missing.append(here)
        elif isinstance(value, dict) and isinstance(defaults[key], dict):
            missing += _missing_keys(value, defaults[key], here)
    return missing


@pytest.mark.parametrize("version", ["1.7", "2.1"])
def test_generated_config_uses_real_section_and_key_names(e2e_deps: E2EDeps, version: str) -> None:
    """Every key we set exists in that version's own ``config default`` (no silently ignored typo)."""
    binary = e2e_deps.containerd[version].containerd
    cmd = [str(binary), "--config", "/dev/null", "config", "default"]
    default_text = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    defaults = tomllib.loads(default_text)
    ours = base_config(
        version,
        Layout(Path("/tmp/x")),
        e2e_deps.runc,
        sandbox_image="img",
        plugin_path=Path("/tmp/p"),
        plugin_config_path=Path("/tmp/c"),
    )
    assert ours["version"] == defaults["version"]
    assert _missing_keys(ours, defaults) == []


def test_cleanup_after_a_crash_leaves_nothing_behind(make_containerd: Any, e2e_images: BuiltImages) -> None:
    """containerd SIGKILLed with a running container: shutdown() still removes shim, container,
    mounts and cgroups (by PID / private runc root / private cgroup parent)."""
    ctrd: Containerd = make_containerd("1.7")
    pod = ctrd.cri.run_pod("still-running")
    cid = ctrd.cri.create_container(
        pod, ContainerRequest(image=e2e_images.refs["busybox"], command=["sleep", "300"])
    )
    ctrd.cri.start_container(cid)
    shims = ctrd.shim_pids()
    assert shims, "a running container must have a shim"
    cgroup_name = ctrd.cgroup_parent.strip("/")
    assert list(Path("/sys/fs/cgroup").glob(f"*/{cgroup_name}")), "pods must use the private cgroup parent"
    ctrd.kill()
    assert ctrd.shim_pids() == shims, "shims outlive a containerd crash"
    ctrd.shutdown()
    assert ctrd.pid is None
    assert ctrd.shim_pids() == []
    assert not [pid for pid in shims if pid_alive(pid)]
    assert str(ctrd.layout.workdir) not in Path("/proc/self/mountinfo").read_text()
    assert list(Path("/sys/fs/cgroup").glob(f"*/{cgroup_name}")) == []

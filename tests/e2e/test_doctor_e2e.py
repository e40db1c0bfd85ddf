"""``nvidia-nri-plugin doctor`` on a healthy and on a broken node, against real containerd.

Healthy (both versions): NRI enabled, a fake 1-GPU host with NVML, no CDI spec, the plugin running
on the socket -> every check PASS or SKIP, exit 0, and the probe plugin really registered (its
``99-nvidia-nri-doctor`` shows in containerd's log).

Broken (containerd 2.1): NRI disabled in containerd's config and an NVIDIA CDI spec in the CDI
directory -> ``nri.socket`` and ``injector.cdi`` FAIL and the exit code is 8 | 16 = 24; the driver
checks still pass. The text output names each failure with its fix.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import MakeContainerd
from .containerd import Containerd
from .deps import REPO_ROOT
from .gpu_plugin_runner import GpuPluginProcess, build_e2e_host


def doctor(host_root: Path, ctrd: Containerd, cdi_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    r = str(host_root)
    argv = [
        sys.executable, "-m", "nri_plugin", "doctor",
        "--socket", str(ctrd.nri_socket),
        "--containerd-config", str(ctrd.layout.config_file),
        "--cdi-dir", str(cdi_dir),
        "--nri-plugin-dir", str(ctrd.plugin_path),
        "--driver-root", r, "--dev-root", r, "--proc-root", f"{r}/proc", "--sys-root", f"{r}/sys",
        "--run-root", r,
        *extra,
    ]  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), "XDG_CONFIG_HOME": str(cdi_dir.parent)}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env, check=False
    )


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["id"]: c for c in doc["checks"]}


def test_doctor_on_a_healthy_node(containerd: Containerd, e2e_base: Path, tmp_path: Path) -> None:
    containerd.ensure_running()
    host = build_e2e_host(e2e_base, 1)
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    with GpuPluginProcess(host, containerd.nri_socket, tmp_path / "plugin"):
        res = doctor(host.root, containerd, cdi, "--output", "json")
        text = doctor(host.root, containerd, cdi)
    assert res.returncode == 0, res.stdout + res.stderr
    doc = json.loads(res.stdout)
    checks = by_id(doc)
    assert {c["status"] for c in checks.values()} <= {"PASS", "SKIP"}, checks
    assert checks["nri.register"]["status"] == "PASS" and "containerd" in checks["nri.register"]["message"]
    assert "one instance running" in checks["injector.instances"]["message"]
    assert checks["driver.nvml"]["status"] == "PASS"
    assert checks["devchar.links"]["status"] == "SKIP"  # the test containerd uses cgroupfs
    assert doc["config"]["nvidia-container-cli.root"] == {"value": str(host.root), "source": "command line"}
    assert doc["config"]["nri-plugin.plugin-name"] == {"value": "nvidia-gpu", "source": "default"}
    assert doc["exit_code"] == 0
    assert "nvidia-nri-doctor" in containerd.log_text()
    assert text.returncode == 0 and "PASS  nri.register" in text.stdout and "summary: 0 failed" in text.stdout


def test_doctor_on_a_broken_node(make_containerd: MakeContainerd, e2e_base: Path, tmp_path: Path) -> None:
    ctrd = make_containerd("2.1", extra_config={"plugins": {"io.containerd.nri.v1.nri": {"disable": True}}})
    host = build_e2e_host(e2e_base, 1)
    cdi = tmp_path / "cdi"
    cdi.mkdir()
    (cdi / "nvidia.yaml").write_text(
        'cdiVersion: "0.5.0"\nkind: nvidia.com/gpu\ndevices:\n  - name: "0"\n'
        "    containerEdits:\n      deviceNodes:\n        - path: /dev/nvidia0\n"
    )
    res = doctor(host.root, ctrd, cdi, "--output", "json")
    assert res.returncode == 8 | 16, res.stdout + res.stderr
    checks = by_id(json.loads(res.stdout))
    assert checks["nri.socket"]["status"] == "FAIL" and "enable NRI" in checks["nri.socket"]["fix"]
    assert "nri.register" not in checks  # nothing to register with
    assert checks["injector.cdi"]["status"] == "FAIL" and "nvidia.yaml" in checks["injector.cdi"]["message"]
    assert checks["driver.snapshot"]["status"] == "PASS"
    text = doctor(host.root, ctrd, cdi)
    assert text.returncode == 24
    assert "FAIL  injector.cdi" in text.stdout and "fix: remove the specs" in text.stdout
    assert "summary: 2 failed (injector, nri)" in text.stdout

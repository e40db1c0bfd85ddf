"""The real daemon as a runtime-launched plugin, installed with ``nvidia-nri-plugin install``.

containerd starts ``<plugin_path>/10-nvidia-gpu`` itself at start-up, with an environment holding
only ``NRI_PLUGIN_*`` and stdout/stderr on /dev/null, and passes ``<plugin_config_path>/
10-nvidia-gpu.conf`` as the Configure config string. Here that file is the only place that names
the fake driver root, so a GPU container that gets its GPUs proves the whole chain: the installed
script runs without any environment, the config string reaches the daemon and re-points host
discovery, and (on 1.7, NRI v0.6.1) registration completes without a Synchronize.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fakehost import FakeHost

from .containerd import Containerd
from .cri import ContainerRequest
from .gpu_plugin_runner import build_e2e_host, nvidia_devices
from .images import BuiltImages

REPO = Path(__file__).resolve().parents[2]


def _config_toml(host: FakeHost) -> str:
    roots = host.roots
    return (
        "[nvidia-container-cli]\n"
        f'root = "{roots.driver_root}"\n'
        "[nri-plugin]\n"
        f'dev-root = "{roots.dev_root}"\n'
        f'proc-root = "{roots.proc_root}"\n'
        f'sys-root = "{roots.sys_root}"\n'
        f'run-root = "{roots.run_root}"\n'
        'log-format = "json"\n'
        # the generated ld.so.cache is tested in test_ldcache_e2e.py; keep the host's /run clean
        'container-ldcache = "off"\n'
        f'state-dir = "{host.root}/nri-state"\n'
    )


def test_installed_runtime_launched_daemon(
    containerd: Containerd,
    make_containerd: Any,
    e2e_images: BuiltImages,
    e2e_base: Path,
    tmp_path: Path,
) -> None:
    host = build_e2e_host(e2e_base, 2)
    config_file = tmp_path / "plugin.toml"
    config_file.write_text(_config_toml(host))
    log_file = tmp_path / "launched-daemon.log"

    def install(ctrd: Containerd) -> None:
        cmd = [
            sys.executable,
            "-m",
            "nri_plugin",
            "install",
            "--plugin-dir",
            str(ctrd.plugin_path),
            "--config-dir",
            str(ctrd.plugin_config_path),
            "--index",
            "10",
            "--name",
            "nvidia-gpu",
            "--config-file",
            str(config_file),
            f"--run-arg=--log-file={log_file}",
        ]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        script = ctrd.plugin_path / "10-nvidia-gpu"
        assert script.is_file() and script.stat().st_mode & 0o111, script
        # install marks the file as its own (a comment line) and keeps the content.
        installed = (ctrd.plugin_config_path / "10-nvidia-gpu.conf").read_text()
        assert installed.endswith(config_file.read_text()), installed

    ctrd = make_containerd(containerd.version, setup=install)
    try:
        result = ctrd.cri.run_container(
            ContainerRequest(
                image=e2e_images.refs["debian-layout"],
                command=["sh", "-c", "ls -l /dev/ | grep ' nvidia'; /usr/bin/gpu-probe"],
                env={"NVIDIA_VISIBLE_DEVICES": "all"},
                name="gpu",
            )
        )
        log = log_file.read_text()
        assert result.exit_code == 0, f"{result.log}\n--- plugin log ---\n{log}"
        devices = nvidia_devices(result.spec)
        assert {"/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1"} <= set(devices), sorted(devices)
        assert re.search(r"^PROBE_OK driver_version=\d+ ", result.log, re.M), result.log

        records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        msgs = [r["msg"] for r in records]
        assert "registered" in msgs, log
        adjusted = [r for r in records if r["msg"] == "GPU container adjusted"]
        assert adjusted and adjusted[-1]["gpus"] == [g.uuid for g in host.gpus], log
        # The daemon saw containerd's empty environment and still found everything it needs.
        assert not any(r["level"] == "error" for r in records), log
    finally:
        ctrd.shutdown()

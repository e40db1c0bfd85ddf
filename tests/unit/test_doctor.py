"""``nvidia-nri-plugin doctor``: each check over prepared files (the e2e test runs it on real nodes)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from nri_plugin.cli import doctor
from nri_plugin.cli.install import INSTALL_MARKER


def test_nvidia_as_default_runtime_is_another_injector() -> None:
    doc = {"plugins": {"io.containerd.grpc.v1.cri": {"containerd": {"default_runtime_name": "nvidia"}}}}
    c = doctor.check_default_runtime(doc, "")
    assert c.status == "FAIL" and c.cls == "injector" and "default_runtime_name" in c.message
    assert "runc" in c.fix
    ok = {"plugins": {"io.containerd.cri.v1.runtime": {"containerd": {"default_runtime_name": "runc"}}}}
    assert doctor.check_default_runtime(ok, "").status == "PASS"
    assert doctor.check_default_runtime(None, "no file").status == "SKIP"


def test_cdi_specs_of_other_vendors_are_fine(tmp_path: Path) -> None:
    (tmp_path / "vendor.yaml").write_text("kind: example.com/fpga\n")
    assert doctor.check_cdi([str(tmp_path), str(tmp_path / "missing")]).status == "PASS"
    (tmp_path / "nvidia.json").write_text('{"kind": "nvidia.com/gpu"}')
    c = doctor.check_cdi([str(tmp_path)])
    assert c.status == "FAIL" and "nvidia.json" in c.message


def test_only_foreign_nvidia_nri_plugins_count(tmp_path: Path) -> None:
    (tmp_path / "10-nvidia-gpu").write_text(f"#!/bin/sh\n{INSTALL_MARKER}\n")
    (tmp_path / "05-other").write_text("#!/bin/sh\n")
    assert doctor.check_nri_plugin_dir(str(tmp_path)).status == "PASS"
    (tmp_path / "20-nvidia-cdi").write_text("#!/bin/sh\n")
    c = doctor.check_nri_plugin_dir(str(tmp_path))
    assert c.status == "FAIL" and "20-nvidia-cdi" in c.message


def test_two_instances_on_one_socket_fail(tmp_path: Path) -> None:
    sock = str(tmp_path / "nri.sock")
    code = "import time; time.sleep(30)"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, "nri_plugin", "run", "--socket", sock])
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 10
        for p in procs:  # until each child has exec'd (its cmdline is the parent's before that)
            while sock.encode() not in Path(f"/proc/{p.pid}/cmdline").read_bytes():
                assert time.monotonic() < deadline, "the child processes did not start"
                time.sleep(0.01)
        c = doctor.check_instances(sock)
        assert c.status == "FAIL" and all(str(p.pid) in c.message for p in procs)
        assert doctor.check_instances(str(tmp_path / "other.sock")).status == "PASS"
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_dev_char_links_under_the_systemd_cgroup_driver(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    (dev / "char").mkdir(parents=True)
    os.mknod(dev / "nvidia0", 0o666 | stat.S_IFCHR, os.makedev(195, 0))
    os.mknod(dev / "nvidiactl", 0o666 | stat.S_IFCHR, os.makedev(195, 255))
    os.symlink("../nvidia0", dev / "char" / "195:0")
    systemd = {"plugins": {"cri": {"runtimes": {"runc": {"options": {"SystemdCgroup": True}}}}}}
    c = doctor.check_dev_char(systemd, str(tmp_path))
    assert c.status == "FAIL" and c.cls == "devchar" and "195:255" in c.message
    assert "create-dev-char-symlinks" in c.fix
    os.symlink("../nvidiactl", dev / "char" / "195:255")
    assert doctor.check_dev_char(systemd, str(tmp_path)).status == "PASS"
    assert doctor.check_dev_char({}, str(tmp_path)).status == "SKIP"


def test_exit_code_is_the_or_of_failing_classes() -> None:
    checks = [
        doctor.Check("a", "nri", "FAIL", ""),
        doctor.Check("b", "devchar", "FAIL", ""),
        doctor.Check("c", "driver", "WARN", ""),
        doctor.Check("d", "injector", "PASS", ""),
    ]
    assert doctor.exit_code(checks) == 8 | 64
    assert doctor.exit_code(checks[2:]) == 0

"""``scripts/validate-node``: fails fast and clearly without a driver; its comparison logic.

The real run needs a GPU node (see the script); here the no-driver path runs for real and the
``nvidia-smi -q -x`` comparison is fed a recorded-style document.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("validate_node", REPO / "scripts" / "validate_node.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["validate_node"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


vn = _module()

SMI_XML = """<?xml version="1.0" ?>
<nvidia_smi_log>
  <driver_version>550.54.14</driver_version>
  <cuda_version>12.4</cuda_version>
  <attached_gpus>2</attached_gpus>
  <gpu id="00000000:17:00.0">
    <product_name>NVIDIA H200</product_name><product_brand>NVIDIA</product_brand>
    <mig_mode><current_mode>Disabled</current_mode></mig_mode>
    <uuid>GPU-aaaaaaaa-0000-0000-0000-000000000000</uuid><minor_number>0</minor_number>
    <pci><pci_bus_id>00000000:17:00.0</pci_bus_id></pci>
  </gpu>
  <gpu id="00000000:2A:00.0">
    <product_name>Tesla T4</product_name><product_brand>Tesla</product_brand>
    <mig_mode><current_mode>N/A</current_mode></mig_mode>
    <uuid>GPU-bbbbbbbb-0000-0000-0000-000000000000</uuid><minor_number>1</minor_number>
    <pci><pci_bus_id>00000000:2A:00.0</pci_bus_id></pci>
  </gpu>
</nvidia_smi_log>
"""


def _info() -> dict[str, Any]:
    gpu = {"mig_enabled": False, "mig_devices": []}
    return {
        "driver_version": "550.54.14",
        "cuda_version": "12.4",
        "gpus": [
            {**gpu, "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "minor": 0,
             "bus_id": "0000:17:00.0", "brand": "Unknown"},
            {**gpu, "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "minor": 1,
             "bus_id": "00000000:2a:00.0", "brand": "Tesla"},
        ],
    }  # fmt: skip


def test_without_a_driver_it_fails_at_once_and_says_why(tmp_path: Path) -> None:
    t0 = time.monotonic()
    res = subprocess.run(
        [str(REPO / "scripts" / "validate-node"), "--proc-root", str(tmp_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 1, res.stdout + res.stderr
    assert time.monotonic() - t0 < 20
    lines = res.stdout.splitlines()
    assert lines[0].startswith("FAIL  driver.loaded") and "no NVIDIA driver on this node" in lines[0]
    assert "run this on a GPU node" in lines[0]
    assert lines[-1].startswith("summary: 0 passed, 1 failed (driver.loaded)")


def test_matching_facts_pass_including_nvml_vs_smi_spellings() -> None:
    report = vn.Report()
    vn.compare(_info(), vn.parse_smi(SMI_XML), report)
    assert [r for r in report.results if not r.ok] == []
    assert len(report.results) == 3 + 2 * 2


def test_each_difference_is_a_named_failure() -> None:
    info = _info()
    info["cuda_version"] = "12.3"
    info["gpus"][1] = {**info["gpus"][1], "minor": 7, "brand": "GeForce"}
    del info["gpus"][0]
    report = vn.Report()
    vn.compare(info, vn.parse_smi(SMI_XML), report)
    failed = {r.name: r.detail for r in report.results if not r.ok}
    assert set(failed) == {
        "compare.cuda_version",
        "compare.gpu_count",
        "compare.gpu.GPU-aaaaaaaa",
        "compare.gpu.GPU-bbbbbbbb.facts",
    }, failed
    assert "minor 7 != 1" in failed["compare.gpu.GPU-bbbbbbbb.facts"]
    assert "brand GeForce != Tesla" in failed["compare.gpu.GPU-bbbbbbbb.facts"]


def test_the_cuda_probe_must_report_the_driver_cuda_version() -> None:
    smi = vn.parse_smi(SMI_XML)
    good = vn.Report()
    log = "GPU 0: H200 (UUID: GPU-a)\nGPU 1: T4 (UUID: GPU-b)\nPROBE_OK driver_version=12040 path=/x\n"
    vn.check_container(good, smi, log, 0, ["/dev/nvidia0", "/dev/nvidia1", "/dev/nvidiactl"])
    assert all(r.ok for r in good.results), good.results
    bad = vn.Report()
    vn.check_container(bad, smi, "PROBE_FAIL cuInit returned 100\n", 1, ["/dev/nvidiactl"])
    assert {r.name for r in bad.results if not r.ok} == {"e2e.devices", "e2e.nvidia-smi", "e2e.cuda-probe"}

"""Parsers for /proc/devices, mig-minors, information/params/capability files, the version file."""

from __future__ import annotations

from pathlib import Path

import pytest

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.procfs import (
    normalize_bus_id,
    parse_driver_version,
    parse_gpu_information,
    parse_key_values,
    parse_mig_minors,
    parse_proc_devices,
    read_proc_gpus,
    read_text,
)

PROC_DEVICES_550 = """Character devices:
  1 mem
  4 /dev/vc/0
 10 misc
195 nvidia
195 nvidia-modeset
234 nvidia-caps-imex-channels
235 nvidia-caps
510 nvidia-uvm
511 nvidia-nvswitch

Block devices:
  8 sd
238 nvidia-not-a-char-device
"""


def test_proc_devices_post_550() -> None:
    majors = parse_proc_devices(PROC_DEVICES_550)
    assert majors["nvidia"] == 195
    assert majors["nvidia-uvm"] == 510
    assert majors["nvidia-caps"] == 235
    assert majors["nvidia-caps-imex-channels"] == 234
    assert majors["nvidia-nvswitch"] == 511
    assert majors["/dev/vc/0"] == 4
    assert "nvidia-not-a-char-device" not in majors  # block section ignored
    assert "sd" not in majors


def test_proc_devices_pre_550_frontend_name() -> None:
    majors = parse_proc_devices("Character devices:\n195 nvidia-frontend\n237 nvidia-uvm\n")
    assert majors == {"nvidia-frontend": 195, "nvidia-uvm": 237}


def test_proc_devices_garbage_lines_ignored() -> None:
    assert parse_proc_devices("Character devices:\nxyz nvidia\n\n12\n") == {}
    assert parse_proc_devices("") == {}


def test_mig_minors() -> None:
    text = "config 1\nmonitor 2\ngpu0/gi0/access 3\ngpu0/gi0/ci0/access 4\nbroken\ngpu1/gi2/access x\n"
    expect = {"config": 1, "monitor": 2, "gpu0/gi0/access": 3, "gpu0/gi0/ci0/access": 4}
    assert parse_mig_minors(text) == expect


def test_key_values_and_capability_file() -> None:
    kv = parse_key_values("DeviceFileMinor: 1\nDeviceFileMode: 256\nDeviceFileModify: 1\nno colon here\n")
    assert kv == {"DeviceFileMinor": "1", "DeviceFileMode": "256", "DeviceFileModify": "1"}
    params = parse_key_values('ModifyDeviceFiles: 1\nRegistryDwords: "a=1;b=2"\n')
    assert params["ModifyDeviceFiles"] == "1"
    assert params["RegistryDwords"] == '"a=1;b=2"'


INFORMATION = """Model: \t\t NVIDIA A100-SXM4-40GB
IRQ:   \t\t 176
GPU UUID: \t GPU-4c5d4b2a-2a34-5c8e-8d9a-ddc36b2d3f6e
Video BIOS: \t 92.00.36.00.02
Bus Type: \t PCIe
DMA Size: \t 47 bits
DMA Mask: \t 0x7fffffffffff
Bus Location: \t 0000:07:00.0
Device Minor: \t 3
GPU Excluded:\t No
"""


def test_gpu_information() -> None:
    g = parse_gpu_information(INFORMATION, "0000:07:00.0")
    assert g.uuid == "GPU-4c5d4b2a-2a34-5c8e-8d9a-ddc36b2d3f6e"
    assert g.minor == 3
    assert g.model == "NVIDIA A100-SXM4-40GB"
    assert g.bus_id == "00000000:07:00.0"


def test_gpu_information_missing_minor_names_the_file() -> None:
    text = INFORMATION.replace("Device Minor: \t 3\n", "")
    with pytest.raises(HostDiscoveryError, match=r"gpus/0000:07:00.0/information has no 'Device Minor'"):
        parse_gpu_information(text, "0000:07:00.0")
    with pytest.raises(HostDiscoveryError, match=r"'Device Minor' is 'x'"):
        parse_gpu_information(INFORMATION.replace("Minor: \t 3", "Minor: \t x"), "0000:07:00.0")


@pytest.mark.parametrize(
    ("raw", "norm"),
    [
        ("0000:3B:00.0", "00000000:3b:00.0"),
        ("00000000:3b:00.0", "00000000:3b:00.0"),
        ("3b:00.0", "00000000:3b:00.0"),
        ("1:2:3.0", "00000001:02:03.0"),
        ("  0000:07:1f.1 ", "00000000:07:1f.0"),
    ],
)
def test_normalize_bus_id(raw: str, norm: str) -> None:
    assert normalize_bus_id(raw) == norm


@pytest.mark.parametrize("bad", ["", "GPU-123", "0000:3b:00", "0000:3b:00.9", "zz:00.0"])
def test_normalize_bus_id_rejects(bad: str) -> None:
    with pytest.raises(HostDiscoveryError, match="is not of the form"):
        normalize_bus_id(bad)


@pytest.mark.parametrize(
    ("text", "version"),
    [
        (
            "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
            "GCC version:  gcc version 12.2.0\n",
            "550.54.14",
        ),
        (
            "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  "
            "(dvs-builder@U16-I3-B03-4-3)  Fri Aug 16 21:42:42 UTC 2024\n",
            "560.35.03",
        ),
        ("NVRM version: NVIDIA UNIX aarch64 Kernel Module  535.104\n", "535.104"),
        ("GCC version: 12\n", None),
        ("", None),
    ],
)
def test_driver_version(text: str, version: str | None) -> None:
    assert parse_driver_version(text) == version


def test_read_proc_gpus_sorted_by_bus(tmp_path: Path) -> None:
    for bus, minor in (("0000:b1:00.0", 0), ("0000:07:00.0", 5), ("0000:3b:00.0", 1)):
        d = tmp_path / "driver/nvidia/gpus" / bus
        d.mkdir(parents=True)
        (d / "information").write_text(
            INFORMATION.replace("0000:07:00.0", bus).replace("Minor: \t 3", f"Minor: \t {minor}")
        )
    gpus = read_proc_gpus(str(tmp_path))
    assert [(g.bus_id, g.minor) for g in gpus] == [
        ("00000000:07:00.0", 5),
        ("00000000:3b:00.0", 1),
        ("00000000:b1:00.0", 0),
    ]
    assert read_proc_gpus(str(tmp_path / "nothing")) == []


def test_read_text_inside_root(tmp_path: Path) -> None:
    (tmp_path / "devices").write_text("x")
    (tmp_path / "link").symlink_to("/devices")  # re-rooted, so it reads <root>/devices
    assert read_text(str(tmp_path), "link") == "x"
    assert read_text(str(tmp_path), "absent") is None

"""Golden files of whole adjustments (tests/golden/adjust_*.json).

The host root is replaced by ``{root}``. Regenerate with ``UPDATE_GOLDEN=1 pytest ...``, then
review the diff: a golden file is a statement of what containers get.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nri_plugin.adjust.build import build_adjustment
from nri_plugin.adjust.model import Adjustment
from nri_plugin.host.discover import discover
from nri_plugin.host.model import DriverSnapshot
from nri_plugin.request.model import GpuRequest
from tests.fakehost import FakeMig, build_fake_host, make_gpus

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
MIG_UUIDS = ("MIG-4d1c7e52-9a3b-5f80-b6e2-0c8d9f1a2b31", "MIG-4d1c7e52-9a3b-5f80-b6e2-0c8d9f1a2b32")


@dataclass(frozen=True)
class HostSpec:
    gpus: int = 1
    mig_gpu: int | None = None  # index of a GPU partitioned into two MIG devices (gi 3 and gi 5)
    sockets: bool = True
    firmware: bool = True
    compat32: bool = False
    lib_dir: str = "/usr/lib/x86_64-linux-gnu"


def fake_host_snapshot(root: Path, spec: HostSpec) -> DriverSnapshot:
    """A fake host tree (real ELF libs, ld.so.cache, /proc, device nodes, fake NVML), then discovery."""
    gpus = make_gpus(spec.gpus)
    if spec.mig_gpu is not None:
        gpus[spec.mig_gpu].mig = [
            FakeMig(gi=3, ci=0, uuid=MIG_UUIDS[0]),
            FakeMig(gi=5, ci=0, uuid=MIG_UUIDS[1]),
        ]
    host = build_fake_host(
        root,
        gpus=gpus,
        compat32=spec.compat32,
        lib_dir=spec.lib_dir,
        with_sockets=spec.sockets,
        with_firmware=spec.firmware,
    )
    snapshot = discover(host.roots)
    assert snapshot is not None
    return snapshot


def to_json(adj: Adjustment, root: str) -> str:
    def strip(value: str) -> str:
        return value.replace(root, "{root}")

    doc: dict[str, list[Any]] = {
        "devices": [
            {
                "path": d.path,
                "host_path": strip(d.host_path),
                "type": d.type,
                "major": d.major,
                "minor": d.minor,
                "file_mode": f"{d.file_mode:04o}",
                "uid": d.uid,
                "gid": d.gid,
            }
            for d in adj.devices
        ],
        "mounts": [
            {
                "destination": m.destination,
                "source": strip(m.source),
                "type": m.type,
                "options": list(m.options),
            }
            for m in adj.mounts
        ],
        "env": [list(kv) for kv in adj.env],
        "create_container_hooks": [
            {"path": h.path, "args": list(h.args), "env": list(h.env), "timeout": h.timeout}
            for h in adj.create_container_hooks
        ],
    }
    # One JSON object per line: diffs of golden files show whole devices/mounts.
    sections = []
    for key, items in doc.items():
        body = ",\n".join("  " + json.dumps(item) for item in items)
        sections.append(f"{json.dumps(key)}: [\n{body}\n]" if items else f"{json.dumps(key)}: []")
    return "{\n" + ",\n".join(sections) + "\n}\n"


def req(
    devices: str,
    caps: str = "utility,compute",
    config: str = "",
    monitor: str = "",
    imex: tuple[str, ...] = (),
    features: frozenset[str] = frozenset(),
    privileged: bool = False,
) -> GpuRequest:
    return GpuRequest(
        devices,
        config,
        monitor,
        caps,
        (),
        False,
        imex_channels=imex,
        features=features,
        privileged=privileged,
    )


ALL_CAPS = "compute,compat32,graphics,utility,video,display,ngx"
MANAGEMENT = "management.nvidia.com/gpu=all"
CASES: dict[str, tuple[HostSpec, GpuRequest]] = {
    "one_gpu": (HostSpec(), req("0")),
    "eight_gpus": (HostSpec(gpus=8), req("all")),
    "mig_device": (HostSpec(gpus=2, mig_gpu=1), req(MIG_UUIDS[1])),
    "mig_config_all": (HostSpec(gpus=2, mig_gpu=1), req("all", config="all")),
    "mig_monitor_all_no_mig": (HostSpec(gpus=2), req("0", monitor="all")),
    **{f"cap_{cap}": (HostSpec(compat32=True), req("0", cap)) for cap in ALL_CAPS.split(",")},
    "all_caps": (HostSpec(compat32=True), req("0", ALL_CAPS)),
    "none": (HostSpec(), req("")),
    "compat32": (HostSpec(compat32=True), req("0", "utility,compute,compat32")),
    "missing_sockets_firmware": (HostSpec(sockets=False, firmware=False), req("0", "utility,compute,video")),
    "custom_lib_dir": (HostSpec(lib_dir="/opt/nvidia/lib64", compat32=True), req("0", "compute,compat32")),
    # Beyond the seed: CDI names, management, IMEX, the gated features, graphics/display files.
    "cdi_names": (HostSpec(gpus=2), req("nvidia.com/gpu=1,vendor.com/x=y")),
    "management": (HostSpec(gpus=2, mig_gpu=1), req(MANAGEMENT, "utility", privileged=True)),
    "management_unprivileged": (HostSpec(gpus=2, mig_gpu=1), req(MANAGEMENT, "utility")),
    "imex_channel": (HostSpec(), req("0", imex=("1",))),
    "imex_all": (HostSpec(), req("0", imex=("all",), privileged=True)),
    "gds_mofed": (HostSpec(), req("0", features=frozenset({"gds", "mofed"}))),
    "gdrcopy_nvswitch": (HostSpec(), req("0", "compute", features=frozenset({"gdrcopy", "nvswitch"}))),
    "vulkan": (HostSpec(gpus=2), req("1", "graphics")),
}  # fmt: skip


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> dict[HostSpec, tuple[str, DriverSnapshot]]:
    """One fake host per distinct spec, shared by the cases of this module."""
    out: dict[HostSpec, tuple[str, DriverSnapshot]] = {}
    for spec, _ in CASES.values():
        if spec not in out:
            root = tmp_path_factory.mktemp("golden") / "host"
            out[spec] = (str(root), fake_host_snapshot(root, spec))
    return out


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden(case: str, hosts: dict[HostSpec, tuple[str, DriverSnapshot]]) -> None:
    spec, gpu_request = CASES[case]
    root, snapshot = hosts[spec]
    snapshot.cache.clear()  # computed afresh, not taken from an earlier case
    got = to_json(build_adjustment(gpu_request, snapshot), root)
    path = GOLDEN / f"adjust_{case}.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: run with UPDATE_GOLDEN=1 and review it"
    assert json.loads(got) is not None
    assert got == path.read_text()
    assert root not in got

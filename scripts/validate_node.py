"""One-shot validation on a node with a real NVIDIA driver (``scripts/validate-node``).

Prints one ``PASS``/``FAIL`` line per check and a summary; exit 0 only when every check passed.
Unattended, bounded (every step has a timeout; the whole run takes well under 5 minutes):

1. ``driver.loaded``: ``/proc/driver/nvidia/version`` and ``nvidia-smi`` exist. Without them the run
   stops at once (exit 1): nothing else can be compared.
2. ``info``: ``nvidia-nri-plugin info --output json`` (extra arguments after ``--`` are passed to it
   and to the daemon, e.g. ``-- --driver-root /run/nvidia/driver``).
3. ``compare.*``: what the plugin discovered against ``nvidia-smi -q -x``: GPU count, per GPU the
   UUID, minor number, PCI bus id, brand, MIG mode and MIG device count; driver and CUDA versions.
4. ``e2e.*`` (skipped with ``--no-containerd``): the private test containerd 2.1 of the e2e tests
   (``scripts/fetch-e2e-deps``) with the plugin on the real driver; a container with
   ``NVIDIA_VISIBLE_DEVICES=all`` runs the injected ``nvidia-smi -L`` and ``gpu-probe`` (CUDA driver
   API: ``cuInit`` + ``cuDriverGetVersion`` through the injected ``libcuda.so.1``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# libnvidia-container's brand names (nri_plugin/host/nvml.py BRANDS); others are "Unknown" there.
KNOWN_BRANDS = {"quadro", "tesla", "nvs", "grid", "geforce", "titan"}


@dataclass(frozen=True)
class Result:
    name: str
    ok: bool
    detail: str


class Report:
    def __init__(self) -> None:
        self.results: list[Result] = []

    def add(self, name: str, ok: bool, detail: str) -> bool:
        self.results.append(Result(name, ok, detail))
        print(f"{'PASS' if ok else 'FAIL'}  {name:<28} {detail}", flush=True)
        return ok

    def summary(self, t0: float) -> int:
        failed = [r.name for r in self.results if not r.ok]
        print(
            f"summary: {len(self.results) - len(failed)} passed, {len(failed)} failed"
            + (f" ({', '.join(failed)})" if failed else "")
            + f" in {time.monotonic() - t0:.1f}s"
        )
        return 1 if failed else 0


# --- nvidia-smi -q -x --------------------------------------------------------------------------------


def _text(node: ET.Element | None, path: str) -> str:
    found = None if node is None else node.find(path)
    return (found.text or "").strip() if found is not None else ""


def parse_smi(xml_text: str) -> dict[str, Any]:
    """The facts ``nvidia-smi -q -x`` reports that the plugin discovers too."""
    root = ET.fromstring(xml_text)
    gpus = []
    for g in root.findall("gpu"):
        mig = g.find("mig_devices")
        gpus.append(
            {
                "uuid": _text(g, "uuid"),
                "minor": int(_text(g, "minor_number")) if _text(g, "minor_number").isdigit() else None,
                "bus_id": _text(g, "pci/pci_bus_id"),
                "brand": _text(g, "product_brand"),
                "name": _text(g, "product_name"),
                "mig_enabled": _text(g, "mig_mode/current_mode") == "Enabled",
                "mig_devices": len(mig.findall("mig_device")) if mig is not None else 0,
            }
        )
    return {
        "driver_version": _text(root, "driver_version"),
        "cuda_version": _text(root, "cuda_version"),
        "gpus": gpus,
    }


def _bus(value: str) -> str:
    """PCI bus ids as NVML (8-digit domain) and nvidia-smi write them, compared lower-case."""
    value = value.lower()
    domain, _, rest = value.partition(":")
    return f"{int(domain, 16):08x}:{rest}" if rest and re.fullmatch(r"[0-9a-f]+", domain) else value


def brand_matches(ours: str | None, smi: str) -> bool:
    if (ours or "").lower() == smi.lower():
        return True
    # libnvidia-container names brands outside its table "Unknown" (H100/H200 report "NVIDIA").
    return (ours or "Unknown") == "Unknown" and smi.lower() not in KNOWN_BRANDS


def compare(info: dict[str, Any], smi: dict[str, Any], report: Report) -> None:
    """One result per fact; GPUs are matched by UUID."""
    report.add("compare.driver_version", info["driver_version"] == smi["driver_version"],
               f"plugin {info['driver_version']}, nvidia-smi {smi['driver_version']}")  # fmt: skip
    report.add("compare.cuda_version", (info.get("cuda_version") or "") == smi["cuda_version"],
               f"plugin {info.get('cuda_version')}, nvidia-smi {smi['cuda_version']}")  # fmt: skip
    ours = {g["uuid"]: g for g in info["gpus"]}
    report.add("compare.gpu_count", len(ours) == len(smi["gpus"]),
               f"plugin {len(ours)}, nvidia-smi {len(smi['gpus'])}")  # fmt: skip
    for s in smi["gpus"]:
        g = ours.get(s["uuid"])
        if not report.add(f"compare.gpu.{s['uuid'][:12]}", g is not None, f"{s['name']} {s['uuid']}"):
            continue
        assert g is not None
        diffs = []
        if g["minor"] != s["minor"]:
            diffs.append(f"minor {g['minor']} != {s['minor']}")
        if _bus(str(g["bus_id"])) != _bus(s["bus_id"]):
            diffs.append(f"bus id {g['bus_id']} != {s['bus_id']}")
        if not brand_matches(g.get("brand"), s["brand"]):
            diffs.append(f"brand {g.get('brand')} != {s['brand']}")
        if bool(g["mig_enabled"]) != s["mig_enabled"] or len(g["mig_devices"]) != s["mig_devices"]:
            diffs.append(
                f"MIG {g['mig_enabled']}/{len(g['mig_devices'])} != {s['mig_enabled']}/{s['mig_devices']}"
            )
        report.add(f"compare.gpu.{s['uuid'][:12]}.facts", not diffs,
                   "; ".join(diffs) or f"minor {s['minor']}, {s['bus_id']}, brand {s['brand']}, "
                   f"MIG {'on' if s['mig_enabled'] else 'off'} ({s['mig_devices']} devices)")  # fmt: skip


# --- the private containerd with the plugin ----------------------------------------------------------


@contextmanager
def plugin_daemon(socket: Path, work: Path, extra: Sequence[str]) -> Iterator[Path]:
    log = work / "plugin.log"
    argv = [sys.executable, "-m", "nri_plugin", "run", "--socket", str(socket), "--log-file", str(log),
            "--log-format", "json", "--state-dir", str(work / "state"), *extra]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(work / "plugin.stderr", "wb"))  # fmt: skip  # noqa: SIM115
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_registered(log: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if any(
            json.loads(line).get("msg") == "registered" for line in text.splitlines() if line.startswith("{")
        ):
            return True
        time.sleep(0.1)
    return False


def run_e2e(report: Report, smi: dict[str, Any], extra: Sequence[str]) -> None:
    from tests.e2e.containerd import Containerd
    from tests.e2e.cri import ContainerRequest, load_cri
    from tests.e2e.deps import E2EDeps, E2EDepsMissing
    from tests.e2e.gpu_plugin_runner import nvidia_devices, run_in_pod
    from tests.e2e.images import build_images

    try:
        deps = E2EDeps.locate()
    except E2EDepsMissing as e:
        report.add("e2e.deps", False, f"{e} (run scripts/fetch-e2e-deps)")
        return
    work = Path(tempfile.mkdtemp(prefix="nri-validate-", dir="/tmp"))
    images = build_images(deps, work / "images")
    ctrd = Containerd("2.1", work / "ctrd", deps, load_cri(deps.cri_proto, deps.cache / "cri_gen"),
                      sandbox_image=images.refs["pause"])  # fmt: skip
    try:
        ctrd.start()
        for archive in images.archives.values():
            ctrd.import_image(archive)
        report.add("e2e.containerd", True, f"containerd {ctrd.package_version} with NRI on {ctrd.nri_socket}")
        with plugin_daemon(ctrd.nri_socket, work, extra) as log:
            if not report.add("e2e.registered", wait_registered(log, 60), f"plugin log {log}"):
                return
            pod = ctrd.cri.run_pod("validate-node")
            req = ContainerRequest(
                image=images.refs["debian-layout"],
                command=["/bin/sh", "-c", "nvidia-smi -L; /usr/bin/gpu-probe"],
                env={"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"},
                name="validate",
            )
            result = run_in_pod(ctrd.cri, pod, req, timeout=120)
            check_container(report, smi, result.log, result.exit_code, sorted(nvidia_devices(result.spec)))
    finally:
        ctrd.shutdown()
        ctrd.cleanup_leftovers()


def check_container(report: Report, smi: dict[str, Any], log: str, code: int, devices: list[str]) -> None:
    gpu_nodes = [d for d in devices if re.fullmatch(r"/dev/nvidia\d+", d)]
    report.add("e2e.devices", len(gpu_nodes) == len(smi["gpus"]), ", ".join(devices))
    listed = [line for line in log.splitlines() if line.startswith("GPU ")]
    report.add(
        "e2e.nvidia-smi", len(listed) == len(smi["gpus"]), f"{len(listed)} GPU line(s) from nvidia-smi -L"
    )
    match = re.search(r"^PROBE_OK driver_version=(\d+) path=(\S+)$", log, re.M)
    major, _, minor = smi["cuda_version"].partition(".")
    want = int(major) * 1000 + int(minor or 0) * 10 if major.isdigit() else None
    ok = code == 0 and match is not None and int(match.group(1)) == want
    report.add("e2e.cuda-probe", ok, match.group(0) if match else f"exit {code}: {log[-300:]!r}")


# --- main -----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/validate-node", description=__doc__.split("\n\n")[0])
    p.add_argument("--no-containerd", action="store_true", help="skip the containerd part")
    p.add_argument("--proc-root", default="/proc", help="where /proc/driver/nvidia is read (tests)")
    p.add_argument("extra", nargs="*", help="after --: flags for `info` and the daemon (e.g. --driver-root)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    report = Report()
    version_file = Path(args.proc_root) / "driver" / "nvidia" / "version"
    smi_bin = shutil.which("nvidia-smi")
    if not version_file.exists() or smi_bin is None:
        state = "present" if version_file.exists() else "missing"
        report.add(
            "driver.loaded",
            False,
            f"no NVIDIA driver on this node ({version_file}: {state}, nvidia-smi: "
            f"{smi_bin or 'not on PATH'}); run this on a GPU node with the driver loaded",
        )
        return report.summary(t0)
    report.add("driver.loaded", True, version_file.read_text().splitlines()[0][:100])
    smi_run = subprocess.run([smi_bin, "-q", "-x"], capture_output=True, text=True, timeout=120, check=False)
    if not report.add(
        "nvidia-smi", smi_run.returncode == 0, f"exit {smi_run.returncode} {smi_run.stderr[:200]}"
    ):
        return report.summary(t0)
    smi = parse_smi(smi_run.stdout)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    info_run = subprocess.run([sys.executable, "-m", "nri_plugin", "info", "--output", "json", *args.extra],
                              capture_output=True, text=True, timeout=120, check=False, env=env)  # fmt: skip
    if not report.add(
        "info", info_run.returncode == 0, f"exit {info_run.returncode} {info_run.stderr[:300]}"
    ):
        return report.summary(t0)
    compare(json.loads(info_run.stdout), smi, report)
    if not args.no_containerd:
        run_e2e(report, smi, args.extra)
    return report.summary(t0)


if __name__ == "__main__":
    sys.exit(main())

"""NVML device facts, queried in a short-lived child process.

``python -m nri_plugin.host.nvml --lib <path to libnvidia-ml.so.1>`` loads exactly that library (not
whatever the dynamic loader would find), runs the queries through ``nvidia-ml-py`` and prints one JSON
object on stdout. The daemon calls :func:`query_nvml`, which runs the child with a timeout: a driver
that crashes or hangs in ``nvmlInit`` cannot take the daemon down (libnvidia-container isolates NVML
in an RPC helper for the same reason). Never called on the CreateContainer hot path.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.model import Gpu, MigDevice
from nri_plugin.host.procfs import normalize_bus_id

DEFAULT_TIMEOUT = 20.0

# NVML brand enum (nvmlBrandType_t) -> the name a `brand=` requirement compares with (ignoring
# case). 1-6 as libnvidia-container names them. 7-16 came with newer drivers (vGPU editions, RTX,
# the data-centre "NVIDIA" brand); the libnvidia-container versions read map them to "Unknown",
# which made the CUDA images' own requirements (`brand=nvidia,driver>=...`, `brand=vcs,...`) wrong
# on those nodes. Named here as the CUDA images' NVIDIA_REQUIRE_CUDA spells them (a deviation from
# the hook, documented in the README). 0 and anything unknown stay "Unknown".
BRANDS: dict[int, str] = {
    1: "Quadro",
    2: "Tesla",
    3: "NVS",
    4: "GRID",
    5: "GeForce",
    6: "TITAN",
    7: "VApps",
    8: "VPC",
    9: "VCS",
    10: "VWS",
    11: "CloudGaming",
    12: "QuadroRTX",
    13: "NvidiaRTX",
    14: "Nvidia",
    15: "GeForceRTX",
    16: "TitanRTX",
}


def brand_name(value: int) -> str:
    return BRANDS.get(value, "Unknown")


def cuda_version_string(value: int) -> str:
    """NVML/CUDA integer version (e.g. 12040) -> ``"12.4"``: NVML's own macros
    (``NVML_CUDA_DRIVER_VERSION_MAJOR``/``_MINOR``: ``v / 1000`` and ``(v % 1000) / 10``).
    libnvidia-container computes the minor as ``(v % 100) / 10``, which agrees for every CUDA
    version released so far (minor < 10) and would turn a future 12.10 (12100) into "12.0"."""
    return f"{value // 1000}.{(value % 1000) // 10}"


@dataclass(frozen=True, slots=True)
class NvmlInfo:
    driver_version: str
    cuda_version: str | None
    gpus: tuple[Gpu, ...]


# ---------------------------------------------------------------------------------------------- child


def _collect(pynvml: Any) -> dict[str, Any]:
    """Run the queries (inside the child). Required facts raise; optional ones degrade to None."""
    err = pynvml.NVMLError

    def optional(fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except err:
            return None

    driver_version = pynvml.nvmlSystemGetDriverVersion()
    cuda_raw = optional(pynvml.nvmlSystemGetCudaDriverVersion)
    gpus: list[dict[str, Any]] = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pci = pynvml.nvmlDeviceGetPciInfo(handle)
        bus_raw = pci.busId.decode() if isinstance(pci.busId, bytes) else str(pci.busId)
        if not bus_raw:
            bus_raw = f"{pci.domain:x}:{pci.bus:02x}:{pci.device:02x}.0"
        cc = optional(pynvml.nvmlDeviceGetCudaComputeCapability, handle)
        brand = optional(pynvml.nvmlDeviceGetBrand, handle)
        mig_mode = optional(pynvml.nvmlDeviceGetMigMode, handle)
        enable = pynvml.NVML_DEVICE_MIG_ENABLE
        mig_enabled = mig_mode is not None and mig_mode[0] == enable and mig_mode[1] == enable
        migs: list[dict[str, Any]] = []
        if mig_enabled:
            for mig_index in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, mig_index)
                except err as exc:
                    if exc.value == pynvml.NVML_ERROR_NOT_FOUND:
                        continue
                    raise
                migs.append(
                    {
                        "index": mig_index,
                        "uuid": pynvml.nvmlDeviceGetUUID(mig),
                        "gi": pynvml.nvmlDeviceGetGpuInstanceId(mig),
                        "ci": pynvml.nvmlDeviceGetComputeInstanceId(mig),
                    }
                )
        gpus.append(
            {
                "index": index,
                "uuid": pynvml.nvmlDeviceGetUUID(handle),
                "minor": pynvml.nvmlDeviceGetMinorNumber(handle),
                "bus_id": bus_raw,
                "model": optional(pynvml.nvmlDeviceGetName, handle) or "",
                "brand": None if brand is None else brand_name(brand),
                "compute_capability": None if cc is None else f"{cc[0]}.{cc[1]}",
                "mig_enabled": mig_enabled,
                "mig_devices": migs,
            }
        )
    return {
        "driver_version": driver_version,
        "cuda_version": None if cuda_raw is None else cuda_version_string(cuda_raw),
        "gpus": gpus,
    }


def _child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nri_plugin.host.nvml")
    parser.add_argument("--lib", required=True, help="absolute path of libnvidia-ml.so.1 to load")
    args = parser.parse_args(argv)
    import pynvml

    try:
        pynvml.nvmlLib = ctypes.CDLL(args.lib)
    except OSError as exc:
        print(f"cannot load {args.lib}: {exc}", file=sys.stderr)
        return 3
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        print(f"nvmlInit failed with {args.lib}: {exc}", file=sys.stderr)
        return 4
    try:
        result = _collect(pynvml)
    except pynvml.NVMLError as exc:
        print(f"NVML query failed with {args.lib}: {exc}", file=sys.stderr)
        return 5
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


# --------------------------------------------------------------------------------------------- parent


def _gpu_from_json(item: dict[str, Any]) -> Gpu:
    index = int(item["index"])
    minor = int(item["minor"])
    migs = tuple(
        MigDevice(
            index=int(m["index"]),
            uuid=str(m["uuid"]),
            gpu_instance_id=int(m["gi"]),
            compute_instance_id=int(m["ci"]),
            parent_index=index,
            parent_minor=minor,
        )
        for m in item.get("mig_devices", ())
    )
    return Gpu(
        index=index,
        uuid=str(item["uuid"]),
        minor=minor,
        bus_id=normalize_bus_id(str(item["bus_id"])),
        model=str(item.get("model") or ""),
        brand=item.get("brand"),
        compute_capability=item.get("compute_capability"),
        mig_enabled=bool(item.get("mig_enabled", False)),
        mig_devices=migs,
    )


def parse_nvml_json(text: str) -> NvmlInfo:
    """Turn the child's JSON output into values; HostDiscoveryError if it is malformed."""
    try:
        data = json.loads(text)
        return NvmlInfo(
            driver_version=str(data["driver_version"]),
            cuda_version=data.get("cuda_version"),
            gpus=tuple(_gpu_from_json(g) for g in data["gpus"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise HostDiscoveryError(f"the NVML helper printed unusable output ({exc}): {text[:200]!r}") from exc


# The child runs isolated: ``-I`` (no PYTHONPATH, no user site, neither the current directory nor
# a script directory on sys.path), cwd "/", a fixed environment. Only the directory this package
# was loaded from is added, so the child runs the daemon's own code and nothing a local user left
# in the daemon's working directory (a ``pynvml.py`` there once ran as root).
_CHILD_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from nri_plugin.host.nvml import _child_main; raise SystemExit(_child_main(sys.argv[2:]))"
)
CHILD_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def query_nvml(lib_path: str, *, timeout: float = DEFAULT_TIMEOUT, python: str = sys.executable) -> NvmlInfo:
    """Run the NVML helper for ``lib_path`` in a child process and return what it found."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [python, "-I", "-c", _CHILD_BOOT, package_parent, "--lib", lib_path]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=dict(CHILD_ENV), cwd="/", check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise HostDiscoveryError(
            f"the NVML query of {lib_path!r} did not finish within {timeout:g}s; the driver may be hung or "
            "not in persistence mode (enable nvidia-persistenced), or raise [nri-plugin] nvml-timeout"
        ) from exc
    except OSError as exc:
        raise HostDiscoveryError(f"cannot start the NVML helper {python!r}: {exc.strerror}") from exc
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()
        last = detail[-1] if detail else f"exit status {proc.returncode}"
        raise HostDiscoveryError(
            f"the NVML query of {lib_path!r} failed: {last}; check that the NVIDIA kernel module is loaded "
            "and matches the user-space driver"
        )
    return parse_nvml_json(proc.stdout)


if __name__ == "__main__":
    raise SystemExit(_child_main())

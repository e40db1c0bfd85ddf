"""The NVML child process, run against the fake libnvidia-ml through the real nvidia-ml-py code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.nvml import brand_name, cuda_version_string, parse_nvml_json, query_nvml
from tests.fakehost import (
    BRAND_GEFORCE,
    BRAND_QUADRO,
    FakeGpu,
    FakeHost,
    FakeMig,
    build_fake_host,
    make_gpus,
)


def _nvml_lib(host: FakeHost) -> str:
    return str(host.path(f"{host.lib_dir}/libnvidia-ml.so.1"))


def _small_host(root: Path, gpus: list[FakeGpu], **kw: object) -> FakeHost:
    return build_fake_host(
        root,
        gpus=gpus,
        capabilities_libs=("utility",),
        device_nodes=False,
        with_binaries=False,
        with_sockets=False,
        with_firmware=False,
        **kw,  # type: ignore[arg-type]
    )


def test_one_gpu(tmp_path: Path) -> None:
    gpu = FakeGpu(
        minor=0,
        uuid="GPU-a1b2c3d4-0000-1111-2222-333344445555",
        bus_id="0000:3B:00.0",
        name="NVIDIA H100 80GB HBM3",
        cc=(9, 0),
    )
    host = _small_host(tmp_path / "r", [gpu], driver_version="550.54.14", cuda_version=12040)
    info = query_nvml(_nvml_lib(host))
    assert info.driver_version == "550.54.14"
    assert info.cuda_version == "12.4"
    (g,) = info.gpus
    assert (g.index, g.uuid, g.minor, g.bus_id) == (0, gpu.uuid, 0, "00000000:3b:00.0")
    assert (g.model, g.brand, g.compute_capability) == ("NVIDIA H100 80GB HBM3", "Tesla", "9.0")
    assert not g.mig_enabled
    assert g.mig_devices == ()


def test_eight_gpus_in_nvml_order(tmp_path: Path) -> None:
    gpus = make_gpus(8)
    gpus[3].brand = BRAND_GEFORCE
    gpus[4].brand = BRAND_QUADRO
    gpus[5].brand = 13  # NVIDIA RTX: "Unknown" in libnvidia-container's table, named here
    gpus[6].cc = (7, 5)
    host = _small_host(tmp_path / "r", gpus, driver_version="535.104.05", cuda_version=12020)
    info = query_nvml(_nvml_lib(host))
    assert info.cuda_version == "12.2"
    assert [g.uuid for g in info.gpus] == [g.uuid for g in gpus]
    assert [g.index for g in info.gpus] == list(range(8))
    assert [g.minor for g in info.gpus] == [g.minor for g in gpus]
    assert [g.bus_id for g in info.gpus] == [g.nvml_bus_id() for g in gpus]
    assert [g.brand for g in info.gpus][3:6] == ["GeForce", "Quadro", "NvidiaRTX"]
    assert info.gpus[6].compute_capability == "7.5"
    assert not info.gpus[6].mig_enabled  # pre-Ampere: GetMigMode is NOT_SUPPORTED


def test_mig_devices(tmp_path: Path) -> None:
    migs = [
        FakeMig(gi=1, ci=0, uuid="MIG-11111111-2222-3333-4444-555555555555"),
        FakeMig(gi=2, ci=0, uuid="MIG-66666666-7777-8888-9999-000000000000", index=3),  # gap at 1..2
    ]
    gpus = [
        FakeGpu(minor=2, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000002", bus_id="0000:07:00.0", mig=migs),
        FakeGpu(
            minor=0, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000000", bus_id="0000:0f:00.0", mig_mode=(1, 0)
        ),  # enabled but a disable is pending: not MIG-enabled
        FakeGpu(
            minor=1, uuid="GPU-aaaaaaaa-0000-0000-0000-000000000001", bus_id="0000:47:00.0", mig_mode=(0, 1)
        ),
    ]
    host = _small_host(tmp_path / "r", gpus)
    info = query_nvml(_nvml_lib(host))
    g0, g1, g2 = info.gpus
    assert g0.mig_enabled and not g1.mig_enabled and not g2.mig_enabled
    assert [(m.index, m.uuid, m.gpu_instance_id, m.compute_instance_id) for m in g0.mig_devices] == [
        (0, migs[0].uuid, 1, 0),
        (3, migs[1].uuid, 2, 0),
    ]
    assert {(m.parent_index, m.parent_minor) for m in g0.mig_devices} == {(0, 2)}
    assert g1.mig_devices == () and g2.mig_devices == ()


def test_init_failure_is_reported(tmp_path: Path) -> None:
    host = _small_host(tmp_path / "r", make_gpus(1))
    host.write_nvml_config(["init_error 9"])
    with pytest.raises(HostDiscoveryError, match=r"nvmlInit failed .*Driver Not Loaded.*kernel module"):
        query_nvml(_nvml_lib(host))


def test_hang_times_out(tmp_path: Path) -> None:
    host = _small_host(tmp_path / "r", make_gpus(1))
    host.write_nvml_config(["init_sleep 30"])
    with pytest.raises(HostDiscoveryError, match=r"did not finish within 1s"):
        query_nvml(_nvml_lib(host), timeout=1.0)


def test_library_that_is_not_nvml(tmp_path: Path) -> None:
    host = build_fake_host(
        tmp_path / "r", gpus=make_gpus(1), capabilities_libs=("compute",), device_nodes=False
    )
    with pytest.raises(HostDiscoveryError, match="failed"):
        query_nvml(str(host.path(f"{host.lib_dir}/libcuda.so.1")))
    with pytest.raises(HostDiscoveryError, match="cannot load"):
        query_nvml(str(tmp_path / "no-such-lib.so"))


def test_helper_cannot_start(tmp_path: Path) -> None:
    with pytest.raises(HostDiscoveryError, match="cannot start the NVML helper"):
        query_nvml("/x", python=str(tmp_path / "no-python"))


def test_parse_json_errors() -> None:
    with pytest.raises(HostDiscoveryError, match="unusable output"):
        parse_nvml_json("not json")
    with pytest.raises(HostDiscoveryError, match="unusable output"):
        parse_nvml_json(json.dumps({"gpus": []}))


def test_brand_and_cuda_helpers() -> None:
    # 0-6 as libnvidia-container names them; 7-16 (newer NVML) as the CUDA images' requirements
    # spell them (brand=vapps, ..., brand=titanrtx); beyond: Unknown.
    assert [brand_name(i) for i in range(18)] == [
        "Unknown",
        "Quadro",
        "Tesla",
        "NVS",
        "GRID",
        "GeForce",
        "TITAN",
        "VApps",
        "VPC",
        "VCS",
        "VWS",
        "CloudGaming",
        "QuadroRTX",
        "NvidiaRTX",
        "Nvidia",
        "GeForceRTX",
        "TitanRTX",
        "Unknown",
    ]
    assert cuda_version_string(12040) == "12.4"
    assert cuda_version_string(13000) == "13.0"
    assert cuda_version_string(12100) == "12.10"  # NVML's macros (LNC's v%100/10 would say 12.0)
    assert cuda_version_string(11080) == "11.8"
    assert cuda_version_string(12090) == "12.9"

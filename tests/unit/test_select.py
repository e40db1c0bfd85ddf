"""Device selection: every id form of libnvidia-container, strictness, MIG parents."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nri_plugin.adjust.select import EMPTY_SELECTION, Selection, select_devices
from nri_plugin.errors import DeviceSelectionError
from nri_plugin.host.model import DriverSnapshot, Gpu, HostRoots, MigDevice

UUID0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
UUID1 = "GPU-ffeeddcc-9999-8888-7777-666655554444"
UUID2 = "GPU-12345678-abcd-ef01-2345-6789abcdef01"
MIG_A = "MIG-aaaaaaaa-1111-2222-3333-444444444444"
MIG_B = "MIG-GPU-12345678-abcd-ef01-2345-6789abcdef01/2/0"


def _snapshot() -> DriverSnapshot:
    gpu0 = Gpu(index=0, uuid=UUID0, minor=0, bus_id="00000000:06:00.0")
    gpu1 = Gpu(index=1, uuid=UUID1, minor=3, bus_id="00000000:0a:1f.0")
    mig_a = MigDevice(
        index=0, uuid=MIG_A, gpu_instance_id=1, compute_instance_id=0, parent_index=2, parent_minor=1
    )
    mig_b = MigDevice(
        index=1, uuid=MIG_B, gpu_instance_id=2, compute_instance_id=0, parent_index=2, parent_minor=1
    )
    gpu2 = Gpu(
        index=2, uuid=UUID2, minor=1, bus_id="0000abcd:81:00.0", mig_enabled=True, mig_devices=(mig_a, mig_b)
    )
    return DriverSnapshot(
        roots=HostRoots(),
        driver_version="550.54.14",
        cuda_version="12.4",
        gpus=(gpu0, gpu1, gpu2),
        source="nvml",
    )


SNAP = _snapshot()
G0, G1, G2 = SNAP.gpus
MA, MB = G2.mig_devices


def sel(*ids: str) -> Selection:
    return select_devices(ids, SNAP)


@pytest.mark.parametrize(
    ("device_id", "gpu"),
    [
        ("0", G0),
        ("1", G1),
        ("2", G2),
        ("00", G0),  # leading zeros, as strtoumax
        (UUID1, G1),
        (UUID1.lower(), G1),
        (UUID1.upper().replace("GPU-", "gpu-"), G1),
        ("0:6:0.0", G0),
        ("0000:06:00.0", G0),
        ("00000000:06:00.0", G0),
        ("0:a:1f.0", G1),
        ("0:0A:1F.0", G1),
        ("abcd:81:0.0", G2),
        ("0000ABCD:81:00.0", G2),
    ],
)
def test_gpu_forms(device_id: str, gpu: Gpu) -> None:
    assert sel(device_id) == Selection((gpu,), ())


@pytest.mark.parametrize(
    ("device_id", "mig"),
    [
        (MIG_A, MA),
        (MIG_A.upper(), MA),
        (MIG_A.lower(), MA),
        (MIG_B, MB),
        (MIG_B.lower(), MB),
        ("2:0", MA),
        ("2:1", MB),
        ("02:01", MB),
    ],
)
def test_mig_forms_bring_parent(device_id: str, mig: MigDevice) -> None:
    assert sel(device_id) == Selection((G2,), (mig,))


@pytest.mark.parametrize("word", ["all", "ALL", "All", "aLl"])
def test_all_includes_mig_enabled_gpu_and_every_mig_device(word: str) -> None:
    assert sel(word) == Selection((G0, G1, G2), (MA, MB))


def test_all_stops_parsing_like_lnc() -> None:
    assert sel("all", "not-a-device") == Selection((G0, G1, G2), (MA, MB))
    with pytest.raises(DeviceSelectionError, match=r"^bogus: unknown device"):
        sel("bogus", "all")


def test_order_is_snapshot_order_and_deduplicated() -> None:
    expected = Selection((G0, G1, G2), (MA, MB))
    assert sel("2:1", "1", MIG_A, "0", UUID0, "0:6:0.0", "2:1") == expected
    assert sel("1", "0") == sel("0", "1") == Selection((G0, G1), ())
    assert sel("2", "2:0") == Selection((G2,), (MA,))


def test_empty_elements_are_skipped() -> None:
    assert sel("", "1", "") == Selection((G1,), ())
    assert sel() == EMPTY_SELECTION
    assert sel("") == EMPTY_SELECTION


@pytest.mark.parametrize(
    "device_id",
    [
        "GPU-",  # prefix only
        "GPU-0a1b2c3d",  # short UUID: no prefix matching
        UUID0[:-1],
        UUID0 + "5",
        "MIG-",
        MIG_A[:-2],
        "MIG-GPU-12345678-abcd-ef01-2345-6789abcdef01/2",
        "0x1",
        "-1",
        "+1",
        "1 ",
        " 1",
        "1.0",
        "../0",
        "/dev/nvidia0",
        "3",  # == count
        "99999999999999999999999999999",
        "9" * 5000,  # would exceed Python's int-parsing limit
        "٣",  # non-ASCII digit
        "0:6:0.1",  # function 1 is not a GPU
        "0:6:0",  # function missing
        "6:0.0",  # domain missing
        "123456789:06:00.0",  # 9-digit domain
        "0:006:00.0",
        "0:6:000.0",
        "0:g6:00.0",
        "0:6:00.8",
        " 0:6:00.0",
        "2:2",  # no such MIG index
        "0:0",  # GPU without MIG devices
        "3:0",
        "2:-1",
        "2: 0",
        "2:0:0",
        "none",
        "void",
        "all,0",
    ],
)
def test_malformed_or_unknown(device_id: str) -> None:
    with pytest.raises(DeviceSelectionError, match="unknown device") as exc:
        sel(device_id)
    message = str(exc.value)
    assert "valid device ids are" in message
    assert "nvidia.com/gpu=<id>" in message  # CDI names are named among the forms


def test_message_names_the_id_and_quotes_odd_ones() -> None:
    with pytest.raises(DeviceSelectionError, match=r"^GPU-0a1b2c3d: unknown device; valid"):
        sel("GPU-0a1b2c3d")
    with pytest.raises(DeviceSelectionError, match=r"^'1 ': unknown device"):
        sel("1 ")
    with pytest.raises(DeviceSelectionError) as exc:
        sel("x\n" * 400)
    assert len(str(exc.value)) < 600
    assert "\n" not in str(exc.value)


def test_first_bad_id_is_reported() -> None:
    with pytest.raises(DeviceSelectionError, match=r"^7: unknown device"):
        sel("0", "7", "8")


def test_no_gpus_on_host() -> None:
    empty = DriverSnapshot(roots=HostRoots(), driver_version="1", cuda_version=None, gpus=(), source="proc")
    assert select_devices(("all",), empty) == EMPTY_SELECTION
    with pytest.raises(DeviceSelectionError, match=r"^0: unknown device"):
        select_devices(("0",), empty)


@given(st.text(max_size=40))
def test_any_text_selects_known_devices_or_fails_cleanly(device_id: str) -> None:
    try:
        result = select_devices((device_id,), SNAP)
    except DeviceSelectionError as exc:
        assert "unknown device" in str(exc)
        return
    assert set(result.gpus) <= set(SNAP.gpus)
    assert set(result.mig_devices) <= {MA, MB}
    if result.mig_devices:
        assert G2 in result.gpus

"""The committed generated modules match the .proto files, import cleanly and carry the wire facts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from nri_plugin.wire._gen import api_pb2 as api
from nri_plugin.wire._gen import ttrpc_pb2

REPO = Path(__file__).resolve().parents[2]
GEN = REPO / "nri_plugin/wire/_gen"


def test_committed_generated_files_are_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts/gen-proto"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        env={"GEN_PROTO_REEXEC": "1", "PATH": str(Path(sys.executable).parent)},
    )
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["__init__.py", "api_pb2.py", "api_pb2.pyi", "ttrpc_pb2.py", "ttrpc_pb2.pyi"]
    for name in names:
        assert (GEN / name).read_text() == (tmp_path / name).read_text(), (
            f"{name} is stale: run .venv/bin/python scripts/gen-proto"
        )


def test_runtime_import_needs_only_protobuf() -> None:
    code = (
        "import sys\n"
        "import nri_plugin.wire.stub, nri_plugin.wire._gen.api_pb2, nri_plugin.wire._gen.ttrpc_pb2\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'grpc', 'grpc_tools', 'mypy_protobuf'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_python_keywords_in_the_proto_are_reachable() -> None:
    assert api.Field.Value("None") == 0
    assert api.Field.Name(api.Namespace) == "Namespace" and api.Namespace == 33
    prio = api.LinuxIOPriority(**{"class": api.IOPRIO_CLASS_BE}, priority=4)
    assert getattr(prio, "class") == api.IOPRIO_CLASS_BE
    assert prio.SerializeToString() == b"\x08\x02\x10\x04"


def test_stubs_type_check_with_mypy(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from nri_plugin.wire._gen import api_pb2 as api, ttrpc_pb2\n"
        "c: api.Container = api.Container(id='x', image=api.Image(name='n'))\n"
        "n: int = api.Field.Value('None')\n"
        "s: ttrpc_pb2.Status = ttrpc_pb2.Response().status\n"
        "r: api.CreateContainerResponse = api.CreateContainerResponse(adjust=api.ContainerAdjustment())\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(sample)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def number(message: type, field: str) -> int:
    return int(message.DESCRIPTOR.fields_by_name[field].number)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("message", "field", "expected"),
    [
        (api.RegisterPluginRequest, "NRI_version", 3),
        (api.ConfigureRequest, "registration_timeout", 4),
        (api.ConfigureRequest, "NRI_version", 6),
        (api.ConfigureResponse, "events", 2),
        (api.SynchronizeRequest, "more", 3),
        (api.SynchronizeResponse, "more", 2),
        (api.StateChangeEvent, "event", 1),
        (api.StateChangeEvent, "pod", 2),
        (api.StateChangeEvent, "container", 3),
        (api.StartContainerRequest, "pod", 1),
        (api.StartContainerRequest, "container", 2),
        (api.ContainerAdjustment, "annotations", 2),
        (api.ContainerAdjustment, "CDI_devices", 8),
        (api.ContainerAdjustment, "args", 9),
        (api.LinuxContainerAdjustment, "memory_policy", 12),
        (api.Container, "CDI_devices", 20),
        (api.Container, "user", 21),
        (api.Container, "image", 22),
        (api.PodSandbox, "ips", 10),
        (api.LinuxDevice, "file_mode", 5),
        (api.LinuxResources, "pids", 8),
        (api.ValidateContainerAdjustmentRequest, "plugins", 6),
        (ttrpc_pb2.Request, "timeout_nano", 4),
        (ttrpc_pb2.Request, "metadata", 5),
        (ttrpc_pb2.Response, "payload", 2),
        (ttrpc_pb2.Status, "details", 3),
    ],
)
def test_wire_field_numbers(message: type, field: str, expected: int) -> None:
    assert number(message, field) == expected


def test_services_and_packages() -> None:
    plugin = api.DESCRIPTOR.services_by_name["Plugin"]
    assert plugin.full_name == "nri.pkg.api.v1alpha1.Plugin"
    assert {m.name for m in plugin.methods} == {
        "Configure", "Synchronize", "Shutdown", "CreateContainer", "UpdateContainer", "StopContainer",
        "StateChange", "UpdatePodSandbox", "ValidateContainerAdjustment", "RunPodSandbox",
        "PostUpdatePodSandbox", "StopPodSandbox", "RemovePodSandbox", "PostCreateContainer",
        "StartContainer", "PostStartContainer", "PostUpdateContainer", "RemoveContainer",
    }  # fmt: skip
    runtime = api.DESCRIPTOR.services_by_name["Runtime"]
    assert {m.name for m in runtime.methods} == {"RegisterPlugin", "UpdateContainers"}
    assert ttrpc_pb2.Status.DESCRIPTOR.full_name == "ttrpc.Status"  # not google.rpc.Status
    assert api.Event.Value("VALIDATE_CONTAINER_ADJUSTMENT") == 14 and api.Event.Value("LAST") == 15

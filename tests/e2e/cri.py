"""A small synchronous CRI client for the end-to-end tests.

The Python stubs are generated at test time from the CRI ``api.proto`` that
``scripts/fetch-e2e-deps`` downloads (package golang-github-kubernetes-cri-api-dev): the
``gogoproto`` import and options are stripped, then ``grpc_tools.protoc`` writes
``nri_e2e_cri/api_pb2.py`` and ``api_pb2_grpc.py`` under ``<cache>/cri_gen/<hash>/``
(git-ignored). :func:`load_cri` returns the two modules.

:class:`CriClient` wraps the calls the tests need. Every gRPC failure is raised as
:class:`CriError` whose ``message`` is the runtime's error text, so tests can assert on what
containerd (or an NRI plugin through it) said. :meth:`CriClient.run_container` is the one-call
helper: pod → container → final OCI spec → start → exit code → log → teardown.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

GEN_PACKAGE = "nri_e2e_cri"

# CRI enum values (runtime.v1).
NAMESPACE_MODE_NODE = 2
CONTAINER_STATE_EXITED = 2


@dataclass(frozen=True)
class CriModules:
    pb2: ModuleType
    grpc: ModuleType


def _strip_gogo(proto: str) -> str:
    proto = re.sub(r'^import\s+"github.com/gogo/protobuf/gogoproto/gogo.proto";\s*$', "", proto, flags=re.M)
    proto = re.sub(r"^option\s+\(gogoproto\.[a-z_]+\)\s*=\s*\w+;\s*$", "", proto, flags=re.M)
    # Field options such as [(gogoproto.nullable) = false] (none in v1 today, but harmless).
    proto = re.sub(r"\s*\[\s*\(gogoproto\.[^\]]*\]", "", proto)
    if "gogoproto" in proto:
        raise RuntimeError("CRI api.proto still mentions gogoproto after stripping; extend _strip_gogo")
    return proto


def load_cri(api_proto: Path, gen_root: Path) -> CriModules:
    """Generate (once per proto content) and import the CRI stubs."""
    source = _strip_gogo(api_proto.read_text())
    digest = hashlib.sha256(source.encode()).hexdigest()[:16]
    out = gen_root / digest
    pkg = out / GEN_PACKAGE
    if not (pkg / "api_pb2_grpc.py").is_file():
        from grpc_tools import protoc  # imported lazily: heavy

        tmp = gen_root / f"{digest}.tmp-{uuid.uuid4().hex[:8]}"
        (tmp / GEN_PACKAGE).mkdir(parents=True)
        (tmp / GEN_PACKAGE / "api.proto").write_text(source)
        (tmp / GEN_PACKAGE / "__init__.py").write_text("")
        rc = protoc.main(
            [
                "protoc",
                f"-I{tmp}",
                f"--python_out={tmp}",
                f"--grpc_python_out={tmp}",
                f"{GEN_PACKAGE}/api.proto",
            ]
        )
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({rc}) on {api_proto}")
        try:
            tmp.rename(out)
        except OSError:  # a concurrent run won the race
            shutil.rmtree(tmp, ignore_errors=True)
    if str(out) not in sys.path:
        sys.path.insert(0, str(out))
    import importlib

    pb2 = importlib.import_module(f"{GEN_PACKAGE}.api_pb2")
    pb2_grpc = importlib.import_module(f"{GEN_PACKAGE}.api_pb2_grpc")
    return CriModules(pb2, pb2_grpc)


class CriError(Exception):
    """A CRI call failed; ``message`` is the runtime's error text, ``code`` the gRPC code."""

    def __init__(self, method: str, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"CRI {method} failed: {code.name}: {message}")
        self.method = method
        self.code = code
        self.message = message


@dataclass(frozen=True)
class CriMount:
    host_path: str
    container_path: str
    readonly: bool = False


@dataclass(frozen=True)
class CriDevice:
    host_path: str
    container_path: str
    permissions: str = "rwm"


@dataclass(frozen=True)
class ContainerRequest:
    """What to create. ``command`` replaces the image entrypoint, ``args`` its cmd."""

    image: str
    command: Sequence[str] = ()
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Sequence[CriMount] = ()
    devices: Sequence[CriDevice] = ()
    privileged: bool = False
    readonly_rootfs: bool = False
    annotations: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    name: str = ""


@dataclass(frozen=True)
class Pod:
    id: str
    config: Any  # runtime.v1.PodSandboxConfig
    log_dir: Path


@dataclass(frozen=True)
class ContainerResult:
    spec: dict[str, Any]  # the final OCI spec (after NRI), from ContainerStatus(verbose)
    exit_code: int
    log: str  # stdout+stderr, CRI log decoration removed
    container_id: str

    @property
    def env(self) -> dict[str, str]:
        """``process.env`` of the final spec as a dict (last one wins)."""
        out: dict[str, str] = {}
        for item in self.spec.get("process", {}).get("env", []):
            key, _, value = item.partition("=")
            out[key] = value
        return out


def parse_cri_log(text: str) -> str:
    """Strip the CRI log format (``<time> <stream> <P|F> <text>``) back to the plain output."""
    out: list[str] = []
    for line in text.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            continue
        content = parts[3] if len(parts) == 4 else ""
        out.append(content if parts[2] == "P" else content + "\n")
    return "".join(out)


class CriClient:
    """Synchronous CRI client on ``unix://<socket>``.

    ``cgroup_parent`` is set on every pod so the test bed can find and remove leftover cgroups.
    """

    def __init__(
        self,
        modules: CriModules,
        socket: Path,
        *,
        log_root: Path,
        cgroup_parent: str = "",
        timeout: float = 30.0,
    ) -> None:
        self.m = modules.pb2
        self._channel = grpc.insecure_channel(f"unix://{socket}")
        self._stub = modules.grpc.RuntimeServiceStub(self._channel)
        self._images = modules.grpc.ImageServiceStub(self._channel)
        self.log_root = log_root
        self.cgroup_parent = cgroup_parent
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: str, request: Any, *, images: bool = False, timeout: float | None = None) -> Any:
        stub = self._images if images else self._stub
        try:
            return getattr(stub, method)(request, timeout=timeout or self.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise CriError(method, code, details or "") from None

    # --- basic calls ---------------------------------------------------------------------------

    def version(self, timeout: float | None = None) -> Any:
        return self._call("Version", self.m.VersionRequest(), timeout=timeout)

    def list_images(self) -> list[str]:
        resp = self._call("ListImages", self.m.ListImagesRequest(), images=True)
        return [tag for img in resp.images for tag in img.repo_tags]

    def run_pod(
        self,
        name: str = "",
        *,
        namespace: str = "default",
        privileged: bool = False,
        annotations: Mapping[str, str] | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Pod:
        """A pod with host network and no hostname (no CNI on the test bed)."""
        m = self.m
        uid = uuid.uuid4().hex
        name = name or f"pod-{uid[:8]}"
        log_dir = self.log_root / uid
        log_dir.mkdir(parents=True, exist_ok=True)
        config = m.PodSandboxConfig(
            metadata=m.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            log_directory=str(log_dir),
            annotations=dict(annotations or {}),
            labels=dict(labels or {}),
            linux=m.LinuxPodSandboxConfig(
                cgroup_parent=self.cgroup_parent,
                security_context=m.LinuxSandboxSecurityContext(
                    namespace_options=m.NamespaceOption(network=NAMESPACE_MODE_NODE),
                    privileged=privileged,
                ),
            ),
        )
        resp = self._call("RunPodSandbox", m.RunPodSandboxRequest(config=config))
        return Pod(resp.pod_sandbox_id, config, log_dir)

    def create_container(self, pod: Pod, req: ContainerRequest) -> str:
        m = self.m
        name = req.name or f"c-{uuid.uuid4().hex[:8]}"
        config = m.ContainerConfig(
            metadata=m.ContainerMetadata(name=name, attempt=0),
            image=m.ImageSpec(image=req.image),
            command=list(req.command),
            args=list(req.args),
            envs=[m.KeyValue(key=k, value=v) for k, v in req.env.items()],
            mounts=[
                m.Mount(container_path=x.container_path, host_path=x.host_path, readonly=x.readonly)
                for x in req.mounts
            ],
            devices=[
                m.Device(container_path=x.container_path, host_path=x.host_path, permissions=x.permissions)
                for x in req.devices
            ],
            annotations=dict(req.annotations),
            labels=dict(req.labels),
            log_path=f"{name}.log",
            linux=m.LinuxContainerConfig(
                security_context=m.LinuxContainerSecurityContext(
                    privileged=req.privileged, readonly_rootfs=req.readonly_rootfs
                ),
            ),
        )
        resp = self._call(
            "CreateContainer",
            m.CreateContainerRequest(pod_sandbox_id=pod.id, config=config, sandbox_config=pod.config),
        )
        return str(resp.container_id)

    def container_status(self, container_id: str) -> tuple[Any, dict[str, Any]]:
        """(ContainerStatus message, parsed verbose ``info`` JSON)."""
        resp = self._call(
            "ContainerStatus", self.m.ContainerStatusRequest(container_id=container_id, verbose=True)
        )
        info = json.loads(resp.info["info"]) if "info" in resp.info else {}
        return resp.status, info

    def container_spec(self, container_id: str) -> dict[str, Any]:
        """The final OCI runtime spec (after NRI adjustments)."""
        _, info = self.container_status(container_id)
        spec = info.get("runtimeSpec")
        if not isinstance(spec, dict):
            raise AssertionError(
                f"ContainerStatus(verbose) of {container_id} has no runtimeSpec: {info!r:.500}"
            )
        return spec

    def start_container(self, container_id: str) -> None:
        self._call("StartContainer", self.m.StartContainerRequest(container_id=container_id))

    def wait_exit(self, container_id: str, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.container_status(container_id)
            if status.state == CONTAINER_STATE_EXITED:
                return int(status.exit_code)
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"container {container_id} did not exit within {timeout}s (state {status.state})"
                )
            time.sleep(0.05)

    def read_log(self, container_id: str) -> str:
        status, _ = self.container_status(container_id)
        path = Path(status.log_path)
        return parse_cri_log(path.read_text()) if path.is_file() else ""

    def remove_container(self, container_id: str) -> None:
        with contextlib.suppress(CriError):
            self._call("StopContainer", self.m.StopContainerRequest(container_id=container_id, timeout=0))
        self._call("RemoveContainer", self.m.RemoveContainerRequest(container_id=container_id))

    def remove_pod(self, pod: Pod | str) -> None:
        pod_id = pod.id if isinstance(pod, Pod) else pod
        self._call("StopPodSandbox", self.m.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self._call("RemovePodSandbox", self.m.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def list_pod_ids(self) -> list[str]:
        resp = self._call("ListPodSandbox", self.m.ListPodSandboxRequest())
        return [p.id for p in resp.items]

    def remove_all(self) -> None:
        """Stop and remove every pod (and so every container) this containerd knows."""
        for pod_id in self.list_pod_ids():
            self.remove_pod(pod_id)

    # --- composite helpers -----------------------------------------------------------------------

    @contextlib.contextmanager
    def pod(self, name: str = "", **kwargs: Any) -> Iterator[Pod]:
        """A pod removed (with its containers) on exit."""
        pod = self.run_pod(name, **kwargs)
        try:
            yield pod
        finally:
            self.remove_pod(pod)

    def run_container(
        self, req: ContainerRequest, *, timeout: float = 30.0, privileged_pod: bool | None = None
    ) -> ContainerResult:
        """Run ``req`` to completion in a fresh pod; return (final spec, exit code, log).

        Raises :class:`CriError` if any CRI call fails (e.g. an NRI plugin rejected the container).
        The pod is removed in every case.
        """
        priv = req.privileged if privileged_pod is None else privileged_pod
        with self.pod(privileged=priv) as pod:
            cid = self.create_container(pod, req)
            spec = self.container_spec(cid)
            self.start_container(cid)
            code = self.wait_exit(cid, timeout)
            log = self.read_log(cid)
            return ContainerResult(spec=spec, exit_code=code, log=log, container_id=cid)

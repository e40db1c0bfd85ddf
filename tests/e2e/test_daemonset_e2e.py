"""What kubelet would do with ``deploy/daemonset.yaml``, done through CRI on the test containerd.

1. ``scripts/build-image`` builds the image (cached under ``.cache/image`` by the hash of its
   inputs: a rebuild happens only when the package, the pins or the packages change); its archive
   is imported with ``ctr -n k8s.io images import``, under the name the DaemonSet references.
2. The DaemonSet's pod template becomes CRI calls: a privileged sandbox, then the plugin container
   with the template's image, command, env, ``privileged`` and ``readOnlyRootFilesystem``, and one
   bind mount per volumeMount -- the ConfigMap's ``config.toml`` unchanged, the emptyDir and the
   state hostPath as temporary directories, the NRI socket directory of the test containerd at
   ``/var/run/nri``, the host's ``/dev`` and ``/tmp``.
3. Deviations kubelet would not make, each forced by the test bed: the test pod shares the host's
   network (no CNI), so the health and metrics ports are moved to free ones with flags; the fake
   GPU host replaces the driver root (flags for the roots, mounted at its own path, as the real
   driver root is); the NRI socket path is the test containerd's; mount propagation is not set
   (the test's directories are not shared mounts).
4. The probes' HTTP endpoints are polled as kubelet polls them: startupProbe until it succeeds,
   then readinessProbe -- ``/readyz`` answers 200 only once the plugin registered with the
   containerd that runs it -- and liveness stays 200.
5. A GPU container in another pod gets its device nodes, and ``gpu-probe`` loads ``libcuda.so.1``
   from the fake driver inside it.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from .containerd import Containerd
from .cri import ContainerRequest, CriClient, CriMount, Pod
from .deps import REPO_ROOT
from .gpu_plugin_runner import build_e2e_host, nvidia_devices, run_in_pod
from .images import BuiltImages
from .test_gpu_e2e import PROBE_RE
from .test_robustness_e2e import free_tcp_port

DEPLOY = REPO_ROOT / "deploy"


@pytest.fixture(scope="session")
def plugin_image() -> dict[str, str]:
    res = subprocess.run(
        [str(REPO_ROOT / "scripts" / "build-image")], capture_output=True, text=True, timeout=900, check=False
    )
    assert res.returncode == 0, f"scripts/build-image failed:\n{res.stderr[-4000:]}"
    built: dict[str, str] = json.loads(res.stdout.strip().splitlines()[-1])
    return built


def manifests() -> dict[str, dict[str, Any]]:
    with (DEPLOY / "daemonset.yaml").open() as f:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(f) if doc}


def kustomized_image(container: dict[str, Any]) -> str:
    """The image after kustomization.yaml's ``images`` (newName/newTag), as kustomize renders it."""
    kust = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    name, _, tag = container["image"].rpartition(":")
    for rule in kust.get("images", []):
        if rule["name"] == name:
            name, tag = rule.get("newName", name), rule.get("newTag", tag)
    return f"{name}:{tag}"


def http_status(port: int, path: str, timeout: float) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def poll_probe(port: int, probe: dict[str, Any], *, deadline_s: float) -> float:
    """Poll like kubelet (GET path, timeoutSeconds) until 200; returns the seconds it took."""
    t0 = time.monotonic()
    while True:
        if http_status(port, probe["httpGet"]["path"], float(probe.get("timeoutSeconds", 1))) == 200:
            return time.monotonic() - t0
        if time.monotonic() - t0 > deadline_s:
            raise AssertionError(f"probe {probe['httpGet']['path']} did not succeed within {deadline_s}s")
        time.sleep(0.2)


@pytest.fixture
def plugin_pod(
    containerd: Containerd, cri: CriClient, plugin_image: dict[str, str], e2e_base: Path, tmp_path: Path
) -> Iterator[tuple[Pod, str, dict[str, Any], dict[str, int], Any]]:
    containerd.ctr("images", "import", plugin_image["archive"])
    docs = manifests()
    template = docs["DaemonSet"]["spec"]["template"]
    spec = template["spec"]
    [c] = spec["containers"]
    image = kustomized_image(c)
    assert image == plugin_image["ref"], (image, plugin_image["ref"])
    host = build_e2e_host(e2e_base, 1)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.toml").write_text(docs["ConfigMap"]["data"]["config.toml"])
    ports = {"health": free_tcp_port(), "metrics": free_tcp_port()}
    volumes = {v["name"]: v for v in spec["volumes"]}
    sources: dict[str, str] = {"config": str(config_dir), "nri-socket-dir": str(containerd.nri_socket.parent)}
    mounts: list[CriMount] = []
    for vm in c["volumeMounts"]:
        vol = volumes[vm["name"]]
        if vm["name"] == "driver-root":  # the fake driver root, at its own (host) path
            mounts.append(CriMount(str(host.root), str(host.root), readonly=True))
            continue
        src = sources.get(vm["name"])
        if src is None and vol.get("hostPath", {}).get("path") in ("/dev", "/tmp"):
            src = vol["hostPath"]["path"]
        if src is None:  # emptyDir, state and IPC hostPaths: a fresh directory each
            d = tmp_path / "vol" / vm["name"]
            d.mkdir(parents=True)
            src = str(d)
        mounts.append(CriMount(src, vm["mountPath"], readonly=bool(vm.get("readOnly", False))))
    r = str(host.root)
    command = [
        *c["command"],
        "--driver-root", r, "--dev-root", r, "--proc-root", f"{r}/proc", "--sys-root", f"{r}/sys",
        "--run-root", r,
        "--socket", f"/var/run/nri/{containerd.nri_socket.name}",
        "--health-address", f"127.0.0.1:{ports['health']}",
        "--metrics-address", f"127.0.0.1:{ports['metrics']}",
    ]  # fmt: skip
    pod = cri.run_pod(
        "nvidia-nri-plugin", namespace="nvidia-nri-plugin", privileged=True,
        annotations=template["metadata"].get("annotations", {}),
    )  # fmt: skip
    sc = c["securityContext"]
    req = ContainerRequest(
        image=image,
        command=command,
        env={e["name"]: e["value"] for e in c["env"]},
        mounts=mounts,
        privileged=bool(sc["privileged"]),
        readonly_rootfs=bool(sc["readOnlyRootFilesystem"]),
        name=c["name"],
    )
    cid = cri.create_container(pod, req)
    cri.start_container(cid)
    try:
        yield pod, cid, c, ports, host
    finally:
        cri.remove_container(cid)
        cri.remove_pod(pod)


def test_daemonset_pod_through_cri_injects_gpus(
    containerd: Containerd,
    cri: CriClient,
    plugin_pod: tuple[Pod, str, dict[str, Any], dict[str, int], Any],
    e2e_images: BuiltImages,
) -> None:
    _, cid, c, ports, host = plugin_pod
    try:
        started = poll_probe(ports["health"], c["startupProbe"], deadline_s=60)
        ready = poll_probe(ports["health"], c["readinessProbe"], deadline_s=30)
    except AssertionError as e:
        raise AssertionError(f"{e}\nplugin container log:\n{cri.read_log(cid)[-4000:]}") from None
    assert http_status(ports["health"], c["livenessProbe"]["httpGet"]["path"], 2) == 200
    log = cri.read_log(cid)
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    registered = [r for r in records if r.get("msg") == "registered"]
    assert registered and registered[0]["runtime"].startswith("containerd"), log[-3000:]
    assert "10-nvidia-gpu" in containerd.log_text(), "containerd did not log the plugin's registration"
    assert http_status(ports["metrics"], "/metrics", 2) == 200

    gpu_pod = cri.run_pod("gpu-workload")
    result = run_in_pod(
        cri,
        gpu_pod,
        ContainerRequest(
            image=e2e_images.refs["debian-layout"],
            command=["/bin/sh", "-c", "ls /dev/nvidia0 /dev/nvidiactl && /usr/bin/gpu-probe"],
            env={"NVIDIA_VISIBLE_DEVICES": "0"},
            name="cuda",
        ),
    )
    assert {"/dev/nvidiactl", "/dev/nvidia0"} <= set(nvidia_devices(result.spec)), result.spec
    assert result.exit_code == 0, result.log
    match = PROBE_RE.search(result.log)
    assert match and int(match.group(1)) == host.cuda_version, result.log
    print(
        f"containerd {containerd.package_version}: image {c['image']} started in {started:.1f}s, "
        f"ready after {ready:.1f}s more; GPU container got {sorted(nvidia_devices(result.spec))}"
    )

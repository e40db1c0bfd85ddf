"""The generated ``/etc/ld.so.cache``, end to end, on containerd 1.7 and 2.1.

The real daemon reads each container's snapshot through containerd's API socket, and the
container's *own* ``ldconfig -p`` (the host's static ldconfig, put into the images) and the probe's
``dlopen("libcuda.so.1")`` show what the container's loader sees:

* Debian layout with an extra ``ld.so.conf.d`` directory and its own library, RHEL layout with a
  cache in ldconfig's compat format (old section first): the driver libraries at the layout's
  directory AND the image's own libraries; ``ctypes.util.find_library("cuda")``'s parse of
  ``ldconfig -p`` (the same regular expression, applied to the container's output) finds libcuda,
  and so does a real ``python3 -c 'import ctypes.util; ...find_library("cuda")'`` in an image
  that has Python;
* CUDA forward compat: a newer ``compat/libcuda.so.*`` is what the probe loads, an older one is not;
* hostile images (cache symlinked to a host path, a truncated cache): the container keeps its GPUs,
  the fallback is logged with its reason, and the host file is never read;
* the per-container file exists while the container does, and is gone when it is removed.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from nri_plugin.host import CacheRecord, write_cache
from tests.fakehost import FakeHost

from .containerd import Containerd
from .cri import ContainerRequest, ContainerResult, CriClient, Pod
from .gpu_plugin_runner import (
    GpuPluginProcess,
    build_e2e_host,
    mounts_by_destination,
    nvidia_devices,
    run_in_pod,
)
from .images import COMPAT_NEWER, COMPAT_OLDER, HOST_ONLY_CACHE, VENDOR_LIB_DIR, BuiltImages

PROBE_RE = re.compile(r"^PROBE_OK driver_version=(\d+) path=(\S+)$", re.M)
LDCONFIG_RE = re.compile(r"^\s+(\S+) \(([^)]*)\) => (\S+)$", re.M)
# ctypes.util._findSoname_ldconfig's expression for find_library("cuda") on x86-64
FIND_LIBRARY_RE = re.compile(r"\s+(libcuda\.[^\s]+)\s+\(libc6,x86-64")
SCRIPT = (
    "echo ENV TRITON_LIBCUDA_PATH=${TRITON_LIBCUDA_PATH-unset} "
    "NVIDIA_CTK_LIBCUDA_DIR=${NVIDIA_CTK_LIBCUDA_DIR-unset}; "
    "/sbin/ldconfig -p; /usr/bin/gpu-probe"
)
DEBIAN_DIR, RHEL_DIR = "/usr/lib/x86_64-linux-gnu", "/usr/lib64"


@pytest.fixture(scope="module")
def host(e2e_base: Path) -> FakeHost:
    return build_e2e_host(e2e_base, 1)


@pytest.fixture(scope="module")
def state_dir(e2e_base: Path, containerd: Containerd) -> Path:
    return e2e_base / f"ldcache-state-{containerd.version}"


@pytest.fixture(scope="module")
def plugin(
    containerd: Containerd, host: FakeHost, e2e_base: Path, state_dir: Path
) -> Iterator[GpuPluginProcess]:
    containerd.ensure_running()
    proc = GpuPluginProcess(
        host,
        containerd.nri_socket,
        e2e_base / f"ldcache-plugin-{containerd.version}",
        extra_args=["--containerd-socket", str(containerd.address), "--runtime-dir", str(state_dir)],
    )
    try:
        proc.start()
        proc.wait_for("host driver discovered")
        yield proc
    finally:
        try:
            assert proc.stop() == 0, proc.diagnostics()
        finally:
            proc.kill()


@pytest.fixture(scope="module")
def pod(containerd: Containerd, plugin: GpuPluginProcess) -> Iterator[Pod]:
    p = containerd.cri.run_pod("ldcache-e2e")
    try:
        yield p
    finally:
        containerd.ensure_running()
        containerd.cri.remove_pod(p)


def _run(cri: CriClient, pod: Pod, image: str, name: str, **env: str) -> ContainerResult:
    env = {"NVIDIA_VISIBLE_DEVICES": "0", **env}
    return run_in_pod(
        cri, pod, ContainerRequest(image=image, command=["sh", "-c", SCRIPT], env=env, name=name)
    )


def _ldconfig(log: str) -> list[tuple[str, str, str]]:
    return LDCONFIG_RE.findall(log)


def _probe(result: ContainerResult) -> tuple[int, str]:
    m = PROBE_RE.search(result.log)
    assert m is not None and result.exit_code == 0, result.log
    return int(m.group(1)), m.group(2)


def _cache_mount(result: ContainerResult) -> dict[str, object] | None:
    return mounts_by_destination(result.spec).get("/etc/ld.so.cache")


@pytest.mark.parametrize(
    ("image", "lib_dir", "own"),
    [
        (
            "ldconfig-debian",
            DEBIAN_DIR,
            [
                ("libvendor.so.1", f"{VENDOR_LIB_DIR}/libvendor.so.1"),
                ("libc.so.6", "/lib/x86_64-linux-gnu/libc.so.6"),
            ],
        ),
        (
            "ldconfig-rhel",
            RHEL_DIR,
            [("libc.so.6", "/usr/lib64/libc.so.6"), ("libm.so.6", "/usr/lib64/libm.so.6")],
        ),
    ],
)
def test_ldconfig_in_the_container_lists_the_driver_and_the_image_libraries(
    containerd: Containerd,
    pod: Pod,
    e2e_images: BuiltImages,
    plugin: GpuPluginProcess,
    state_dir: Path,
    host: FakeHost,
    image: str,
    lib_dir: str,
    own: list[tuple[str, str]],
) -> None:
    result = _run(containerd.cri, pod, e2e_images.refs[image], f"ld-{image}")
    entries = {(key, path) for key, _abi, path in _ldconfig(result.log)}
    assert ("libcuda.so.1", f"{lib_dir}/libcuda.so.1") in entries, result.log
    assert ("libnvidia-ml.so.1", f"{lib_dir}/libnvidia-ml.so.1") in entries, result.log
    for item in own:
        assert item in entries, (item, result.log)
    found = FIND_LIBRARY_RE.search(result.log)
    assert found is not None and found.group(1) == "libcuda.so.1", result.log
    assert _probe(result) == (host.cuda_version, f"{lib_dir}/libcuda.so.1")
    assert f"ENV TRITON_LIBCUDA_PATH={lib_dir} NVIDIA_CTK_LIBCUDA_DIR={lib_dir}" in result.log
    mount = _cache_mount(result)
    assert mount is not None and "ro" in mount["options"], result.spec.get("mounts")  # type: ignore[operator]
    source = Path(str(mount["source"]))
    assert source.parent == state_dir / "ldcache" / "containers"
    assert not source.exists(), "the container was removed; its generated cache must be gone too"
    assert "/dev/nvidia0" in nvidia_devices(result.spec)
    adjusted = plugin.wait_for("GPU container adjusted", container_id=result.container_id)
    assert adjusted.fields["ldcache"] == "image-cache", adjusted.line


def test_an_image_set_libcuda_env_is_kept(containerd: Containerd, pod: Pod, e2e_images: BuiltImages) -> None:
    result = _run(
        containerd.cri, pod, e2e_images.refs["ldconfig-debian"], "ld-env", TRITON_LIBCUDA_PATH="/mine"
    )
    assert f"ENV TRITON_LIBCUDA_PATH=/mine NVIDIA_CTK_LIBCUDA_DIR={DEBIAN_DIR}" in result.log, result.log


def test_a_newer_forward_compat_libcuda_is_loaded(
    containerd: Containerd, pod: Pod, e2e_images: BuiltImages
) -> None:
    result = _run(containerd.cri, pod, e2e_images.refs["compat-newer"], "ld-compat-newer")
    compat = "/usr/local/cuda-x/compat/libcuda.so.1"
    assert _probe(result) == (COMPAT_NEWER[1], compat)
    first = FIND_LIBRARY_RE.search(result.log)
    assert first is not None
    libcuda = [path for key, _abi, path in _ldconfig(result.log) if key == "libcuda.so.1"]
    assert libcuda[0] == compat and f"{DEBIAN_DIR}/libcuda.so.1" in libcuda, result.log


def test_an_older_forward_compat_libcuda_is_not_loaded(
    containerd: Containerd, pod: Pod, e2e_images: BuiltImages, host: FakeHost
) -> None:
    result = _run(containerd.cri, pod, e2e_images.refs["compat-older"], "ld-compat-older")
    assert _probe(result) == (host.cuda_version, f"{DEBIAN_DIR}/libcuda.so.1")
    assert f"libcuda.so.{COMPAT_OLDER[0]}" not in result.log  # the compat directory is not listed
    libcuda = [path for key, _abi, path in _ldconfig(result.log) if key == "libcuda.so.1"]
    assert libcuda == [f"{DEBIAN_DIR}/libcuda.so.1"], result.log


@pytest.fixture
def host_only_cache() -> Iterator[Path]:
    """A valid cache at the host path the hostile image's /etc/ld.so.cache points to."""
    path = Path(HOST_ONLY_CACHE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        write_cache([CacheRecord(b"libhostsecret.so.1", b"/host/secret/libhostsecret.so.1", 0x303)])
    )
    try:
        yield path
    finally:
        path.unlink()
        path.parent.rmdir()


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        ("hostile-cache-link", "does not exist inside the image"),
        ("hostile-truncated", "not usable"),
    ],
)
def test_a_hostile_image_falls_back_and_keeps_its_gpus(
    containerd: Containerd,
    pod: Pod,
    e2e_images: BuiltImages,
    plugin: GpuPluginProcess,
    host: FakeHost,
    host_only_cache: Path,
    image: str,
    reason: str,
) -> None:
    result = _run(containerd.cri, pod, e2e_images.refs[image], f"ld-{image}")
    assert _cache_mount(result) is None, "a fallback mounts no generated cache"
    assert "/dev/nvidia0" in nvidia_devices(result.spec)
    assert "libhostsecret" not in result.log
    driver_version, _path = _probe(result)  # the loader's system directories still find libcuda
    assert driver_version == host.cuda_version
    fallback = plugin.wait_for(
        "container ld.so.cache not generated; the container keeps its image's cache",
        container_id=result.container_id,
    )
    assert fallback.fields["stage"] == "image" and reason in fallback.fields["reason"], fallback.line


def test_python_find_library_finds_the_injected_libcuda(
    containerd: Containerd, pod: Pod, e2e_images: BuiltImages, plugin: GpuPluginProcess
) -> None:
    """The issue's own check, with a real Python in the image (the host's Debian python3)."""
    script = (
        'python3 -c \'import ctypes.util; print("FIND", ctypes.util.find_library("cuda"), '
        'ctypes.util.find_library("nvidia-ml"), ctypes.util.find_library("vendor"))\''
    )
    env = {"NVIDIA_VISIBLE_DEVICES": "0"}
    req = ContainerRequest(e2e_images.refs["python-debian"], ["sh", "-c", script], env=env, name="ld-python")
    result = run_in_pod(containerd.cri, pod, req)
    assert result.exit_code == 0, result.log
    assert "FIND libcuda.so.1 libnvidia-ml.so.1 libvendor.so.1" in result.log, result.log
    adjusted = plugin.wait_for("GPU container adjusted", container_id=result.container_id)
    assert adjusted.fields["ldcache"] == "image-cache", adjusted.line

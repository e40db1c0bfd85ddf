"""Local OCI test images for the end-to-end tests: no registry, no docker.

Every image is a single uncompressed layer with fixed mtimes and owners, so the digests are
reproducible; it is written as an OCI image archive (``oci-layout``, ``index.json``,
``blobs/sha256/…``) plus a docker-style ``manifest.json`` so ``ctr -n k8s.io images import`` gives
it the name in :data:`IMAGE_REFS`.

Images (see :func:`build_images`):

``busybox``
    ``/bin/busybox`` + one symlink per applet, ``/etc/passwd``, ``/etc/group``, the usual empty
    directories. Default command ``sh``.
``pause``
    The same layer with entrypoint ``/bin/sleep infinity``: the CRI sandbox image.
``debian-layout``
    busybox + the host's glibc (loader and ``libc.so.6`` in ``/lib/x86_64-linux-gnu``,
    ``/lib64/ld-linux-x86-64.so.2`` symlink), ``/etc/debian_version`` and ``/usr/bin/gpu-probe``.
``rhel-layout``
    busybox + the 64-bit glibc of Debian's *i386* ``libc6-amd64`` package, whose loader searches
    ``/lib64`` and ``/usr/lib64`` (the RHEL/Fedora layout); files in ``/usr/lib64``,
    ``/lib64 -> usr/lib64``, ``/etc/redhat-release``, no ``/usr/lib/x86_64-linux-gnu``, and the
    same ``/usr/bin/gpu-probe`` (same glibc 2.36 as the host, so the binary runs).

``ldconfig-debian`` / ``ldconfig-rhel``
    debian-layout (plus ``/etc/ld.so.conf.d/vendor.conf`` -> ``/opt/vendor/lib/libvendor.so.1``)
    and rhel-layout, each with the host's static ``/sbin/ldconfig`` and the ``/etc/ld.so.cache``
    it writes for them at build time (``ldconfig -r``; the RHEL one in the compat format, with an
    old section), so ``ldconfig -p`` inside shows what the container's loader sees.
``compat-newer`` / ``compat-older``
    ldconfig-debian plus ``/usr/local/cuda -> cuda-x`` with ``compat/libcuda.so.<v>`` (a fake
    libcuda whose cuDriverGetVersion differs from the host's), major newer/older than the host's.
``hostile-cache-link`` / ``hostile-truncated``
    ldconfig-debian's files with ``/etc/ld.so.cache`` a symlink to :data:`HOST_ONLY_CACHE`, or cut
    in half.
``python-debian``
    ldconfig-debian plus the host's Debian ``python3`` and the stdlib files ``ctypes.util`` needs.

``gpu-probe`` is ``tests/e2e/probe.c`` built with the host ``gcc``; see that file for its output.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .deps import E2EDeps

#: Fixed mtime (2024-01-01T00:00:00Z) for every layer entry and the image config.
FIXED_MTIME = 1704067200
FIXED_CREATED = "2024-01-01T00:00:00Z"

IMAGE_REFS: Mapping[str, str] = {
    "busybox": "docker.io/library/nri-e2e-busybox:latest",
    "pause": "docker.io/library/nri-e2e-pause:latest",
    "debian-layout": "docker.io/library/nri-e2e-debian-layout:latest",
    "rhel-layout": "docker.io/library/nri-e2e-rhel-layout:latest",
    "ldconfig-debian": "docker.io/library/nri-e2e-ldconfig-debian:latest",
    "ldconfig-rhel": "docker.io/library/nri-e2e-ldconfig-rhel:latest",
    "compat-newer": "docker.io/library/nri-e2e-compat-newer:latest",
    "compat-older": "docker.io/library/nri-e2e-compat-older:latest",
    "hostile-cache-link": "docker.io/library/nri-e2e-hostile-cache-link:latest",
    "hostile-truncated": "docker.io/library/nri-e2e-hostile-truncated:latest",
    "python-debian": "docker.io/library/nri-e2e-python-debian:latest",
}
#: The host's Debian python3, copied (with the stdlib modules ``import ctypes.util`` and
#: ``find_library`` load, and their shared libraries) into ``python-debian``.
HOST_PYTHON = Path("/usr/bin/python3.11")
_PY_MODULES = (
    "import ctypes.util, sys\n"
    "ctypes.util.find_library('c')\n"
    "files = {getattr(m, '__file__', None) for m in list(sys.modules.values())}\n"
    "print('\\n'.join(sorted(f for f in files if f)))\n"
)
#: Where ``hostile-cache-link``'s ``/etc/ld.so.cache`` points: a path of the *host* (the test puts a
#: valid cache there) that the image does not have.
HOST_ONLY_CACHE = "/var/lib/nri-e2e-host-only/ld.so.cache"
#: The image's own library in ``ldconfig-debian`` (found through ``/etc/ld.so.conf.d/vendor.conf``).
VENDOR_LIB_DIR = "/opt/vendor/lib"
#: Compat libcuda versions of ``compat-newer`` / ``compat-older`` (and what their cuDriverGetVersion says).
COMPAT_NEWER = ("999.10.01", 99000)
COMPAT_OLDER = ("100.1.1", 10000)

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PROBE_SOURCE = Path(__file__).with_name("probe.c")


@dataclass(frozen=True)
class Entry:
    """One layer entry. ``kind`` is ``dir``, ``file`` or ``symlink``."""

    path: str  # relative, no leading slash
    kind: str
    mode: int = 0o755
    data: bytes = b""
    target: str = ""  # symlink target


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: Sequence[str] = ()
    cmd: Sequence[str] = ()
    env: Sequence[str] = (DEFAULT_PATH,)
    labels: Mapping[str, str] = field(default_factory=dict)


def d(path: str, mode: int = 0o755) -> Entry:
    return Entry(path, "dir", mode)


def f(path: str, data: bytes, mode: int = 0o644) -> Entry:
    return Entry(path, "file", mode, data)


def ln(path: str, target: str) -> Entry:
    return Entry(path, "symlink", 0o777, target=target)


def _parents(path: str) -> list[str]:
    parts = path.split("/")[:-1]
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


def build_layer(entries: Iterable[Entry]) -> bytes:
    """A reproducible tar: entries sorted by path, parents created, root-owned, fixed mtime.

    A later entry for the same path replaces an earlier one.
    """
    by_path: dict[str, Entry] = {}
    for e in entries:
        if e.path.startswith("/") or not e.path:
            raise ValueError(f"layer entry path {e.path!r} must be relative and non-empty")
        by_path[e.path] = e
    for p in list(by_path):
        for parent in _parents(p):
            by_path.setdefault(parent, d(parent))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(by_path):
            e = by_path[p]
            info = tarfile.TarInfo(p)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = e.mode
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.target
                tar.addfile(info)
            elif e.kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                raise ValueError(f"layer entry {p!r} has unknown kind {e.kind!r} (dir, file or symlink)")
    return buf.getvalue()


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canon(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write_oci_archive(out: Path, ref: str, layer: bytes, config: ImageConfig) -> str:
    """Write an OCI image archive for ``ref`` to ``out``; return the manifest digest."""
    layer_digest = _sha(layer)
    img_config: dict[str, object] = {
        "architecture": "amd64",
        "os": "linux",
        "created": FIXED_CREATED,
        "config": {
            "Env": list(config.env),
            "Entrypoint": list(config.entrypoint) or None,
            "Cmd": list(config.cmd) or None,
            "Labels": dict(config.labels) or None,
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": FIXED_CREATED, "created_by": "tests/e2e/images.py"}],
    }
    config_bytes = _canon(img_config)
    config_digest = _sha(config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config_bytes),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": len(layer),
            }
        ],
    }
    manifest_bytes = _canon(manifest)
    manifest_digest = _sha(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest_bytes),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    "io.containerd.image.name": ref,
                    "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                },
            }
        ],
    }

    def blob(digest: str) -> str:
        return "blobs/sha256/" + digest.split(":", 1)[1]

    short = ref.removeprefix("docker.io/library/")
    docker_manifest = [{"Config": blob(config_digest), "RepoTags": [short], "Layers": [blob(layer_digest)]}]
    files: list[Entry] = [
        d("blobs"),
        d("blobs/sha256"),
        f("oci-layout", _canon({"imageLayoutVersion": "1.0.0"})),
        f("index.json", _canon(index)),
        f("manifest.json", _canon(docker_manifest)),
        f(blob(config_digest), config_bytes),
        f(blob(manifest_digest), manifest_bytes),
        f(blob(layer_digest), layer),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(build_layer(files))
    tmp.replace(out)
    return manifest_digest


# --- image contents ---------------------------------------------------------------------------

PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


def busybox_entries(deps: E2EDeps) -> list[Entry]:
    busybox = deps.busybox_binary
    listing = subprocess.run(
        [str(busybox), "--list-full"], check=True, capture_output=True, text=True
    ).stdout.split()
    entries = [
        d("bin"),
        d("sbin"),
        d("usr/bin"),
        d("usr/sbin"),
        d("etc"),
        d("root", 0o700),
        d("tmp", 0o1777),
        d("proc", 0o555),
        d("sys", 0o555),
        d("dev"),
        d("run"),
        d("var"),
        d("var/tmp", 0o1777),
        d("home"),
        f("bin/busybox", busybox.read_bytes(), 0o755),
        f("etc/passwd", PASSWD),
        f("etc/group", GROUP),
        f("etc/hostname", b"nri-e2e\n"),
    ]
    for applet in listing:
        if applet != "bin/busybox":
            entries.append(ln(applet, "/bin/busybox"))
    return entries


def compile_probe(out: Path) -> Path:
    """Compile ``probe.c`` with the host gcc to ``out`` (a dynamically linked glibc binary)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(PROBE_SOURCE)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise RuntimeError("gcc not found: install the Debian packages gcc and libc6-dev") from exc
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"compiling {PROBE_SOURCE} failed: {exc.stderr}") from exc
    return out


def debian_layout_entries(deps: E2EDeps, probe: Path) -> list[Entry]:
    libdir = Path("/lib/x86_64-linux-gnu")
    libc = (libdir / "libc.so.6").resolve()
    loader = (libdir / "ld-linux-x86-64.so.2").resolve()
    return [
        *busybox_entries(deps),
        f("lib/x86_64-linux-gnu/libc.so.6", libc.read_bytes(), 0o755),
        f("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", loader.read_bytes(), 0o755),
        ln("lib64/ld-linux-x86-64.so.2", "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
        d("usr/lib/x86_64-linux-gnu"),
        f("etc/debian_version", b"12.0\n"),
        f("usr/bin/gpu-probe", probe.read_bytes(), 0o755),
    ]


def rhel_layout_entries(deps: E2EDeps, probe: Path) -> list[Entry]:
    glibc_root = deps.rhel_glibc_root  # .../libc6-amd64/root
    entries = [*busybox_entries(deps)]
    for src_dir in (glibc_root / "lib64", glibc_root / "usr" / "lib64"):
        for src in sorted(src_dir.rglob("*")):
            rel = "usr/lib64/" + str(src.relative_to(src_dir))
            if src.is_symlink():
                entries.append(ln(rel, str(src.readlink())))
            elif src.is_dir():
                entries.append(d(rel))
            else:
                entries.append(f(rel, src.read_bytes(), src.stat().st_mode & 0o777))
    entries += [
        ln("lib64", "usr/lib64"),
        ln("lib", "usr/lib"),
        d("usr/lib"),
        f("etc/redhat-release", b"Red Hat Enterprise Linux release 9.4 (Plow)\n"),
        f("usr/bin/gpu-probe", probe.read_bytes(), 0o755),
    ]
    return entries


def _with_ldcache(entries: list[Entry], fmt: str, staging: Path) -> list[Entry]:
    """``entries`` plus the ``/etc/ld.so.cache`` the host's (static) ``ldconfig -c fmt`` writes
    for them, and that ``ldconfig`` itself at ``/sbin/ldconfig`` (for ``ldconfig -p`` inside)."""
    entries = [*entries, f("sbin/ldconfig", Path("/sbin/ldconfig").read_bytes(), 0o755)]
    staging.mkdir(parents=True, exist_ok=True)
    unpack_layer(entries, staging)
    (staging / "var/cache/ldconfig").mkdir(parents=True, exist_ok=True)
    cmd = ["ldconfig", "-r", str(staging), "-c", fmt]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr}")
    return [*entries, f("etc/ld.so.cache", (staging / "etc/ld.so.cache").read_bytes())]


def _shared(name: str) -> bytes:
    """A tiny real shared object with SONAME ``name`` (the fake host's driver-library source)."""
    from tests.fakehost.builder import FAKE_LIB_SOURCE, compile_shared

    return compile_shared(FAKE_LIB_SOURCE, name, [f"-Wl,-soname,{name}"]).read_bytes()


def _compat_libcuda(cuda_version: int) -> bytes:
    """A fake ``libcuda.so.1`` whose cuDriverGetVersion says ``cuda_version``."""
    from tests.fakehost.builder import build_driver_lib

    return build_driver_lib("libcuda.so.1", cuda_version=cuda_version).read_bytes()


def ldconfig_debian_entries(deps: E2EDeps, probe: Path) -> list[Entry]:
    """debian-layout + an extra ld.so.conf.d directory with the image's own library."""
    return [
        *debian_layout_entries(deps, probe),
        f("etc/ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n"),
        f("etc/ld.so.conf.d/vendor.conf", f"{VENDOR_LIB_DIR}\n".encode()),
        f(f"{VENDOR_LIB_DIR.lstrip('/')}/libvendor.so.1", _shared("libvendor.so.1"), 0o755),
    ]


def compat_entries(deps: E2EDeps, probe: Path, compat: tuple[str, int]) -> list[Entry]:
    """ldconfig-debian + ``/usr/local/cuda -> cuda-X`` with ``compat/libcuda.so.<version>``."""
    version, cuda_version = compat
    lib = f"usr/local/cuda-x/compat/libcuda.so.{version}"
    return [
        *ldconfig_debian_entries(deps, probe),
        ln("usr/local/cuda", "cuda-x"),
        f(lib, _compat_libcuda(cuda_version), 0o755),
        ln("usr/local/cuda-x/compat/libcuda.so.1", f"libcuda.so.{version}"),
    ]


def _ldd(path: Path) -> list[Path]:
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, check=True).stdout
    return [Path(m.group(1)) for m in re.finditer(r"=> (/\S+)", out)]


def python_entries() -> list[Entry]:
    """``/usr/bin/python3`` (the host's Debian 3.11) with the stdlib files that ``python3 -c
    'import ctypes.util; print(ctypes.util.find_library("cuda"))'`` loads, and the shared
    libraries they need, at the host's paths (a Debian-layout image)."""
    if not HOST_PYTHON.is_file():
        raise RuntimeError(f"{HOST_PYTHON} not found: install the Debian package python3.11-minimal")
    listing = subprocess.run(
        [str(HOST_PYTHON), "-c", _PY_MODULES], capture_output=True, text=True, check=True, cwd="/"
    ).stdout.split()
    files = [Path(p) for p in listing if p.startswith("/usr/lib/python3.11/")]
    libs: dict[str, Path] = {}
    for binary in [HOST_PYTHON, *(f for f in files if f.suffix == ".so")]:
        for lib in _ldd(binary):
            libs.setdefault(lib.name, lib.resolve())
    entries = [
        f("usr/bin/python3.11", HOST_PYTHON.read_bytes(), 0o755),
        ln("usr/bin/python3", "python3.11"),
        d("usr/lib/python3.11/lib-dynload"),
    ]
    entries += [f(str(p).lstrip("/"), p.read_bytes(), 0o755 if p.suffix == ".so" else 0o644) for p in files]
    for name, real in sorted(libs.items()):
        if name not in ("libc.so.6",):  # the image's own (same glibc)
            entries.append(f(f"lib/x86_64-linux-gnu/{name}", real.read_bytes(), 0o755))
    return entries


@dataclass(frozen=True)
class BuiltImages:
    """Archive path and image reference per image key (``busybox``, ``pause``, …)."""

    archives: Mapping[str, Path]
    refs: Mapping[str, str]
    probe_binary: Path


def build_images(deps: E2EDeps, out_dir: Path) -> BuiltImages:
    """Build all test image archives into ``out_dir`` (a few hundred ms)."""
    probe = compile_probe(out_dir / "gpu-probe")
    busybox_layer = build_layer(busybox_entries(deps))
    layers_and_configs: dict[str, tuple[bytes, ImageConfig]] = {
        "busybox": (busybox_layer, ImageConfig(cmd=("sh",))),
        "pause": (busybox_layer, ImageConfig(entrypoint=("/bin/sleep", "infinity"))),
        "debian-layout": (build_layer(debian_layout_entries(deps, probe)), ImageConfig(cmd=("sh",))),
        "rhel-layout": (build_layer(rhel_layout_entries(deps, probe)), ImageConfig(cmd=("sh",))),
    }
    staging = out_dir / "staging"
    debian = ldconfig_debian_entries(deps, probe)
    rhel = [*rhel_layout_entries(deps, probe), f("etc/ld.so.conf", b"/usr/lib64\n")]
    with_cache = {
        # the RHEL-layout one in ldconfig's compat format: an old (libc5) section before the new one
        "ldconfig-debian": _with_ldcache(debian, "new", staging / "debian"),
        "ldconfig-rhel": _with_ldcache(rhel, "compat", staging / "rhel"),
        "compat-newer": _with_ldcache(compat_entries(deps, probe, COMPAT_NEWER), "new", staging / "newer"),
        "compat-older": _with_ldcache(compat_entries(deps, probe, COMPAT_OLDER), "new", staging / "older"),
        "python-debian": _with_ldcache([*debian, *python_entries()], "new", staging / "python"),
    }
    good_cache = next(e.data for e in with_cache["ldconfig-debian"] if e.path == "etc/ld.so.cache")
    with_cache["hostile-cache-link"] = [*debian, ln("etc/ld.so.cache", HOST_ONLY_CACHE)]
    with_cache["hostile-truncated"] = [*debian, f("etc/ld.so.cache", good_cache[: len(good_cache) // 2])]
    for key, entries in with_cache.items():
        layers_and_configs[key] = (build_layer(entries), ImageConfig(cmd=("sh",)))
    archives: dict[str, Path] = {}
    for key, (layer, config) in layers_and_configs.items():
        archive = out_dir / f"{key}.oci.tar"
        write_oci_archive(archive, IMAGE_REFS[key], layer, config)
        archives[key] = archive
    return BuiltImages(archives=archives, refs=dict(IMAGE_REFS), probe_binary=probe)


def unpack_layer(layer_entries: Iterable[Entry], dest: Path) -> None:
    """Extract a layer built from ``layer_entries`` into ``dest`` (for chroot checks)."""
    with tarfile.open(fileobj=io.BytesIO(build_layer(layer_entries))) as tar:
        tar.extractall(dest, filter="fully_trusted")

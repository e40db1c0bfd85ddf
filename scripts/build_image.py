"""Build the plugin's OCI image without a registry or a container engine (``scripts/build-image``).

Inputs, all pinned or content-addressed, all cached under ``.cache/image/``:

* the Debian bookworm packages of ``deploy/image/debian-packages.txt`` (Python 3.11 and the shared
  libraries it needs), downloaded with a private apt state and unpacked with ``dpkg-deb -x``;
* the runtime dependencies of ``deploy/image/requirements.txt`` (exact versions, sha256 hashes);
* this repository's wheel (``scripts/build-dist``: reproducible).

Output: one OCI image archive (``oci-layout``, ``index.json``, ``blobs/``, plus a docker-style
``manifest.json``) that ``ctr -n k8s.io images import`` and ``skopeo copy oci-archive:`` accept,
named ``docker.io/library/nvidia-nri-plugin:<version>``. One gzip layer, entries sorted,
root-owned, fixed mtimes, ``.pyc`` files compiled in unchecked-hash mode: the same inputs give the
same image digest. The archive is cached by the hash of all inputs, so a second build with the
same inputs only prints it.

Layout (the same as ``deploy/image/Containerfile``): ``/usr/bin/python3.11``, the dependencies and
the package in ``/usr/lib/python3/dist-packages``, the console script ``/usr/bin/nvidia-nri-plugin``,
``/var/run -> /run``, ``/var/lib/nvidia-nri-plugin`` (state), ``/etc/nvidia-nri-plugin`` (config
mount point). No shell and no package manager. ``--arch arm64`` uses the arm64 packages and
wheels (the Python files are the same); it is buildable on an amd64 machine (nothing runs the
image's binaries during the build) but not tested here.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGE_DIR = REPO / "deploy" / "image"
FIXED_MTIME = 1704067200  # 2024-01-01T00:00:00Z, every layer entry
FIXED_CREATED = "2024-01-01T00:00:00Z"
SUITES = ("bookworm", "bookworm-updates")
SECURITY_SUITE = "bookworm-security"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = os.environ.get("NRI_IMAGE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("NRI_IMAGE_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
SITE = "usr/lib/python3/dist-packages"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DIRECTORIES = (
    "tmp", "run", "proc", "sys", "dev", "root", "var/lib/nvidia-nri-plugin", "etc/nvidia-nri-plugin",
    "usr/share/nvidia-nri-plugin", "usr/share/doc/nvidia-nri-plugin",
)  # fmt: skip
DROP_PREFIXES = ("usr/share/man/", "usr/share/locale/", "usr/share/lintian/", "usr/share/info/")


@dataclass(frozen=True)
class Arch:
    debian: str
    oci: str
    pip_platforms: tuple[str, ...]


ARCHES = {
    "amd64": Arch("amd64", "amd64", ("manylinux2014_x86_64", "manylinux_2_17_x86_64")),
    "arm64": Arch("arm64", "arm64", ("manylinux2014_aarch64", "manylinux_2_17_aarch64")),
}


def log(msg: str) -> None:
    print(f"build-image: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- Debian packages -----------------------------------------------------------------------------


def apt_options(state: Path, arch: str) -> list[str]:
    return [
        "-o", f"Dir::Etc::SourceList={state}/sources.list",
        "-o", "Dir::Etc::SourceParts=-",
        "-o", f"Dir::Etc::Preferences={state}/preferences",
        "-o", f"Dir::Etc::PreferencesParts={state}/preferences.d",
        "-o", f"Dir::State::Lists={state}/lists",
        "-o", f"Dir::State::status={state}/status",
        "-o", f"Dir::Cache={state}/cache",
        "-o", f"APT::Architecture={arch}",
        "-o", f"APT::Architectures={arch}",
        "-o", "Acquire::Languages=none",
        "-o", "APT::Sandbox::User=root",
        "-o", "Debug::NoLocking=1",
        "-q",
    ]  # fmt: skip


def apt_state(cache: Path, arch: str) -> list[str]:
    """A private apt state for bookworm (+ updates, security); ``apt-get update`` once."""
    state = cache / "apt" / f"bookworm-{arch}"
    for sub in ("lists/partial", "cache/archives/partial", "preferences.d"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    (state / "preferences").touch()
    (state / "status").touch()
    sources = [f"deb [signed-by={KEYRING}] {MIRROR} {s} main" for s in SUITES]
    sources.append(f"deb [signed-by={KEYRING}] {SECURITY_MIRROR} {SECURITY_SUITE} main")
    (state / "sources.list").write_text("\n".join(sources) + "\n")
    opts = apt_options(state, arch)
    stamp = state / "updated.stamp"
    if not stamp.exists() or os.environ.get("NRI_IMAGE_APT_UPDATE"):
        log(f"apt-get update (bookworm, {arch})")
        subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True, text=True)
        stamp.touch()
    return opts


def package_names() -> list[str]:
    lines = (IMAGE_DIR / "debian-packages.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def fetch_debs(cache: Path, arch: str) -> list[Path]:
    """Download the candidate version of every listed package (cached by file name)."""
    opts = apt_state(cache, arch)
    dest = cache / f"debs-{arch}"
    dest.mkdir(parents=True, exist_ok=True)
    debs: list[Path] = []
    for name in package_names():
        policy = subprocess.run(
            ["apt-cache", *opts, "policy", name], check=True, capture_output=True, text=True
        ).stdout
        version = next((ln.split()[1] for ln in policy.splitlines() if "Candidate:" in ln), "(none)")
        if version == "(none)":
            raise SystemExit(
                f"build-image: package {name} is not in bookworm/{arch}; fix deploy/image/debian-packages.txt"
            )
        file_version = version.replace(":", "%3a")
        found = sorted(dest.glob(f"{name}_{file_version}_*.deb"))
        if not found:
            log(f"download {name}={version} ({arch})")
            download = ["apt-get", *opts, "download", f"{name}={version}"]
            subprocess.run(download, cwd=dest, check=True, capture_output=True)
            found = sorted(dest.glob(f"{name}_{file_version}_*.deb"))
        debs.append(found[0])
    return debs


# --- Python ----------------------------------------------------------------------------------------


def fetch_wheels(cache: Path, arch: Arch) -> Path:
    dest = cache / f"wheels-{arch.debian}"
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in arch.pip_platforms for a in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
         "--python-version", "3.11", "--implementation", "cp", *platforms, "--platform", "any",
         "-d", str(dest), "-r", str(IMAGE_DIR / "requirements.txt")],
        check=True,
    )  # fmt: skip
    return dest


def build_project_wheel(out: Path) -> Path:
    subprocess.run([str(REPO / "scripts" / "build-dist"), str(out)], check=True, capture_output=True)
    [wheel] = sorted(out.glob("nvidia_nri_plugin-*-py3-none-any.whl"))
    return wheel


def pip_install(rootfs: Path, wheels: Path, project_wheel: Path, arch: Arch) -> None:
    target = rootfs / SITE
    platforms = [a for p in arch.pip_platforms for a in ("--platform", p)]
    common = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--no-compile",
        "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", *platforms,
        "--platform", "any", "--target", str(target),
    ]  # fmt: skip
    requirements = str(IMAGE_DIR / "requirements.txt")
    subprocess.run([*common, "--find-links", str(wheels), "-r", requirements], check=True)
    subprocess.run([*common, str(project_wheel)], check=True)
    shutil.rmtree(target / "bin", ignore_errors=True)  # console scripts with the build host's shebang
    for meta in target.glob("*.dist-info/direct_url.json"):  # names the build machine's temp path
        meta.unlink()
        record = meta.with_name("RECORD")
        lines = record.read_text().splitlines(keepends=True)
        entry = f"{meta.parent.name}/direct_url.json,"
        record.write_text("".join(ln for ln in lines if not ln.startswith(entry)))


def compile_pyc(rootfs: Path) -> None:
    """``.pyc`` next to every module, unchecked-hash mode (no mtimes: reproducible, and valid
    on a read-only root file system). The build's interpreter must be CPython 3.11 (same magic)."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit(f"build-image: run with CPython 3.11 (the image's), not {sys.version.split()[0]}")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "-j0", "--invalidation-mode", "unchecked-hash",
         "-s", str(rootfs), "-p", "/", "-x", r"/(test|tests|idlelib|lib2to3|turtledemo)/",
         str(rootfs / "usr/lib/python3.11"), str(rootfs / SITE)],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip


# --- the root file system ---------------------------------------------------------------------------

PASSWD = (
    "root:x:0:0:root:/root:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
)
GROUP = "root:x:0:\nnogroup:x:65534:\n"
ENTRYPOINT = IMAGE_DIR / "nvidia-nri-plugin"  # the console script, shared with the Containerfile


def assemble(rootfs: Path, debs: Sequence[Path], inputs: str) -> None:
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(rootfs)], check=True)
    for rel in ("usr/share/doc",):
        for p in sorted((rootfs / rel).glob("*/*")):
            if p.name == "copyright" or p.parent.is_symlink():
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
    for prefix in DROP_PREFIXES:
        shutil.rmtree(rootfs / prefix, ignore_errors=True)
    for d in DIRECTORIES:
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    os.chmod(rootfs / "tmp", 0o1777)
    os.chmod(rootfs / "root", 0o700)
    var_run = rootfs / "var" / "run"
    if var_run.is_dir() and not var_run.is_symlink():
        shutil.rmtree(var_run)
    if not var_run.is_symlink():
        var_run.symlink_to("../run")
    for name, text in (("passwd", PASSWD), ("group", GROUP)):
        (rootfs / "etc" / name).write_text(text)
    python3 = rootfs / "usr/bin/python3"
    if not python3.exists():
        python3.symlink_to("python3.11")
    script = rootfs / "usr/bin/nvidia-nri-plugin"
    script.write_bytes(ENTRYPOINT.read_bytes())
    script.chmod(0o755)
    shutil.copyfile(REPO / "LICENSE", rootfs / "usr/share/doc/nvidia-nri-plugin/LICENSE")
    (rootfs / "usr/share/nvidia-nri-plugin/image-inputs.txt").write_text(inputs)


def _entries(rootfs: Path) -> Iterator[tuple[str, Path]]:
    for dirpath, dirnames, filenames in os.walk(rootfs):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted([*dirnames, *filenames]):
            path = base / name
            yield str(path.relative_to(rootfs)), path


def layer_tar(rootfs: Path) -> bytes:
    """The root file system as one tar: sorted, root-owned, fixed mtime, no hard links."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel, path in sorted(_entries(rootfs)):
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                info.size = st.st_size
                with path.open("rb") as f:
                    tar.addfile(info, f)
    return buf.getvalue()


# --- the OCI archive --------------------------------------------------------------------------------


def _canon(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(arch: Arch, version: str, diff_id: str) -> bytes:
    return _canon(
        {
            "architecture": arch.oci,
            "os": "linux",
            "created": FIXED_CREATED,
            "config": {
                "Entrypoint": ["/usr/bin/nvidia-nri-plugin"],
                "Cmd": ["run"],
                "Env": [
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "PYTHONDONTWRITEBYTECODE=1",
                    "PYTHONUNBUFFERED=1",
                    "LANG=C.UTF-8",
                ],
                "WorkingDir": "/",
                "Labels": {
                    "org.opencontainers.image.title": "nvidia-nri-plugin",
                    "org.opencontainers.image.version": version,
                    "org.opencontainers.image.licenses": "Apache-2.0",
                    "org.opencontainers.image.description": "NVIDIA GPUs for containers via NRI",
                },
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "history": [{"created": FIXED_CREATED, "created_by": "scripts/build-image"}],
        }
    )


def write_archive(out: Path, ref: str, layer: bytes, arch: Arch, version: str) -> str:
    """Write the OCI archive; returns the manifest digest (the image digest)."""
    gz = io.BytesIO()
    with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=6, mtime=0) as g:
        g.write(layer)
    blob = gz.getvalue()
    config = image_config(arch, version, _digest(layer))
    manifest = _canon(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
            "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": _digest(blob), "size": len(blob)}],
        }
    )  # fmt: skip
    index = _canon(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _digest(manifest),
                    "size": len(manifest),
                    "platform": {"architecture": arch.oci, "os": "linux"},
                    "annotations": {
                        "io.containerd.image.name": ref,
                        "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[1],
                    },
                }
            ],
        }
    )

    def path(digest: str) -> str:
        return "blobs/sha256/" + digest.split(":", 1)[1]

    docker = _canon([{"Config": path(_digest(config)), "RepoTags": [ref.removeprefix("docker.io/library/")],
                      "Layers": [path(_digest(blob))]}])  # fmt: skip
    members = [
        ("oci-layout", _canon({"imageLayoutVersion": "1.0.0"})),
        ("index.json", index),
        ("manifest.json", docker),
        (path(_digest(config)), config),
        (path(_digest(manifest)), manifest),
        (path(_digest(blob)), blob),
    ]
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
            tar.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return _digest(manifest)


# --- main ---------------------------------------------------------------------------------------------


def project_version() -> str:
    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def build(arch_name: str, out: Path | None, cache: Path) -> tuple[Path, str, str]:
    arch = ARCHES[arch_name]
    version = project_version()
    ref = f"docker.io/library/nvidia-nri-plugin:{version}"
    debs = fetch_debs(cache, arch.debian)
    wheels = fetch_wheels(cache, arch)
    with tempfile.TemporaryDirectory(prefix="nri-image-") as tmp_s:
        tmp = Path(tmp_s)
        project_wheel = build_project_wheel(tmp / "dist")
        lines = [f"deb {d.name} sha256:{sha256_file(d)}" for d in debs]
        lines += [f"wheel {w.name} sha256:{sha256_file(w)}" for w in sorted(wheels.glob("*.whl"))]
        lines += [f"wheel {project_wheel.name} sha256:{sha256_file(project_wheel)}"]
        inputs = "\n".join([f"nvidia-nri-plugin {version} {arch.oci}", *lines]) + "\n"
        key = hashlib.sha256((inputs + Path(__file__).read_text()).encode()).hexdigest()[:16]
        cached = cache / f"nvidia-nri-plugin-{version}-{arch.oci}-{key}.oci.tar"
        if not cached.exists():
            rootfs = tmp / "rootfs"
            rootfs.mkdir()
            log(f"assembling the root file system ({len(debs)} packages)")
            assemble(rootfs, debs, inputs)
            pip_install(rootfs, wheels, project_wheel, arch)
            compile_pyc(rootfs)
            write_archive(cached, ref, layer_tar(rootfs), arch, version)
    digest = _read_digest(cached)
    if out is not None and out.resolve() != cached.resolve():
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cached, out)
        return out, ref, digest
    return cached, ref, digest


def _read_digest(archive: Path) -> str:
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        return str(json.loads(member.read())["manifests"][0]["digest"])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/build-image", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=sorted(ARCHES), default="amd64")
    p.add_argument("--out", type=Path, help="copy the archive here (default: print the cached one)")
    default_cache = Path(os.environ.get("NRI_IMAGE_CACHE", REPO / ".cache" / "image"))
    p.add_argument("--cache", type=Path, default=default_cache)
    args = p.parse_args(argv)
    archive, ref, digest = build(args.arch, args.out, args.cache.resolve())
    print(json.dumps({"archive": str(archive), "ref": ref, "digest": digest, "arch": args.arch}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Where ``scripts/fetch-e2e-deps`` put the end-to-end binaries, and a check that they are there."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO_ROOT / "scripts" / "fetch-e2e-deps"
CRI_PROTO_REL = "usr/share/gocode/src/k8s.io/cri-api/pkg/apis/runtime/v1/api.proto"

CONTAINERD_VERSIONS = ("1.7", "2.1")


class E2EDepsMissing(RuntimeError):
    """A downloaded e2e dependency is missing: run scripts/fetch-e2e-deps."""


def cache_dir() -> Path:
    return Path(os.environ.get("NRI_E2E_CACHE", REPO_ROOT / ".cache" / "e2e"))


@dataclass(frozen=True)
class ContainerdBinaries:
    version_line: str  # "1.7" or "2.1"
    bin_dir: Path  # holds containerd, ctr, containerd-shim-runc-v2
    package_version: str  # the Debian version that was downloaded, e.g. 1.7.24~ds1-6+deb13u1

    @property
    def containerd(self) -> Path:
        return self.bin_dir / "containerd"

    @property
    def ctr(self) -> Path:
        return self.bin_dir / "ctr"


@dataclass(frozen=True)
class E2EDeps:
    cache: Path
    containerd: dict[str, ContainerdBinaries]
    runc: Path
    busybox_binary: Path
    cri_proto: Path
    rhel_glibc_root: Path

    @classmethod
    def locate(cls) -> E2EDeps:
        """Find every dependency or raise :class:`E2EDepsMissing` naming what is missing."""
        cache = cache_dir()
        ctrd: dict[str, ContainerdBinaries] = {}
        for line in CONTAINERD_VERSIONS:
            root = cache / f"containerd-{line}"
            version_file = root / "VERSION"
            version = version_file.read_text().strip() if version_file.is_file() else "?"
            ctrd[line] = ContainerdBinaries(line, root / "root" / "usr" / "bin", version)
        deps = cls(
            cache=cache,
            containerd=ctrd,
            runc=cache / "runc" / "root" / "usr" / "sbin" / "runc",
            busybox_binary=cache / "busybox" / "root" / "bin" / "busybox",
            cri_proto=cache / "cri-api" / "root" / CRI_PROTO_REL,
            rhel_glibc_root=cache / "libc6-amd64" / "root",
        )
        required = [
            deps.runc,
            deps.busybox_binary,
            deps.cri_proto,
            deps.rhel_glibc_root / "lib64" / "libc.so.6",
        ]
        for b in ctrd.values():
            required += [
                b.containerd,
                b.ctr,
                b.bin_dir / "containerd-shim-runc-v2",
                b.bin_dir.parents[2] / "VERSION",
            ]
        missing = [str(p) for p in required if not p.exists()]
        if missing:
            raise E2EDepsMissing(
                f"end-to-end dependencies missing under {cache} (NRI_E2E_CACHE): {', '.join(missing)}; "
                f"run {FETCH_SCRIPT} (as root, needs deb.debian.org) to download them"
            )
        return deps

"""Packaging: the sdist and the wheel build offline, install, and carry what a node needs.

``scripts/build-dist`` builds both; each is then installed with pip (``--no-deps --target``: the
dependencies are this venv's) into its own directory, and the installed package is imported from
there in a fresh interpreter with ``-I`` so the work tree cannot shadow it.
"""

from __future__ import annotations

import email
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import nri_plugin

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    build = [str(REPO / "scripts" / "build-dist"), str(out)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    return out


def _one(dist: Path, pattern: str) -> Path:
    [path] = dist.glob(pattern)
    return path


def _install_and_run(archive: Path, target: Path) -> str:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(archive)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = [p for p in sys.path if p.endswith("site-packages")]
    code = (
        "import sys; sys.path[:0] = sys.argv[1:]; import nri_plugin; from nri_plugin.cli import main; "
        "from nri_plugin.wire import api; print(nri_plugin.__file__, nri_plugin.__version__)"
    )
    argv = [sys.executable, "-I", "-c", code, str(target), *site]
    res = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
    return res.stdout


def test_version_is_one_value() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["version"] == nri_plugin.__version__
    assert (REPO / "CHANGELOG.md").read_text().split("\n## ", 2)[1].startswith(project["version"] + " ")
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (REPO / "LICENSE").read_text()[:200]
    assert all(url.startswith("https://") for url in project["urls"].values())


def test_wheel_installs_and_carries_metadata_and_data(dist: Path, tmp_path: Path) -> None:
    wheel = _one(dist, "nvidia_nri_plugin-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = email.message_from_bytes(z.read(info))
        entry_points = z.read(info.replace("METADATA", "entry_points.txt")).decode()
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Version"] == nri_plugin.__version__
    runtime = [r for r in meta.get_all("Requires-Dist") or [] if "extra ==" not in r]
    assert not [r for r in runtime if r.startswith("psutil")], runtime  # metrics need no psutil
    assert {"nri_plugin/py.typed", "nri_plugin/wire/proto/api.proto", "nri_plugin/wire/_gen/api_pb2.py"} <= (
        names
    )
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert "nvidia-nri-plugin = nri_plugin.cli:main" in entry_points
    out = _install_and_run(wheel, tmp_path / "w")
    assert out.startswith(str(tmp_path / "w")) and out.split()[1] == nri_plugin.__version__


def test_sdist_is_complete_and_installs(dist: Path, tmp_path: Path) -> None:
    import tarfile

    sdist = _one(dist, "nvidia_nri_plugin-*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    assert {"LICENSE", "README.md", "pyproject.toml", "nri_plugin/wire/proto/api.proto"} <= names
    out = _install_and_run(sdist, tmp_path / "s")
    assert out.startswith(str(tmp_path / "s"))

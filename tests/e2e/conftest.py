"""pytest fixtures of the end-to-end tests (see ``containerd.py`` for the building blocks).

Fixtures:

``e2e_deps``        session: the downloaded binaries (FAILS, never skips, when missing:
                    run ``scripts/fetch-e2e-deps``).
``cri_modules``     session: generated CRI stubs.
``e2e_base``        session: a short private temp dir (``/tmp/nri-e2e-XXXX``; socket paths stay
                    short), removed at the end when nothing is mounted below it.
``e2e_images``      session: the image archives (busybox, pause, debian-layout, rhel-layout).
``containerd``      session, parametrized ``ctrd17`` / ``ctrd21``: a running private containerd
                    with the images imported. A test may stop/kill/restart it; the next test gets
                    it running again (``ensure_running``).
``cri``             function: ``containerd.cri``; every pod left over is removed after the test.
``make_containerd`` function: factory for extra private instances (e.g. with a runtime-launched
                    plugin installed before start); all are shut down after the test.
``nri_test_device`` session: a char device node ``c 1 3`` (a /dev/null twin) in ``e2e_base``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from .containerd import Containerd, _mounts_under
from .cri import CriClient, CriModules, load_cri
from .deps import CONTAINERD_VERSIONS, E2EDeps, E2EDepsMissing, cache_dir
from .images import BuiltImages, build_images

VERSION_IDS = {"1.7": "ctrd17", "2.1": "ctrd21"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def pytest_report_header() -> list[str]:
    lines = []
    for v in CONTAINERD_VERSIONS:
        f = cache_dir() / f"containerd-{v}" / "VERSION"
        lines.append(f"e2e containerd {v}: {f.read_text().strip() if f.is_file() else 'not downloaded'}")
    return lines


@pytest.fixture(scope="session")
def e2e_deps() -> E2EDeps:
    if os.geteuid() != 0:
        pytest.fail("the end-to-end tests start containerd and runc: run them as root", pytrace=False)
    try:
        return E2EDeps.locate()
    except E2EDepsMissing as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def cri_modules(e2e_deps: E2EDeps) -> CriModules:
    return load_cri(e2e_deps.cri_proto, e2e_deps.cache / "cri_gen")


@pytest.fixture(scope="session")
def e2e_base() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="nri-e2e-", dir="/tmp"))
    yield base
    if not _mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def e2e_images(e2e_deps: E2EDeps, e2e_base: Path) -> BuiltImages:
    return build_images(e2e_deps, e2e_base / "images")


@pytest.fixture(scope="session")
def nri_test_device(e2e_base: Path) -> Path:
    node = e2e_base / "nri-test0"
    if not node.exists():
        os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
    return node


MakeContainerd = Callable[..., Containerd]


def _new_containerd(
    version: str, workdir: Path, deps: E2EDeps, modules: CriModules, images: BuiltImages, **kwargs: Any
) -> Containerd:
    ctrd = Containerd(version, workdir, deps, modules, sandbox_image=images.refs["pause"], **kwargs)
    return ctrd


def _start_with_images(ctrd: Containerd, images: BuiltImages) -> None:
    ctrd.start()
    for archive in images.archives.values():
        ctrd.import_image(archive)


@pytest.fixture(
    scope="session", params=CONTAINERD_VERSIONS, ids=[VERSION_IDS[v] for v in CONTAINERD_VERSIONS]
)
def containerd(
    request: pytest.FixtureRequest,
    e2e_deps: E2EDeps,
    cri_modules: CriModules,
    e2e_base: Path,
    e2e_images: BuiltImages,
) -> Iterator[Containerd]:
    version: str = request.param
    ctrd = _new_containerd(version, e2e_base / VERSION_IDS[version], e2e_deps, cri_modules, e2e_images)
    try:
        _start_with_images(ctrd, e2e_images)
        yield ctrd
    finally:
        ctrd.shutdown()


@pytest.fixture
def cri(containerd: Containerd) -> Iterator[CriClient]:
    containerd.ensure_running()
    yield containerd.cri
    containerd.ensure_running()
    containerd.cri.remove_all()


@pytest.fixture
def make_containerd(
    e2e_deps: E2EDeps, cri_modules: CriModules, e2e_base: Path, e2e_images: BuiltImages
) -> Iterator[MakeContainerd]:
    made: list[Containerd] = []

    def make(
        version: str,
        *,
        start: bool = True,
        setup: Callable[[Containerd], None] | None = None,
        extra_config: Mapping[str, Any] | None = None,
    ) -> Containerd:
        workdir = Path(tempfile.mkdtemp(prefix=f"x{VERSION_IDS[version][-2:]}-", dir=e2e_base))
        ctrd = _new_containerd(version, workdir, e2e_deps, cri_modules, e2e_images, extra_config=extra_config)
        made.append(ctrd)
        if setup is not None:
            setup(ctrd)
        if start:
            _start_with_images(ctrd, e2e_images)
        return ctrd

    yield make
    for ctrd in made:
        ctrd.shutdown()

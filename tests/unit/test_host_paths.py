"""resolve_in_root: symlinks are followed inside the root and can never lead out of it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.paths import relative_to_root, resolve_in_root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "usr/lib").mkdir(parents=True)
    (r / "usr/lib/libreal.so.1.2").write_text("x")
    (r / "etc").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret").write_text("host secret")
    return r


def test_plain_paths(root: Path) -> None:
    assert resolve_in_root(str(root), "/usr/lib/libreal.so.1.2") == str(root / "usr/lib/libreal.so.1.2")
    assert resolve_in_root(str(root), "usr/lib/libreal.so.1.2") == str(root / "usr/lib/libreal.so.1.2")
    assert resolve_in_root(str(root), "/") == str(root)
    assert resolve_in_root(str(root), "") == str(root)
    assert resolve_in_root(str(root), "/usr/./lib//") == str(root / "usr/lib")


def test_missing_components_are_kept(root: Path) -> None:
    assert resolve_in_root(str(root), "/no/such/file") == str(root / "no/such/file")


def test_relative_symlink_chain(root: Path) -> None:
    lib = root / "usr/lib"
    (lib / "libreal.so.1").symlink_to("libreal.so.1.2")
    (lib / "libreal.so").symlink_to("libreal.so.1")
    assert resolve_in_root(str(root), "/usr/lib/libreal.so") == str(lib / "libreal.so.1.2")


def test_absolute_symlink_is_rerooted(root: Path) -> None:
    (root / "etc/link").symlink_to("/usr/lib/libreal.so.1.2")
    assert resolve_in_root(str(root), "/etc/link") == str(root / "usr/lib/libreal.so.1.2")


def test_absolute_symlink_to_host_file_stays_inside(root: Path, tmp_path: Path) -> None:
    (root / "etc/escape").symlink_to(str(tmp_path / "outside/secret"))
    got = resolve_in_root(str(root), "/etc/escape")
    assert got == str(root / tmp_path.relative_to("/") / "outside/secret")
    assert not os.path.exists(got)


def test_dotdot_is_clamped_at_root(root: Path) -> None:
    assert resolve_in_root(str(root), "/../../../etc") == str(root / "etc")
    (root / "etc/up").symlink_to("../../../../outside/secret")
    assert resolve_in_root(str(root), "/etc/up") == str(root / "outside/secret")


def test_symlinked_directory_in_the_middle(root: Path) -> None:
    (root / "lib64").symlink_to("usr/lib")
    (root / "usr/lib/nvidia").symlink_to("/lib64")  # points back at itself through the root
    assert resolve_in_root(str(root), "/lib64/libreal.so.1.2") == str(root / "usr/lib/libreal.so.1.2")
    assert resolve_in_root(str(root), "/lib64/nvidia/libreal.so.1.2") == str(root / "usr/lib/libreal.so.1.2")


def test_symlink_loop_raises_naming_the_path(root: Path) -> None:
    (root / "etc/a").symlink_to("b")
    (root / "etc/b").symlink_to("/etc/a")
    with pytest.raises(HostDiscoveryError, match=r"too many levels of symbolic links .*'/etc/a/x'"):
        resolve_in_root(str(root), "/etc/a/x")


def test_self_loop(root: Path) -> None:
    (root / "etc/self").symlink_to("self")
    with pytest.raises(HostDiscoveryError, match="symlink loop"):
        resolve_in_root(str(root), "etc/self")


def test_file_used_as_directory(root: Path) -> None:
    assert resolve_in_root(str(root), "/usr/lib/libreal.so.1.2/x") == str(root / "usr/lib/libreal.so.1.2/x")


def test_empty_root_rejected() -> None:
    with pytest.raises(HostDiscoveryError, match="root directory is empty"):
        resolve_in_root("", "/etc")


def test_relative_to_root(root: Path) -> None:
    assert relative_to_root(str(root), str(root / "usr/lib")) == "/usr/lib"
    assert relative_to_root(str(root), str(root)) == "/"
    with pytest.raises(HostDiscoveryError, match="not inside root"):
        relative_to_root(str(root), "/etc/passwd")


_names = st.sampled_from(["a", "b", "c", "..", ".", "d"])
_targets = st.lists(_names, min_size=0, max_size=4).flatmap(
    lambda parts: st.sampled_from(["", "/"]).map(lambda lead: lead + "/".join(parts))
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    links=st.dictionaries(st.sampled_from(["a", "b", "c", "d/e"]), _targets, max_size=4),
    query=st.lists(_names, min_size=0, max_size=6),
)
def test_property_never_escapes(
    tmp_path_factory: pytest.TempPathFactory, links: dict[str, str], query: list[str]
) -> None:
    base = tmp_path_factory.mktemp("prop")
    root = base / "root"
    (root / "d").mkdir(parents=True)
    for name, target in links.items():
        (root / name).symlink_to(target or ".")
    try:
        got = resolve_in_root(str(root), "/".join(query))
    except HostDiscoveryError as exc:
        assert "symbolic links" in str(exc)
        return
    assert got == str(root) or got.startswith(str(root) + "/")
    # Every existing prefix of the result is a real directory or file reached without leaving the root.
    real = os.path.realpath(got)
    if os.path.exists(got):
        assert real == os.path.realpath(root) or real.startswith(os.path.realpath(root) + "/")

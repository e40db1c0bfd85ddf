"""Pinning mount sources: what discovery checked is what containerd gets, or the container fails.

The plugin hands containerd *path strings*; runc resolves them when the container starts. A path
that discovery resolved safely inside the driver root (``resolve_in_root``) can be changed
afterwards: a compromised driver container (CVE-2024-0132 class) replaces ``libcuda.so.<ver>`` by a
symlink to a host file, or an in-place driver upgrade deletes the file. So discovery *pins* every
mount source: it records the device and inode of each path component from the root down to the file,
and the file's ctime (:func:`pin`); every component below the root must be a real directory (no
symlink) and the file itself of the expected type. The CreateContainer hot path re-checks the pins
of exactly the sources of that container's adjustment with one ``lstat`` each (:func:`verify`, a few
microseconds per path: see ``bench/bench.py``). A mismatch fails the container with
:class:`~nri_plugin.errors.DriverChangedError` and triggers rediscovery.

What this guarantees: at the moment the plugin answers containerd, every mount source is the very
inode discovery checked, reached through no symlink below its root. What it cannot: a swap between
that answer and runc's mount (at container start) is not seen by the plugin -- the window is
bounded by the container's start, not by the plugin's lifetime as before, and the watch loop
(``HostDriver.changed``) re-checks all pins every refresh interval as well.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable

from nri_plugin.errors import HostDiscoveryError
from nri_plugin.host.model import FileId
from nri_plugin.host.paths import resolve_in_root

# A directory modified (mtime) less than this ago: pin its files as well -- on a file system with
# coarse timestamps a second change in the same tick would not move its ctime stamp.
RECENT_NS = 2_000_000_000

_KIND = {
    stat.S_IFREG: "a regular file",
    stat.S_IFDIR: "a directory",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
}


def kind_name(fmt: int) -> str:
    return _KIND.get(fmt, f"file type {fmt:#o}")


def _stamp(fmt: int, st: os.stat_result) -> int:
    # ctime, not mtime: it changes with every entry added, removed or renamed in a directory (and
    # with every write or chmod of a file), and no one can set it back -- a root attacker can reset
    # an mtime with utimensat() after swapping an entry.
    return st.st_ctime_ns


def _file_id(
    path: str, st: os.stat_result, *, follow: bool = False, stamped: bool = False, owner: bool = False
) -> FileId:
    fmt = stat.S_IFMT(st.st_mode)
    stamp = _stamp(fmt, st) if stamped else 0
    uid = st.st_uid if owner else -1
    return FileId(path=path, dev=st.st_dev, ino=st.st_ino, fmt=fmt, stamp_ns=stamp, follow=follow, uid=uid)


def pin(root: str, host_path: str, *, by_directory: bool = False) -> tuple[FileId, ...]:
    """The chain of :class:`FileId` from ``root`` (followed: a configured root may be a symlink)
    down to ``host_path`` (not followed), which must lie below ``root``.

    ``by_directory``: the file is pinned through its directory -- the chain ends at the directory,
    stamped with its ctime, so that one check covers every driver file in it (any swap of an entry
    changes the directory). Otherwise (IPC entries, which live in busy directories such as /tmp)
    the chain ends at the entry itself, *unstamped*: containers write to IPC entries (they are
    mounted read-write), which changes their times, so only inode and type are compared.

    Raises :class:`HostDiscoveryError` when a component below the root is a symlink or not a
    directory, or cannot be read.
    """
    root = os.path.abspath(root)
    rel = os.path.relpath(host_path, root)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        raise HostDiscoveryError(f"mount source {host_path!r} is not below its root {root!r}")
    try:
        chain = [_file_id(root, os.stat(root), follow=True)]
        current = root
        parts = rel.split(os.sep)
        for i, part in enumerate(parts):
            current = os.path.join(current, part)
            st = os.lstat(current)
            last = i == len(parts) - 1
            if stat.S_ISLNK(st.st_mode) or (not last and not stat.S_ISDIR(st.st_mode)):
                raise HostDiscoveryError(
                    f"mount source {host_path!r}: {current!r} is {kind_name(stat.S_IFMT(st.st_mode))}, "
                    "expected a real directory or file (symlinks are resolved before pinning)"
                )
            if last and by_directory:
                dir_st = os.lstat(chain[-1].path)
                chain[-1] = _file_id(chain[-1].path, dir_st, stamped=True)
                if time.time_ns() - dir_st.st_mtime_ns < RECENT_NS:
                    # Changed just now: on a file system with coarse timestamps another change in
                    # the same tick would not move the mtime, so the file is pinned as well.
                    chain.append(_file_id(current, st, stamped=True))
            else:
                chain.append(_file_id(current, st, owner=last))
    except OSError as exc:
        raise HostDiscoveryError(f"cannot pin mount source {host_path!r}: {exc.strerror}") from exc
    return tuple(chain)


ABSENT = 0  # FileId.fmt of a path that did not exist when it was pinned


def pin_resolution(root: str, path: str) -> tuple[FileId, ...]:
    """Pins of what ``path`` (inside ``root``) resolves through: every symlink on the way and the
    final path, which may be absent (``fmt`` :data:`ABSENT`). For paths discovery looked at and
    rejected (a library candidate that was a dangling link or had the wrong version): when one of
    them changes, a rediscovery may find what is missing now. Unreadable paths give no pins."""
    links: list[FileId] = []

    def on_link(link: str, st: os.stat_result) -> None:
        links.append(_file_id(link, st))

    try:
        final = resolve_in_root(root, path, on_link=on_link)
        try:
            links.append(_file_id(final, os.lstat(final)))
        except FileNotFoundError:
            links.append(FileId(path=final, dev=0, ino=0, fmt=ABSENT))
    except (OSError, HostDiscoveryError):
        return ()
    return tuple(links)


def check(pinned: FileId) -> str | None:
    """``None`` when ``pinned.path`` is still the pinned inode, else what it is now (for errors)."""
    try:
        st = os.stat(pinned.path) if pinned.follow else os.lstat(pinned.path)
    except OSError as exc:
        if pinned.fmt == ABSENT and isinstance(exc, FileNotFoundError):
            return None
        return f"{pinned.path} is gone ({exc.strerror})"
    if pinned.fmt == ABSENT:
        return f"{pinned.path} appeared"
    fmt = stat.S_IFMT(st.st_mode)
    if fmt != pinned.fmt:
        return f"{pinned.path} is now {kind_name(fmt)}, was {kind_name(pinned.fmt)}"
    if st.st_ino != pinned.ino or st.st_dev != pinned.dev:
        return f"{pinned.path} was replaced (inode {pinned.dev}:{pinned.ino} -> {st.st_dev}:{st.st_ino})"
    if pinned.uid >= 0 and st.st_uid != pinned.uid:
        return f"{pinned.path} changed owner (uid {st.st_uid}, was {pinned.uid})"
    if pinned.stamp_ns and _stamp(fmt, st) != pinned.stamp_ns:
        what = "entries were added, removed or replaced" if fmt == stat.S_IFDIR else "it was modified"
        return f"{pinned.path} changed ({what})"
    return None


def verify(checks: Iterable[FileId]) -> str | None:
    """The first pin in ``checks`` that no longer holds, described; ``None`` when all hold."""
    for pinned in checks:
        problem = check(pinned)
        if problem is not None:
            return problem
    return None


def hot_path_checks(chains: Iterable[tuple[FileId, ...]]) -> tuple[FileId, ...]:
    """The pins CreateContainer re-checks: the last of each chain (the directory holding driver
    files, an IPC entry, or a recently changed file itself), each once. The directories on the way
    need no check of their own there: ``lstat`` of the last path resolves through them as runc
    will, so an ancestor swapped for a symlink to other files yields another inode and is caught;
    one that leads to the very same inode mounts the very same files. The watch loop still checks
    every pin of the chains."""
    return unique_checks((chain[-1],) for chain in chains if chain)


def unique_checks(chains: Iterable[tuple[FileId, ...]]) -> tuple[FileId, ...]:
    """All pins of ``chains`` once each, in first-seen order (shared directories are checked once;
    a directory pinned for its files and also on the way to another wins with its stamp)."""
    seen: dict[str, FileId] = {}
    for chain in chains:
        for pinned in chain:
            known = seen.get(pinned.path)
            if known is None or (pinned.stamp_ns and not known.stamp_ns):
                seen[pinned.path] = pinned
    return tuple(seen.values())

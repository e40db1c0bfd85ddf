"""Resolve paths inside a root directory without ever leaving it.

Every file the host layer reads lives below a configured root (driver root, dev root, proc root, ...).
A symlink found below such a root is interpreted *as if the root were ``/``*: an absolute target is
re-rooted at the root and ``..`` never climbs above it. This is the rule of ``securejoin`` /
``openat2(RESOLVE_IN_ROOT)``; it keeps a crafted driver tree (e.g. a container image mounted as
``/run/nvidia/driver``) from pointing us at arbitrary host files.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from nri_plugin.errors import HostDiscoveryError

# Same budget as the kernel's path walk (MAXSYMLINKS is 40) -- enough for any sane library chain.
MAX_SYMLINKS = 40


LinkCheck = Callable[[str, os.stat_result], None]
"""Called with each symlink met while resolving (its path and ``lstat``); raises to refuse it."""


def resolve_in_root(root: str, path: str, on_link: LinkCheck | None = None) -> str:
    """Return the host path that ``path`` denotes inside ``root``, following symlinks inside ``root``.

    ``path`` may be absolute or relative (both are taken relative to ``root``). Components that do not
    exist are appended unresolved, so the result can name a file that does not exist yet; it is always
    ``root`` itself or a path below it. Raises :class:`HostDiscoveryError` on a symlink loop, and
    whatever ``on_link`` raises for a symlink it refuses.
    """
    if not root:
        raise HostDiscoveryError("root directory is empty: configure an absolute root such as '/'")
    root = os.path.abspath(root)
    pending = [c for c in path.split("/") if c not in ("", ".")]
    pending.reverse()  # a stack: the next component to walk is pending[-1]
    resolved: list[str] = []
    links = 0
    while pending:
        comp = pending.pop()
        if comp == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, comp)
        try:
            st = os.lstat(candidate)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                resolved.append(comp)
                continue
            raise HostDiscoveryError(
                f"cannot inspect {candidate!r} while resolving {path!r} inside root {root!r}: "
                f"{exc.strerror}; check the permissions of the root"
            ) from exc
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(comp)
            continue
        if on_link is not None:
            on_link(candidate, st)
        links += 1
        if links > MAX_SYMLINKS:
            raise HostDiscoveryError(
                f"too many levels of symbolic links (> {MAX_SYMLINKS}) resolving {path!r} inside root "
                f"{root!r}: fix the symlink loop at {candidate!r}"
            )
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = []
        parts = [c for c in target.split("/") if c not in ("", ".")]
        pending.extend(reversed(parts))
    return os.path.join(root, *resolved) if resolved else root


def _inside(root: str, host_path: str) -> str | None:
    """``/<path inside root>`` for a path below ``root``; ``None`` when it is outside."""
    rel = os.path.relpath(os.path.normpath(host_path), os.path.abspath(root))
    if rel == os.curdir:
        return "/"
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return "/" + rel


def relative_to_root(root: str, host_path: str) -> str:
    """Inverse of :func:`resolve_in_root` for a resolved path: ``/<path inside root>``."""
    inside = _inside(root, host_path)
    if inside is None:
        raise HostDiscoveryError(f"path {host_path!r} is not inside root {os.path.abspath(root)!r}")
    return inside


def strip_root(root: str, host_path: str) -> str:
    """``host_path`` as seen with ``root`` as ``/``; unchanged when it lies outside ``root``."""
    inside = _inside(root, host_path)
    return host_path if inside is None else inside

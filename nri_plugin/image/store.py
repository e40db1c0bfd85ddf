"""The generated caches on the host: one file per container, under the plugin's state directory.

Layout (``<state>`` = ``nri-plugin.state-dir``, created 0700, root-owned):

* ``<state>/ldcache/content/<sha256>``: each distinct generated cache once (0444); containers of
  the same image and request share it;
* ``<state>/ldcache/containers/<container id>``: a hard link to it: the bind-mount source of that
  container's ``/etc/ld.so.cache``;
* ``<state>/ldcache/containers/<container id>.json``: which path was taken and why (``inspect
  --container-id`` shows it).

A container's link and record are removed at RemoveContainer/StopContainer, and at Synchronize for
containers that no longer exist; a content file goes with its last link. Disk use is therefore at
most one content file per distinct (image, request) among the live GPU containers, each at most a
few hundred KiB. Container ids are checked (``[A-Za-z0-9_.-]``, no leading dot) before they
become file names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable

from nri_plugin.errors import ImageReadError

_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class CacheStore:
    """The files of ``<state_dir>/ldcache``."""

    def __init__(self, state_dir: str) -> None:
        self.base = os.path.join(state_dir, "ldcache")
        self.content = os.path.join(self.base, "content")
        self.containers = os.path.join(self.base, "containers")

    def prepare(self) -> None:
        """Create the directories (the daemon does at start; a fallback record is only written
        once they exist, so tools and tests that never start the daemon write nothing)."""
        self._ensure()

    def _ensure(self) -> None:
        for d in (os.path.dirname(self.base), self.base, self.content, self.containers):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def path_of(self, container_id: str) -> str:
        if not _ID.fullmatch(container_id):
            raise ImageReadError(
                f"container id {container_id!r} cannot name a file; not generating its cache"
            )
        return os.path.join(self.containers, container_id)

    def put(self, container_id: str, digest: str, data: bytes, record: dict[str, object]) -> str:
        """Store ``data`` (sha256 ``digest``) for the container; returns the bind-mount source."""
        target = self.path_of(container_id)
        try:
            self._ensure()
            content = os.path.join(self.content, digest)
            if not os.path.exists(content):
                tmp = f"{content}.{os.getpid()}.tmp"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                os.replace(tmp, content)
            link_tmp = f"{target}.{os.getpid()}.tmp"
            if os.path.lexists(link_tmp):
                os.unlink(link_tmp)
            os.link(content, link_tmp)
            os.replace(link_tmp, target)
            self.write_record(container_id, record)
        except OSError as exc:
            raise ImageReadError(
                f"cannot write the generated ld.so.cache under {self.base!r}: {exc.strerror}; check "
                "nri-plugin.state-dir (a root-owned directory on a local file system)"
            ) from exc
        return target

    def write_record(self, container_id: str, record: dict[str, object]) -> None:
        """Record which path was taken for the container (also for a fallback)."""
        path = self.path_of(container_id) + ".json"
        if not os.path.isdir(self.containers):
            return
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, sort_keys=True)
        os.replace(tmp, path)

    def read_record(self, container_id: str) -> dict[str, object] | None:
        try:
            with open(self.path_of(container_id) + ".json", encoding="utf-8") as f:
                value = json.load(f)
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def remove(self, container_id: str) -> bool:
        """Remove the container's files; True if there were any."""
        if not _ID.fullmatch(container_id):
            return False
        path = os.path.join(self.containers, container_id)
        removed = False
        content = None
        record = self.read_record(container_id) or {}
        digest = record.get("digest")
        if isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest):
            content = os.path.join(self.content, digest)
        else:
            try:
                found = _digest_of(self.content, os.lstat(path).st_ino)
                content = os.path.join(self.content, found) if found else None
            except OSError:
                pass
        for p in (path, path + ".json"):
            try:
                os.unlink(p)
                removed = True
            except FileNotFoundError:
                pass
        if content is not None:
            self._drop_if_unused(content)
        return removed

    def _drop_if_unused(self, content: str) -> None:
        try:
            if os.lstat(content).st_nlink <= 1:
                os.unlink(content)
        except OSError:
            pass

    def live(self) -> list[str]:
        """Ids of the containers that have files."""
        try:
            names = os.listdir(self.containers)
        except OSError:
            return []
        return sorted({n.removesuffix(".json") for n in names if not n.endswith(".tmp")})

    def sync(self, existing: Iterable[str]) -> list[str]:
        """Remove the files of every container not in ``existing``, and unused content and
        temporary files; returns the removed container ids."""
        keep = set(existing)
        gone = [cid for cid in self.live() if cid not in keep]
        for cid in gone:
            self.remove(cid)
        for d in (self.containers, self.content):
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for n in names:
                if n.endswith(".tmp"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(d, n))
                elif d == self.content:
                    self._drop_if_unused(os.path.join(d, n))
        return gone


def _digest_of(content_dir: str, inode: int) -> str:
    """The content file name with inode ``inode`` ("" if none)."""
    try:
        with os.scandir(content_dir) as it:
            for entry in it:
                if entry.inode() == inode:
                    return entry.name
    except OSError:
        pass
    return ""

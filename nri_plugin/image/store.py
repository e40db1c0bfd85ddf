"""The generated caches on the host: one file per container, under the plugin's state directory.

Layout (``<state>`` = ``nri-plugin.runtime-dir``, created 0700, root-owned):

* ``<state>/ldcache/content/<sha256>``: each distinct generated cache once (0444), and next to it
  ``<sha256>.json``, how it was made; containers of the same image and request share both;
* ``<state>/ldcache/containers/<container id>``: a hard link to the content file: the bind-mount
  source of that container's ``/etc/ld.so.cache``;
* ``<state>/ldcache/containers/<container id>.json``: for a container that fell back, why.

``inspect --container-id`` reads the container's record (its own, or its content's). Per GPU
container the hot path costs one ``link`` (and, for a new image, one file and its record); a
fallback costs one small file.

A container's files are removed at RemoveContainer/StopContainer, and at Synchronize for
containers that no longer exist; a content file (and its record) goes with its last link. Disk
use is therefore at most one content file per distinct (image, request) among the live GPU
containers, each at most a few hundred KiB. Container ids are checked (``[A-Za-z0-9_.-]``, no
leading dot) before they become file names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Iterable

from nri_plugin.errors import ImageReadError

_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, _FLAGS, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class CacheStore:
    """The files of ``<state_dir>/ldcache``."""

    def __init__(self, state_dir: str) -> None:
        self.base = os.path.join(state_dir, "ldcache")
        self.content = os.path.join(self.base, "content")
        self.containers = os.path.join(self.base, "containers")
        self._ready = False
        self._digests: dict[str, str] = {}  # container id -> content digest (this process's puts)
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Create the directories (the daemon does at start; a fallback record is only written
        once they exist, so tools and tests that never start the daemon write nothing)."""
        for d in (os.path.dirname(self.base), self.base, self.content, self.containers):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self._ready = True

    def path_of(self, container_id: str) -> str:
        if not _ID.fullmatch(container_id):
            raise ImageReadError(
                f"container id {container_id!r} cannot name a file; not generating its cache"
            )
        return os.path.join(self.containers, container_id)

    def put(self, container_id: str, digest: str, data: bytes, record: dict[str, object]) -> str:
        """Store ``data`` (sha256 ``digest``) for the container; returns the bind-mount source."""
        target = self.path_of(container_id)
        content = os.path.join(self.content, digest)
        try:
            if not self._ready:
                self.prepare()
            if not os.path.exists(content):
                tmp = f"{content}.{os.getpid()}.{threading.get_ident()}.tmp"
                _write(tmp, data, 0o444)
                _write(content + ".json", json.dumps(record, sort_keys=True).encode(), 0o600)
                os.replace(tmp, content)
            try:
                os.link(content, target)
            except FileExistsError:  # a re-created container id: replace its old link
                os.unlink(target)
                os.link(content, target)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target + ".json")  # an earlier fallback record of the same id
        except OSError as exc:
            raise ImageReadError(
                f"cannot write the generated ld.so.cache under {self.base!r}: {exc.strerror}; check "
                "nri-plugin.runtime-dir (a root-owned directory on a local file system)"
            ) from exc
        with self._lock:
            self._digests[container_id] = digest
        return target

    def write_record(self, container_id: str, record: dict[str, object]) -> None:
        """Record a fallback for the container (skipped while the directories do not exist)."""
        path = self.path_of(container_id) + ".json"
        if not os.path.isdir(self.containers):
            return
        _write(path, json.dumps(record, sort_keys=True).encode(), 0o600)

    def _digest_of(self, container_id: str) -> str:
        with self._lock:
            known = self._digests.get(container_id)
        if known is not None:
            return known
        try:
            inode = os.lstat(os.path.join(self.containers, container_id)).st_ino
            with os.scandir(self.content) as it:
                for entry in it:
                    if _DIGEST.fullmatch(entry.name) and entry.inode() == inode:
                        return entry.name
        except OSError:
            pass
        return ""

    def read_record(self, container_id: str) -> dict[str, object] | None:
        """How the container's cache was made (or why it fell back); None if unknown."""
        path = self.path_of(container_id)
        candidates = [path + ".json"]
        digest = self._digest_of(container_id)
        if digest:
            candidates.insert(0, os.path.join(self.content, digest + ".json"))
        for candidate in candidates:
            try:
                with open(candidate, encoding="utf-8") as f:
                    value = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(value, dict):
                return value
        return None

    def remove(self, container_id: str) -> bool:
        """Remove the container's files; True if there were any."""
        if not _ID.fullmatch(container_id):
            return False
        path = os.path.join(self.containers, container_id)
        digest = self._digest_of(container_id)
        removed = False
        for p in (path, path + ".json"):
            try:
                os.unlink(p)
                removed = True
            except FileNotFoundError:
                pass
        with self._lock:
            self._digests.pop(container_id, None)
        if digest:
            self._drop_if_unused(digest)
        return removed

    def _drop_if_unused(self, digest: str) -> None:
        content = os.path.join(self.content, digest)
        try:
            if os.lstat(content).st_nlink <= 1:
                os.unlink(content)
                os.unlink(content + ".json")
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
        """Remove the files of every container not in ``existing``, unused content, stray records
        and temporary files; returns the removed container ids."""
        keep = set(existing)
        gone = [cid for cid in self.live() if cid not in keep]
        for cid in gone:
            self.remove(cid)
        try:
            names = os.listdir(self.content)
        except OSError:
            return gone
        present = set(names)
        for n in names:
            p = os.path.join(self.content, n)
            if n.endswith(".tmp") or (n.endswith(".json") and n.removesuffix(".json") not in present):
                with contextlib.suppress(OSError):
                    os.unlink(p)
            elif _DIGEST.fullmatch(n):
                self._drop_if_unused(n)
        return gone

"""A read-only view of a container image's root filesystem, made of its snapshot layer directories.

The layers are host directories (containerd's overlayfs snapshotter: the ``lowerdir`` list, top
layer first). The view merges them as overlayfs does, and resolves every path *inside* the image:

* a name is looked up top-down; the first layer that has it (or a whiteout for it) decides;
* whiteouts: a character device 0/0 (what containerd's overlayfs snapshotter writes) or an OCI
  ``.wh.<name>`` file hide the name in every lower layer;
* a directory merges the same directory of lower layers until a layer has it as a non-directory,
  whites it out, or marks it opaque (xattr ``trusted.overlay.opaque`` / ``user.overlay.opaque`` =
  ``y``, or an OCI ``.wh..wh..opq`` entry);
* symlinks are resolved by this code, never by the host kernel: an absolute target restarts at the
  image root, ``..`` stops at the image root, at most :data:`MAX_SYMLINKS` links per lookup. Every
  host path this module touches is a layer directory joined with names that were each checked to
  be real directories of that layer (``lstat``), so nothing outside the layers is ever read;
* every host call counts against a :class:`Budget` (number of calls and a deadline), and file
  reads are bounded in size; exceeding either raises :class:`ImageReadError`.

Nothing in the image is executed or written.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nri_plugin.errors import ImageReadError

MAX_SYMLINKS = 40  # the kernel's limit for one path walk
MAX_LINK_TARGET = 4096
WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
_OPAQUE_XATTRS = ("trusted.overlay.opaque", "user.overlay.opaque")


@dataclass(slots=True)
class Budget:
    """How much host work one image read may do: ``calls`` host calls before ``deadline``
    (``time.monotonic``)."""

    calls: int
    deadline: float
    used: int = 0

    @classmethod
    def of(cls, calls: int, seconds: float) -> Budget:
        return cls(calls, time.monotonic() + seconds)

    def spend(self, n: int = 1) -> None:
        self.used += n
        if self.used > self.calls:
            raise ImageReadError(
                f"reading the image took more than {self.calls} file-system operations; the image is "
                "unusually large or hostile (raise nri-plugin.image-read-timeout only if it is trusted)"
            )
        if time.monotonic() > self.deadline:
            raise ImageReadError(
                "reading the image took longer than its time budget (nri-plugin.image-read-timeout); "
                "the disk is slow or the image is unusually large"
            )


@dataclass(frozen=True, slots=True)
class Node:
    """A resolved path of the image: ``kind`` is ``dir``, ``file``, ``symlink`` or ``other``;
    ``path`` its image path (after symlinks); ``sources`` the host directories that make it up
    (``dir``, top layer first) or the one host path (others)."""

    kind: str
    path: str
    sources: tuple[str, ...] = field(default=())

    @property
    def host_path(self) -> str:
        return self.sources[0]


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _kind(st: os.stat_result) -> str:
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


class ImageRoot:
    """The merged view of ``layers`` (host directories, top layer first)."""

    def __init__(self, layers: Sequence[str], budget: Budget) -> None:
        self.budget = budget
        roots = []
        for layer in layers:
            st = self._lstat(layer)
            if st is None or not stat.S_ISDIR(st.st_mode):
                raise ImageReadError(
                    f"snapshot layer {layer!r} is not a directory; the snapshot changed or is gone"
                )
            roots.append(layer)
        if not roots:
            raise ImageReadError("the snapshot has no layer directories")
        self.root = Node("dir", "/", tuple(roots))

    # -- host calls, each one counted ----------------------------------------------------------

    def _lstat(self, path: str) -> os.stat_result | None:
        self.budget.spend()
        try:
            return os.lstat(path)
        except FileNotFoundError:
            return None
        except NotADirectoryError:
            return None
        except OSError as exc:
            raise ImageReadError(f"cannot read the image layer path {path!r}: {exc.strerror}") from exc

    def _opaque(self, path: str) -> bool:
        for name in _OPAQUE_XATTRS:
            self.budget.spend()
            try:
                if os.getxattr(path, name, follow_symlinks=False) == b"y":
                    return True
            except OSError:
                pass
        return self._lstat(os.path.join(path, OPAQUE_MARKER)) is not None

    # -- lookup ---------------------------------------------------------------------------------

    def child(self, parent: Node, name: str) -> Node | None:
        """``name`` in the directory ``parent``, not following a final symlink (None: absent)."""
        path = parent.path.rstrip("/") + "/" + name
        dirs: list[str] = []
        for src in parent.sources:
            host = os.path.join(src, name)
            st = self._lstat(host)
            if st is None:
                if self._lstat(os.path.join(src, WHITEOUT_PREFIX + name)) is not None:
                    break
                continue
            if _is_whiteout(st):
                break
            kind = _kind(st)
            if kind != "dir":
                if dirs:
                    break  # a lower non-directory is hidden by the directory above it
                return Node(kind, path, (host,))
            dirs.append(host)
            if self._opaque(host):
                break
        return Node("dir", path, tuple(dirs)) if dirs else None

    def readlink(self, node: Node) -> str:
        self.budget.spend()
        try:
            target = os.readlink(node.host_path)
        except OSError as exc:
            raise ImageReadError(f"cannot read the image symlink {node.path!r}: {exc.strerror}") from exc
        if len(target) > MAX_LINK_TARGET or "\0" in target:
            raise ImageReadError(f"the image symlink {node.path!r} has an oversized target")
        return target

    def lookup(self, path: str, *, follow: bool = True) -> Node | None:
        """Resolve the image path ``path`` (symlinks resolved inside the image; a final symlink
        only when ``follow``). None when it does not exist; a dangling symlink is None too."""
        stack = [self.root]
        todo = [part for part in path.split("/") if part][::-1]
        links = 0
        while todo:
            part = todo.pop()
            if part == ".":
                continue
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            node = self.child(stack[-1], part)
            if node is None:
                return None
            if node.kind == "symlink" and (todo or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise ImageReadError(f"too many levels of symbolic links resolving {path!r} in the image")
                target = self.readlink(node)
                if target.startswith("/"):
                    del stack[1:]
                todo.extend(p for p in target.split("/")[::-1] if p)
                continue
            if node.kind == "dir":
                stack.append(node)
                continue
            if todo:
                return None  # a file used as a directory: ENOTDIR
            return node
        return stack[-1]

    # -- contents -------------------------------------------------------------------------------

    def _open(self, node: Node) -> int:
        """A read-only descriptor of ``node``'s file in its layer, never through a symlink."""
        self.budget.spend()
        try:
            return os.open(node.host_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageReadError(f"cannot open {node.path!r} in the image: {exc.strerror}") from exc

    def read(self, node: Node, limit: int) -> bytes:
        """The contents of the regular file ``node``, at most ``limit`` bytes (more: an error)."""
        if node.kind != "file":
            raise ImageReadError(f"{node.path!r} in the image is a {node.kind}, not a regular file")
        fd = self._open(node)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ImageReadError(f"{node.path!r} in the image changed while it was read")
            if st.st_size > limit:
                raise ImageReadError(
                    f"{node.path!r} in the image is {st.st_size} bytes, more than the {limit} this "
                    "plugin reads (a real one is far smaller)"
                )
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
        if len(data) > limit:
            raise ImageReadError(f"{node.path!r} in the image grew past {limit} bytes while it was read")
        return data

    def pread(self, node: Node, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of the regular file ``node`` (fewer at its end)."""
        fd = self._open(node)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return b""
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def listdir(self, node: Node, limit: int = 65536) -> list[str]:
        """The merged names of the directory ``node`` (whiteouts applied, markers hidden), sorted."""
        names: set[str] = set()
        hidden: set[str] = set()
        for src in node.sources:
            here: set[str] = set()
            self.budget.spend()
            try:
                with os.scandir(src) as it:
                    for entry in it:
                        self.budget.spend()
                        name = entry.name
                        if name == OPAQUE_MARKER:
                            continue
                        if name.startswith(WHITEOUT_PREFIX):
                            hidden.add(name[len(WHITEOUT_PREFIX) :])
                            continue
                        if (
                            not entry.is_dir(follow_symlinks=False)
                            and not entry.is_file(follow_symlinks=False)
                            and (not entry.is_symlink() and _is_whiteout(entry.stat(follow_symlinks=False)))
                        ):
                            hidden.add(name)
                            continue
                        here.add(name)
            except OSError as exc:
                raise ImageReadError(f"cannot list {node.path!r} in the image: {exc.strerror}") from exc
            names |= here - hidden
            hidden |= here  # a lower layer's entry of the same name is the same (merged or hidden)
            if len(names) > limit:
                raise ImageReadError(f"{node.path!r} in the image has more than {limit} entries")
        return sorted(names)

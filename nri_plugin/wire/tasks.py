"""The one pattern for background tasks of the project: a :class:`TaskScope`.

Every task the connection or the stub starts belongs to exactly one scope, whose lifetime is that
of the thing it serves (a connection's request handlers; a session's serve/register/stop tasks;
in the daemon, ``GpuPlugin``'s driver watch, deferred Synchronize report and evictions). It lives
here because the wire layer needs it and every layer that starts tasks sits above it; it is part
of the wire API (``nri_plugin.wire.TaskScope``).
The scope keeps a strong reference to each task (the event loop keeps only weak ones), forgets it
when it finishes, logs a task that died of an unexpected exception (instead of "Task exception was
never retrieved" at exit), and cancels and awaits all that are left when it closes. Unlike
``asyncio.TaskGroup``, one task ending -- even with an error -- does not cancel its siblings: a
failed request handler must not end the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class TaskScope:
    __slots__ = ("_closed", "_log", "_name", "_tasks")

    def __init__(self, name: str, logger: logging.Logger) -> None:
        self._name = name
        self._log = logger
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in a task of this scope (the scope must not be closed)."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"task scope {self._name} is closed")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._log.error("%s: task %s failed: %r", self._name, task.get_name(), exc, exc_info=exc)

    def cancel_all(self, *, keep: asyncio.Task[Any] | None = None) -> None:
        """Cancel every task (except ``keep``, e.g. the current one) without waiting."""
        for task in list(self._tasks):
            if task is not keep:
                task.cancel()

    async def aclose(self) -> None:
        """Close the scope: cancel what is still running and wait until it has stopped."""
        self._closed = True
        current = asyncio.current_task()
        self.cancel_all(keep=current)
        pending = [t for t in self._tasks if t is not current]
        if pending:  # their own cancellations are results; a cancel of the caller propagates
            await asyncio.gather(*pending, return_exceptions=True)

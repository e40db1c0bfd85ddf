"""TaskScope, directly: what its docstring promises (nri_plugin/wire/tasks.py)."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from nri_plugin.wire import TaskScope
from tests.fakeruntime import run

LOG = logging.getLogger("test.tasks")


def test_close_cancels_and_awaits_what_is_left_and_forgets_what_finished() -> None:
    async def scenario() -> None:
        scope = TaskScope("t", LOG)
        stopped: list[str] = []

        async def forever(name: str) -> None:
            try:
                await asyncio.Event().wait()
            finally:
                stopped.append(name)

        async def quick() -> int:
            return 7

        done = scope.spawn(quick(), name="quick")
        a, b = scope.spawn(forever("a")), scope.spawn(forever("b"), name="b")
        assert b.get_name() == "b" and await done == 7
        await asyncio.sleep(0)
        assert len(scope) == 2  # the finished task is forgotten
        await scope.aclose()
        assert (
            a.cancelled() and b.cancelled() and sorted(stopped) == ["a", "b"]
        )  # awaited, not just cancelled
        assert len(scope) == 0

        never = forever("never")
        with pytest.raises(RuntimeError, match="task scope t is closed"):
            scope.spawn(never)
        assert inspect.getcoroutinestate(never) == inspect.CORO_CLOSED  # no "never awaited" warning

    run(scenario())


def test_a_failing_task_is_logged_and_does_not_cancel_its_siblings(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        scope = TaskScope("t", LOG)
        sibling = scope.spawn(asyncio.sleep(3600), name="sibling")

        async def boom() -> None:
            raise ValueError("boom")

        failed = scope.spawn(boom(), name="boom")
        with pytest.raises(ValueError, match="boom"):  # the task itself still has its exception
            await failed
        assert not sibling.done()
        sibling.cancel()  # a cancelled task is not a failure
        await asyncio.sleep(0)
        await scope.aclose()

    with caplog.at_level(logging.ERROR, logger="test.tasks"):
        run(scenario())
    [record] = [r for r in caplog.records if r.name == "test.tasks"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == "t: task boom failed: ValueError('boom')"
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_cancel_all_keeps_the_given_task_and_close_from_inside_does_not_cancel_the_caller() -> None:
    async def scenario() -> None:
        scope = TaskScope("t", LOG)
        other = scope.spawn(asyncio.sleep(3600))

        async def closer() -> str:
            await scope.aclose()  # e.g. a connection closing itself from one of its tasks
            return "closed"

        closing = scope.spawn(closer())
        assert await closing == "closed" and other.cancelled()

        scope2 = TaskScope("t2", LOG)
        kept, dropped = scope2.spawn(asyncio.sleep(3600)), scope2.spawn(asyncio.sleep(3600))
        scope2.cancel_all(keep=kept)
        await asyncio.sleep(0)
        assert dropped.cancelled() and not kept.done()
        await scope2.aclose()
        assert kept.cancelled()

    run(scenario())

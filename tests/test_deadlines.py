"""upstream.Deadlines: many tasks' deadlines on one timer, in place of asyncio.timeout."""

from __future__ import annotations

import asyncio

from lrproxy.upstream import Deadlines


async def _guarded(dl: Deadlines, after: float, sleep: float) -> str:
    """Sleep under a deadline; say how it ended."""
    task = asyncio.current_task()
    assert task is not None
    dl.arm(task, task.get_loop().time() + after)
    try:
        await asyncio.sleep(sleep)
    except asyncio.CancelledError:
        if dl.disarm(task):
            return "timeout"
        raise
    finally:
        dl.disarm(task)
    return "done"


async def test_overdue_tasks_time_out_and_the_others_finish() -> None:
    """Deadlines armed in any order: each task times out at its own, not at another's."""
    dl = Deadlines()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    plan = [(0.30, 0.05), (0.05, 1.0), (0.5, 0.1), (0.15, 1.0), (0.6, 2.0)]  # (deadline, work)
    tasks = [asyncio.create_task(_guarded(dl, after, sleep)) for after, sleep in plan]
    ends: list[float] = []
    for t in tasks:
        t.add_done_callback(lambda _: ends.append(loop.time() - t0))
    results = await asyncio.gather(*tasks)
    assert results == ["done", "timeout", "done", "timeout", "timeout"]
    assert not dl._due  # nothing left armed
    assert sorted(ends)[-1] >= 0.6  # the last one waited for its own deadline
    dl.close()


async def test_a_cancel_from_outside_is_not_a_timeout() -> None:
    """A client leaving cancels the handler: that stays a CancelledError."""
    dl = Deadlines()
    task = asyncio.create_task(_guarded(dl, 5.0, 10.0))
    await asyncio.sleep(0.01)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    else:
        raise AssertionError("the outside cancel was swallowed")
    assert task.cancelled() and not dl._due
    dl.close()


async def test_one_timer_for_many_deadlines() -> None:
    """Arming later deadlines moves no timer; the earliest one armed is the one set."""
    dl = Deadlines()
    loop = asyncio.get_running_loop()
    tasks = [asyncio.create_task(asyncio.sleep(1)) for _ in range(50)]
    now = loop.time()
    dl.arm(tasks[0], now + 10)
    timer = dl._timer
    for i, t in enumerate(tasks[1:], 1):
        dl.arm(t, now + 10 + i)
    assert dl._timer is timer
    dl.arm(tasks[-1], now + 1)  # an earlier one moves it
    assert dl._timer is not timer and dl._at == now + 1
    for t in tasks:
        dl.disarm(t)
        t.cancel()
    dl.close()


async def test_until_is_timeout_at_a_loop_time() -> None:
    """`until(task, when)` ends the block with TimeoutError at loop time `when`, as
    `timeout(when - now)` would; a later `when` lets the block finish."""
    dl = Deadlines()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    t0 = loop.time()
    try:
        with dl.until(task, t0 + 0.05):
            await asyncio.sleep(1.0)
        raise AssertionError("the deadline did not end the block")
    except TimeoutError:
        assert 0.04 <= loop.time() - t0 < 0.9
    with dl.until(task, loop.time() + 5.0):
        await asyncio.sleep(0.01)
    assert not dl._due
    dl.close()

"""upstream.Deadlines: many tasks' deadlines on one timer, in place of asyncio.timeout."""

from __future__ import annotations

import asyncio

from lrproxy.upstream import Deadlines


async def _guarded(dl: Deadlines, after: float, sleep: float) -> str:
    """Sleep under a deadline (a Watch, as a stream's reads use it); say how it ended."""
    task = asyncio.current_task()
    assert task is not None
    w = dl.watch(task)
    w.arm(task.get_loop().time() + after)
    try:
        await asyncio.sleep(sleep)
    except asyncio.CancelledError:
        if w.expired():
            return "timeout"
        raise
    finally:
        w.close()
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
    watches = [dl.watch(t) for t in tasks]
    watches[0].arm(now + 10)
    timer = dl._timer
    for i, w in enumerate(watches[1:], 1):
        w.arm(now + 10 + i)
    assert dl._timer is timer
    watches[-1].arm(now + 1)  # an earlier one moves it
    assert dl._timer is not timer and dl.due_at == now + 1
    for t, w in zip(tasks, watches, strict=True):
        w.close()
        t.cancel()
    assert not dl._due
    dl.close()


async def test_an_unarmed_watch_cancels_nothing() -> None:
    """A watch is only a deadline while armed: a stream writing to its client (unarmed)
    is not cancelled by a read deadline that passed meanwhile, and once armed again a
    deadline already past cancels it at once."""
    dl = Deadlines()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    w = dl.watch(task)
    w.arm(loop.time() + 0.02)
    w.armed = False  # the read ended; now busy elsewhere
    await asyncio.sleep(0.1)  # the timer fires meanwhile: nothing happens
    assert not w.fired
    w.arm(w.when)  # armed again, its deadline long past
    try:
        await asyncio.sleep(1.0)
        raise AssertionError("the past deadline did not end the wait")
    except asyncio.CancelledError:
        assert w.expired()
    w.close()
    assert not dl._due
    dl.close()


async def test_timeout_blocks_and_watches_share_the_timer() -> None:
    """A `timeout()` block inside a task that also holds a watch: each ends by its own."""
    dl = Deadlines()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    w = dl.watch(task)
    w.arm(loop.time() + 5.0)
    t0 = loop.time()
    try:
        with dl.timeout(0.05):
            await asyncio.sleep(1.0)
        raise AssertionError("the block's deadline did not end it")
    except TimeoutError:
        assert 0.04 <= loop.time() - t0 < 0.9
    assert not w.fired
    w.close()
    assert not dl._due
    dl.close()

"""The hub's per-stream delivery (kiapi_core/jobs/fanout.py): direct writes to a waiting
stream's socket, and the task path a stream falls back to."""

from __future__ import annotations

import asyncio

from kiapi_core.jobs.fanout import END_ITEM, Follower, Item


class Socket:
    """A stream's body writer: records what it was handed; ``open`` False refuses (a client
    that is not reading, or a response that is not chunked)."""

    def __init__(self, open: bool = True) -> None:
        self.open = open
        self.written: list[bytes] = []

    def __call__(self, framed: bytes) -> bool:
        if self.open:
            self.written.append(framed)
        return self.open


def _item(n: int, *, last: bool = False) -> Item:
    return Item((n, 0), f"event {n}".encode(), droppable=not last, last=last)


async def _waiting(socket: Socket) -> tuple[Follower, asyncio.Task[list[Item]]]:
    follower = Follower("job", None, None)
    follower.writer = socket
    task = asyncio.create_task(follower.take())
    await asyncio.sleep(0)  # the stream's task now waits for items
    return follower, task


def test_progress_goes_straight_to_a_waiting_streams_socket() -> None:
    async def run() -> None:
        socket = Socket()
        follower, task = await _waiting(socket)
        follower.offer(_item(1))
        follower.offer(_item(2))
        follower.offer(_item(2))  # seen: not written twice
        assert socket.written == [_item(1).framed, _item(2).framed]
        await asyncio.sleep(0)
        assert not task.done()  # the task was never woken
        task.cancel()

    asyncio.run(run())


def test_the_last_event_is_written_at_once_and_the_task_only_ends_the_stream() -> None:
    async def run() -> None:
        socket = Socket()
        follower, task = await _waiting(socket)
        follower.offer(_item(1))
        follower.offer(_item(2, last=True))
        assert socket.written == [_item(1).framed, _item(2, last=True).framed]
        # What the task gets: the end alone, nothing to write again.
        assert await asyncio.wait_for(task, 1) == [END_ITEM]

    asyncio.run(run())


def test_a_refusing_socket_gets_the_last_event_through_the_task() -> None:
    async def run() -> None:
        socket = Socket(open=False)
        follower, task = await _waiting(socket)
        end = _item(3, last=True)
        follower.offer(end)
        assert await asyncio.wait_for(task, 1) == [end]

    asyncio.run(run())


def test_a_last_event_already_sent_is_left_to_the_task_to_skip() -> None:
    async def run() -> None:
        socket = Socket()
        follower, task = await _waiting(socket)
        follower.floor = (5, 0)  # the opening already held entry 5, the end
        end = _item(5, last=True)
        follower.offer(end)
        assert socket.written == []
        assert await asyncio.wait_for(task, 1) == [end]

    asyncio.run(run())

"""A bounded queue of ObjectRefs to rollout batches, between producers
(generation -> PM scoring) and the learner.

The queue holds refs, never the batches: a batch stays in the object store
where its producer put it and is fetched once, by whoever consumes it. A full
queue blocks `put` (back-pressure: generation cannot run more than `maxsize`
batches ahead of training). `put` and `get` raise `RolloutQueueTimeout` after
their timeout instead of hanging without a message.

Refs travel wrapped in a list so Ray passes the ref itself and does not
resolve it on the way into the queue actor. The queue actor holds a
reference to each batch until it is taken, so the object stays alive as long
as its owner does (the process that called `ray.put` or submitted the task
that made it).

The same actor carries the run's other messages on named, unbounded channels
(`RolloutQueue.channel`): the controller's commands to the learners and their
answers. One actor instead of one per queue saves a Python process (~0.13 GB)
for each.
"""

from __future__ import annotations

import asyncio
import queue

import ray


class RolloutQueueTimeout(TimeoutError):
    pass


@ray.remote(num_cpus=0)
class _QueueActor:
    def __init__(self, maxsize: int):
        self.q: asyncio.Queue = asyncio.Queue(maxsize)
        self.channels: dict[str, asyncio.Queue] = {}  # name -> unbounded queue of messages

    def _channel(self, name: str) -> asyncio.Queue:
        return self.channels.setdefault(name, asyncio.Queue())

    def send(self, channel: str, item) -> None:
        self._channel(channel).put_nowait(item)

    async def receive(self, channel: str, timeout: float | None) -> tuple[object, bool]:
        try:
            return await asyncio.wait_for(self._channel(channel).get(), timeout), True
        except asyncio.TimeoutError:
            return None, False

    def pending(self, channel: str) -> int:
        return self._channel(channel).qsize()

    async def put(self, item: list, timeout: float | None) -> str | None:
        try:
            await asyncio.wait_for(self.q.put(item), timeout)
        except asyncio.TimeoutError:
            return (f"rollout queue full ({self.q.maxsize} batches) for {timeout:.0f} s: "
                    "the consumer (learner) is not taking batches")
        return None

    async def get(self, timeout: float | None) -> tuple[list | None, str | None]:
        try:
            return await asyncio.wait_for(self.q.get(), timeout), None
        except asyncio.TimeoutError:
            return None, f"no rollout batch within {timeout:.0f} s: the producer is not putting batches"

    def qsize(self) -> int:
        return self.q.qsize()


class RolloutQueue:
    """Handle to the queue actor; picklable, so producers in other actors can hold it."""

    def __init__(self, maxsize: int = 2):
        if maxsize < 1:
            raise ValueError(f"rollout queue maxsize must be >= 1, got {maxsize}")
        self._actor = _QueueActor.options(max_concurrency=1000).remote(maxsize)

    def put(self, batch_ref: ray.ObjectRef, timeout: float | None = None) -> None:
        """Block while the queue is full (back-pressure); raise after `timeout` s."""
        if not isinstance(batch_ref, ray.ObjectRef):
            raise TypeError(f"the rollout queue holds ObjectRefs, got {type(batch_ref).__name__}; ray.put it first")
        err = ray.get(self._actor.put.remote([batch_ref], timeout))
        if err:
            raise RolloutQueueTimeout(err)

    def put_async(self, batch_ref: ray.ObjectRef) -> ray.ObjectRef:
        """Queue the put without waiting; `ray.get` the result to wait for space."""
        return self._actor.put.remote([batch_ref], None)

    def get(self, timeout: float | None = None) -> ray.ObjectRef:
        """The oldest batch's ObjectRef (not the batch: `ray.get` it where it is needed)."""
        item, err = ray.get(self._actor.get.remote(timeout))
        if err:
            raise RolloutQueueTimeout(err)
        return item[0]

    def qsize(self) -> int:
        return ray.get(self._actor.qsize.remote())

    def channel(self, name: str) -> "Channel":
        """A named message channel on this queue's actor."""
        return Channel(self._actor, name)

    def shutdown(self) -> None:
        ray.kill(self._actor)


class Channel:
    """One unbounded message channel of the queue actor, with the part of
    `ray.util.queue.Queue`'s interface the learners use; picklable. Messages may
    hold ObjectRefs inside lists or dicts: Ray passes nested refs as refs."""

    def __init__(self, actor, name: str):
        self._actor, self.name = actor, name

    def put(self, item) -> None:
        ray.get(self._actor.send.remote(self.name, item))

    def get(self, timeout: float | None = None):
        """The oldest message; raises queue.Empty after `timeout` s."""
        item, ok = ray.get(self._actor.receive.remote(self.name, timeout))
        if not ok:
            raise queue.Empty(f"no message on channel {self.name!r} within {timeout} s")
        return item

    def empty(self) -> bool:
        return ray.get(self._actor.pending.remote(self.name)) == 0

"""A bounded queue of ObjectRefs to rollout batches, between producers
(generation -> PM scoring) and the learner.

The queue holds refs, never the batches: a batch stays in the object store
where its producer put it and is fetched once, by whoever consumes it. A full
queue blocks `put` (back-pressure: generation cannot run more than `maxsize`
batches ahead of training, which bounds staleness in async mode). `get`
raises `RolloutQueueTimeout` naming the producer that stalled, instead of
hanging without a message.

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
import time

import ray


class RolloutQueueTimeout(TimeoutError):
    pass


@ray.remote(num_cpus=0)
class _QueueActor:
    def __init__(self, maxsize: int):
        self.q: asyncio.Queue = asyncio.Queue(maxsize)
        self.producers: dict[str, dict] = {}  # name -> started, last_put, puts, done
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

    def _producer(self, name: str) -> dict:
        now = time.time()
        return self.producers.setdefault(name, {"started": now, "last_put": None, "puts": 0, "done": False})

    def register(self, name: str) -> None:
        self._producer(name)

    def done(self, name: str) -> None:
        self._producer(name)["done"] = True

    async def put(self, item: list, producer: str, timeout: float | None) -> str | None:
        p = self._producer(producer)
        try:
            await asyncio.wait_for(self.q.put(item), timeout)
        except asyncio.TimeoutError:
            return (f"rollout queue full ({self.q.maxsize} batches) for {timeout:.0f} s: "
                    f"producer {producer!r} blocked; the consumer (learner) is not taking batches")
        p["last_put"] = time.time()
        p["puts"] += 1
        return None

    async def get(self, timeout: float | None) -> tuple[list | None, str | None]:
        try:
            return await asyncio.wait_for(self.q.get(), timeout), None
        except asyncio.TimeoutError:
            return None, self._stall_report(timeout)

    def _stall_report(self, timeout: float) -> str:
        now = time.time()
        live = {n: p for n, p in self.producers.items() if not p["done"]}
        if not self.producers:
            return f"no rollout batch within {timeout:.0f} s and no producer ever registered or put a batch"
        if not live:
            return f"no rollout batch within {timeout:.0f} s: every producer ({', '.join(self.producers)}) said done"

        def idle(p):  # seconds since the producer last showed life
            return now - (p["last_put"] or p["started"])
        stalled = max(live, key=lambda n: idle(live[n]))
        detail = ", ".join(f"{n}: {p['puts']} batches, last {idle(p):.0f} s ago" for n, p in live.items())
        return (f"no rollout batch within {timeout:.0f} s; producer {stalled!r} stalled "
                f"(idle {idle(live[stalled]):.0f} s). Producers: {detail}")

    def qsize(self) -> int:
        return self.q.qsize()

    def stats(self) -> dict:
        return {"size": self.q.qsize(), "maxsize": self.q.maxsize, "producers": dict(self.producers)}


class RolloutQueue:
    """Handle to the queue actor; picklable, so producers in other actors can hold it."""

    def __init__(self, maxsize: int = 2):
        if maxsize < 1:
            raise ValueError(f"rollout queue maxsize must be >= 1, got {maxsize}")
        self._actor = _QueueActor.options(max_concurrency=1000).remote(maxsize)

    def register(self, producer: str) -> None:
        """A producer announces itself before its first batch, so a stall before any put is named."""
        ray.get(self._actor.register.remote(producer))

    def done(self, producer: str) -> None:
        ray.get(self._actor.done.remote(producer))

    def put(self, batch_ref: ray.ObjectRef, producer: str, timeout: float | None = None) -> None:
        """Block while the queue is full (back-pressure); raise after `timeout` s."""
        if not isinstance(batch_ref, ray.ObjectRef):
            raise TypeError(f"the rollout queue holds ObjectRefs, got {type(batch_ref).__name__}; ray.put it first")
        err = ray.get(self._actor.put.remote([batch_ref], producer, timeout))
        if err:
            raise RolloutQueueTimeout(err)

    def put_async(self, batch_ref: ray.ObjectRef, producer: str) -> ray.ObjectRef:
        """Queue the put without waiting; `ray.get` the result to wait for space."""
        return self._actor.put.remote([batch_ref], producer, None)

    def get(self, timeout: float | None = None) -> ray.ObjectRef:
        """The oldest batch's ObjectRef (not the batch: `ray.get` it where it is needed)."""
        item, err = ray.get(self._actor.get.remote(timeout))
        if err:
            raise RolloutQueueTimeout(err)
        return item[0]

    def qsize(self) -> int:
        return ray.get(self._actor.qsize.remote())

    def stats(self) -> dict:
        return ray.get(self._actor.stats.remote())

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

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

Restarts: the actor is restarted by Ray when it dies (`max_restarts`), and a
call in flight at that moment is run again on the new one (`max_task_retries`),
so a blocked `get` keeps waiting instead of failing. A restarted actor is
empty: what was queued is lost. Every actor start draws a new `start_id`, which
every reply carries; a caller that knows under which start its item was stored
passes it as `since`, and a `get` on a newer start raises `ChannelRestarted`
instead of waiting for an item that is gone. The callers recover from that:
the learner transport sends its pending command again (learners/transport.py),
the rollout side takes the lost batch from its own ref (rollouts.py).
`restarts` counts the starts this handle has seen after the first.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import uuid

import ray


class RolloutQueueTimeout(TimeoutError):
    pass


class ChannelRestarted(ConnectionResetError):
    """The queue actor restarted since the caller's item was stored: the item is lost."""

    def __init__(self, message: str, start_id: str):
        super().__init__(message)
        self.start_id = start_id


@ray.remote(num_cpus=0)
class _QueueActor:
    def __init__(self, maxsize: int):
        self.start_id = uuid.uuid4().hex  # new at every (re)start: its queues start empty
        self.q: asyncio.Queue = asyncio.Queue(maxsize)
        self.channels: dict[str, asyncio.Queue] = {}  # name -> unbounded queue of messages

    def _channel(self, name: str) -> asyncio.Queue:
        return self.channels.setdefault(name, asyncio.Queue())

    def info(self) -> dict:
        return {"pid": os.getpid(), "start_id": self.start_id}

    def send(self, channel: str, item) -> str:
        self._channel(channel).put_nowait(item)
        return self.start_id

    async def receive(self, channel: str, timeout: float | None, since: str | None = None) -> tuple[object, str, str]:
        """(item, "ok" | "timeout" | "restarted", start_id)."""
        if since is not None and since != self.start_id:
            return None, "restarted", self.start_id
        try:
            return await asyncio.wait_for(self._channel(channel).get(), timeout), "ok", self.start_id
        except asyncio.TimeoutError:
            return None, "timeout", self.start_id

    def pending(self, channel: str) -> int:
        return self._channel(channel).qsize()

    async def put(self, item: list, timeout: float | None, with_start_id: bool = False):
        """None, or the error (str); with `with_start_id`, (that, start_id)."""
        err = None
        try:
            await asyncio.wait_for(self.q.put(item), timeout)
        except asyncio.TimeoutError:
            err = (f"rollout queue full ({self.q.maxsize} batches) for {timeout:.0f} s: "
                   "the consumer (learner) is not taking batches")
        return (err, self.start_id) if with_start_id else err

    async def get(self, timeout: float | None, since: str | None = None) -> tuple[list | None, str | None, str]:
        """(item, error, start_id); error "restarted" when the actor is no longer the `since` start."""
        if since is not None and since != self.start_id:
            return None, "restarted", self.start_id
        try:
            return await asyncio.wait_for(self.q.get(), timeout), None, self.start_id
        except asyncio.TimeoutError:
            return None, f"no rollout batch within {timeout:.0f} s: the producer is not putting batches", self.start_id

    def qsize(self) -> int:
        return self.q.qsize()


class _Starts:
    """The actor starts one process has seen (shared by a handle and its channels there)."""

    def __init__(self):
        self.current: str | None = None
        self.restarts = 0
        self._lock = threading.Lock()

    def saw(self, start_id: str) -> str:
        with self._lock:
            if start_id != self.current:
                self.restarts += self.current is not None
                self.current = start_id
        return start_id

    def __getstate__(self):  # each process counts what it sees
        return {"fresh": True}

    def __setstate__(self, _state):
        self.__init__()


class RolloutQueue:
    """Handle to the queue actor; picklable, so producers in other actors can hold it."""

    def __init__(self, maxsize: int = 2, max_restarts: int = 20):
        if maxsize < 1:
            raise ValueError(f"rollout queue maxsize must be >= 1, got {maxsize}")
        self._actor = _QueueActor.options(max_concurrency=1000, max_restarts=max_restarts,
                                          max_task_retries=-1).remote(maxsize)
        self._starts = _Starts()

    @property
    def restarts(self) -> int:
        """Restarts of the actor this handle has seen (a reply from a new start)."""
        return self._starts.restarts

    def start_id(self) -> str:
        return self._starts.saw(ray.get(self._actor.info.remote())["start_id"])

    def pid(self) -> int:
        """The actor's process (fault-injection tests kill it)."""
        return ray.get(self._actor.info.remote())["pid"]

    def put(self, batch_ref: ray.ObjectRef, timeout: float | None = None) -> str:
        """Block while the queue is full (back-pressure); raise after `timeout` s. Returns the
        start_id of the actor that holds the ref (pass it to `get` as `since`)."""
        if not isinstance(batch_ref, ray.ObjectRef):
            raise TypeError(f"the rollout queue holds ObjectRefs, got {type(batch_ref).__name__}; ray.put it first")
        err, start_id = ray.get(self._actor.put.remote([batch_ref], timeout, True))
        self._starts.saw(start_id)
        if err:
            raise RolloutQueueTimeout(err)
        return start_id

    def put_async(self, batch_ref: ray.ObjectRef) -> ray.ObjectRef:
        """Queue the put without waiting; `ray.get` the result to wait for space."""
        return self._actor.put.remote([batch_ref], None)

    def get(self, timeout: float | None = None, since: str | None = None) -> ray.ObjectRef:
        """The oldest batch's ObjectRef (not the batch: `ray.get` it where it is needed).
        `since`: the start_id its `put` returned; a restart since raises `ChannelRestarted`."""
        item, err, start_id = ray.get(self._actor.get.remote(timeout, since))
        self._starts.saw(start_id)
        if err == "restarted":
            raise ChannelRestarted(f"the rollout queue actor restarted (start {since} -> {start_id}): "
                                   "its batches are lost", start_id)
        if err:
            raise RolloutQueueTimeout(err)
        return item[0]

    def qsize(self) -> int:
        return ray.get(self._actor.qsize.remote())

    def channel(self, name: str, by_ref: bool = False) -> "Channel":
        """A named message channel on this queue's actor (`by_ref`: see Channel)."""
        return Channel(self._actor, name, self._starts, by_ref)

    def shutdown(self) -> None:
        ray.kill(self._actor)  # no_restart: gone for good


class Channel:
    """One unbounded message channel of the queue actor, with the part of
    `ray.util.queue.Queue`'s interface the learners use; picklable. Messages may
    hold ObjectRefs inside lists or dicts: Ray passes nested refs as refs.

    `put` returns the start_id of the actor that holds the message; `get(since=…)`
    raises `ChannelRestarted` if the actor restarted since that start (the message,
    or its answer, may be lost).

    `by_ref`: each message goes into the object store and the actor relays its ref,
    never unpickling it. What the actor unpickles it imports: actor handles of the
    generation workers in a command made it import their module and torch (0.14 ->
    0.33 GiB for the rest of the run). A message by ref lives as long as its sender,
    so this suits the controller's commands, not the learners' answers (a rank that
    died after answering must not make its answer unreadable)."""

    def __init__(self, actor, name: str, starts: _Starts | None = None, by_ref: bool = False):
        self._actor, self.name, self.by_ref = actor, name, by_ref
        self._starts = starts or _Starts()

    def put(self, item) -> str:
        item = [ray.put(item)] if self.by_ref else item
        return self._starts.saw(ray.get(self._actor.send.remote(self.name, item)))

    def get(self, timeout: float | None = None, since: str | None = None):
        """The oldest message; raises queue.Empty after `timeout` s."""
        item, status, start_id = ray.get(self._actor.receive.remote(self.name, timeout, since))
        self._starts.saw(start_id)
        if status == "restarted":
            raise ChannelRestarted(f"the channel actor restarted (start {since} -> {start_id}): messages on "
                                   f"{self.name!r} may be lost", start_id)
        if status == "timeout":
            raise queue.Empty(f"no message on channel {self.name!r} within {timeout} s")
        return ray.get(item[0]) if self.by_ref else item

    def empty(self) -> bool:
        return ray.get(self._actor.pending.remote(self.name)) == 0

"""How the controller drives a long-running Ray Train learner group: commands in,
results out, over two kinds of channel on the run's rollout-queue actor.

    controller                                   every worker (rank r)
    ----------                                   ---------------------
    call("train", ...)  -- Command(seq, incarnation, name, args) -->  worker.<name>(**args)
                        <-- Result(seq, incarnation, name, value | traceback) -- (rank 0; any rank on error)

- Sequence numbers: the controller waits for the answer to *its current*
  command; any other result (a late answer to a command abandoned by a
  restart) is discarded.
- Incarnations: a worker group that Ray Train restarted (FailureConfig)
  draws a new incarnation id and announces it in a `ready` result. Its workers
  ignore commands addressed to an older incarnation, so no rank runs a
  command the others dropped (a DDP hang). The controller sees `ready` at its
  next call, whatever phase the run was in when the worker died, and raises
  `LearnerGroupRestarted` so that it can roll back.
- Errors: a worker's exception reaches the controller with the worker's
  traceback (`LearnerError`); the worker stays up to take the `stop`. A
  collective that fails because another rank died is the group's failure
  instead: the worker dies with it and Ray Train restarts the group.
- No polling: the controller blocks on the results channel; when `fit()`
  ends (the group gave up after its restarts), the thread that ran it posts a
  `fit_ended` result, which wakes the controller with the error.
- The channel actor's restarts (actors/rollout_queue.py): a restarted actor is
  empty, so the pending command, or its answer, may be lost. The controller
  learns it from the start id the channel reports (a `get` waiting on the
  actor's old start raises `ConnectionResetError`) and sends the same command
  (same seq) again. Every rank remembers the last command it ran and what it
  answered: the same seq again is answered again, never run twice, so no batch
  is trained twice and no rank enters a collective the others skip.
"""

from __future__ import annotations

import queue
import traceback
import uuid
from dataclasses import dataclass, field

READY, FIT_ENDED, STOP = "ready", "fit_ended", "stop"


@dataclass
class Command:
    seq: int
    incarnation: str
    name: str
    args: dict = field(default_factory=dict)


@dataclass
class Result:
    seq: int
    incarnation: str
    name: str
    value: dict | None = None
    error: str | None = None  # the worker's traceback
    rank: int = 0
    error_type: str = ""  # the class name of the worker's exception, for callers that handle one kind


class LearnerGroupRestarted(RuntimeError):
    """A learner worker died and Ray Train restarted the group: it holds the weights it
    started with until the controller restores a checkpoint."""

    def __init__(self, message: str, ready: dict):
        super().__init__(message)
        self.pids = ready["pids"]


class LearnerError(RuntimeError):
    """A command raised in a learner worker; the message holds the worker's traceback and
    `error_type` the class name of its exception (classes do not cross the transport)."""

    def __init__(self, message: str, error_type: str = ""):
        super().__init__(message)
        self.error_type = error_type


# ---------------------------------------------------------------- worker side

def new_incarnation(rank: int, world: int) -> str:
    """One id for this start of the group, the same on every rank."""
    ident = [uuid.uuid4().hex if rank == 0 else None]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(ident, src=0)
    return ident[0]


def peer_failed(error: Exception) -> bool:
    """A collective failed because another rank died (its connection closed, or it timed out):
    the group's failure, which Ray Train's restart handles, not a bug to report."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "broken pipe", "peer"))


def serve_commands(worker, commands, results, rank: int, world: int) -> None:
    """Run `worker`'s methods as the controller names them, until `stop`.

    `worker.ready()` gives what the group announces when it starts (pids, weights)."""
    incarnation = new_incarnation(rank, world)
    ready = worker.ready()
    if rank == 0:
        results.put(Result(-1, incarnation, READY, ready))
    last_seq, answer = -1, None  # the last command run here, and this rank's answer to it (None: no answer)
    while True:
        cmd: Command = commands.get()
        if cmd.incarnation != incarnation:
            continue  # sent to the group before a restart: the controller no longer waits for it
        if cmd.seq <= last_seq:  # sent again: the channel actor restarted and may have lost the answer
            if cmd.seq == last_seq and answer is not None:
                results.put(answer)
            continue
        if cmd.name == STOP:
            return
        last_seq, answer = cmd.seq, None  # (the old answer's refs, e.g. to weights, are let go)
        try:
            value = getattr(worker, cmd.name)(**cmd.args)
        except Exception as e:
            if peer_failed(e):
                raise  # this worker dies too and Ray Train restarts the group: the controller rolls back
            # Our own error: the controller stops the run with this traceback; the worker stays
            # alive to take the stop.
            answer = Result(cmd.seq, incarnation, cmd.name, error=traceback.format_exc(), rank=rank,
                            error_type=type(e).__name__)
        else:
            answer = Result(cmd.seq, incarnation, cmd.name, value) if rank == 0 else None
        if answer is not None:
            results.put(answer)


# ---------------------------------------------------------------- controller side

class CommandClient:
    """The controller's end: numbered commands to every rank, the matching result back."""

    def __init__(self, commands: list, results, timeout_s: float):
        self.commands, self.results, self.timeout_s = commands, results, timeout_s
        self.seq, self.incarnation = 0, ""
        self.resent = 0  # commands sent again after the channel actor restarted

    def wait_ready(self) -> dict:
        """The announcement of a (re)started group; results of older incarnations are dropped."""
        while True:
            r = self._next("the learner group to start")
            if r.name == READY:
                self.incarnation = r.incarnation
                return r.value

    def call(self, name: str, **args) -> dict:
        """Run `name` on every worker; the group's answer (rank 0's value)."""
        self.seq += 1
        cmd = Command(self.seq, self.incarnation, name, args)
        since = self._send(cmd)
        while True:
            try:
                r = self._next(f"the answer to {name!r}", since)
            except ConnectionResetError as e:  # the channel actor restarted: the command or its answer may be lost
                self.resent += 1
                print(f"{e}; sending {name!r} (seq {cmd.seq}) again", flush=True)
                since = self._send(cmd)
                continue
            if r.name == READY:
                self.incarnation = r.incarnation
                raise LearnerGroupRestarted(f"the learner group restarted after a worker failure (during {name!r} "
                                            "or before it)", r.value)
            if r.seq != self.seq or r.incarnation != self.incarnation:
                continue  # a late answer to a command the controller gave up on
            if r.error is not None:
                raise LearnerError(f"learner rank {r.rank} failed in {name!r}:\n{r.error}", r.error_type)
            return r.value

    def stop(self) -> None:
        for channel in self.commands:
            channel.put(Command(self.seq + 1, self.incarnation, STOP))

    def _send(self, cmd: Command) -> str | None:
        """`cmd` to every rank; the start id of the channel actor that holds them all (None:
        channels that report none). A restart between two puts sends them all again."""
        while True:
            starts = {channel.put(cmd) for channel in self.commands}
            if len(starts) == 1:
                return starts.pop()

    def _next(self, what: str, since: str | None = None) -> Result:
        try:
            r = self.results.get(timeout=self.timeout_s) if since is None else \
                self.results.get(timeout=self.timeout_s, since=since)
        except queue.Empty:
            raise TimeoutError(f"no word from the learner group in {self.timeout_s:.0f} s while waiting for {what}") from None
        if r.name == FIT_ENDED:
            raise RuntimeError(f"the learner group stopped while the controller waited for {what}: {r.error}")
        return r


def post_fit_ended(results, error: BaseException | None) -> None:
    """Wake a controller blocked on `results`: the group's fit() returned or raised."""
    results.put(Result(-1, "", FIT_ENDED, error=repr(error) if error else "fit() returned"))


"""What keeps a replica answering under load and under faults: deadlines, the bounded queue,
the engine loop, the Host check and the health check (the assistant, serve/app.py, and the
collection page, serve/collect.py, share them).

- **Body deadline** (`body_timeout_s`): a client that has not sent its whole body in
  time gets 408 and the replica's slot is freed (a slow client would otherwise hold
  one of `max_ongoing_requests` for as long as it likes).
- **Generation deadline** (`generation_timeout_s`, from the moment the body is read):
  waiting for the engine, generating, PM scoring and the OOD score all count; past it
  the client gets 504 and the engine drops the request (`EngineLoop` aborts it between
  two steps), so a timed-out request stops costing compute.
- **Bounded queue**: a replica holds at most `max_ongoing_requests` requests; Serve's
  proxy queues at most `max_queued_requests` more for the deployment and refuses the
  rest at once with `queue_full_status` (503 or 429) and `Retry-After: retry_after_s`
  (Ray Serve's `max_queued_requests` / `BackpressureConfig`), instead of queueing
  without bound.
- **Health check**: Serve calls the replica's `check_health` every
  `health_check_period_s`; it fails when the engine loop has died (a vLLM step
  raised, e.g. the engine core died) or is stuck, or when the PM actor is dead or does
  not answer, and Serve then replaces the replica (its PM actor, owned by it, goes
  with it).
- **Host check** (DNS rebinding): with no API key, a request whose Host header is not
  the bound host (or, for a loopback bind, one of localhost / 127.0.0.1 / [::1]), nor one
  of `allowed_hosts`, is refused with 421, so that a web page whose domain was
  re-pointed at 127.0.0.1 cannot talk to the server from a browser. A request whose
  Origin header (sent by browsers on cross-site and POST requests) names another host
  is refused too (403): a page elsewhere cannot make a visitor's browser post to the
  server (e.g. labels into the collection page's store).

`LoadArgs` imports nothing heavy (the CLI reads its defaults for `--help`);
`EngineLoop` runs vLLM, imported by the replica only.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from serve.openai_protocol import APIError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("0.0.0.0", "::", "")


class LoadArgs(BaseModel):
    """Limits shared by every replica (ServeArgs and CollectArgs extend it)."""

    host: str = Field("127.0.0.1", description="The interface the HTTP proxy binds (set by `hh-ray serve --host`); "
                                               "with no API key, only requests addressed to it are answered.")
    allowed_hosts: list[str] = Field(default_factory=list, description="More Host names answered with no API key "
                                                                       "(e.g. a reverse proxy's).")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds a client has to send its whole request body; "
                                                          "then 408.")
    generation_timeout_s: float = Field(120.0, gt=0, description="Seconds from a request's body to its answer "
                                                                 "(waiting for the engine, generation, PM scoring); "
                                                                 "then 504 and the engine drops the request.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica holds at once.")
    max_queued_requests: int = Field(64, ge=1, description="Requests Serve queues for a replica beyond those; "
                                                           "more are refused at once with queue_full_status.")
    queue_full_status: Literal[503, 429] = Field(503, description="Status of a request refused because the "
                                                                  "queue is full.")
    retry_after_s: float = Field(5.0, ge=0, description="Retry-After (seconds) sent with a queue-full refusal.")
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between Serve's health checks of a "
                                                                 "replica (engine loop, PM actor).")
    health_check_timeout_s: float = Field(30.0, gt=0, description="A health check that takes longer fails.")

    def deployment_options(self) -> dict:
        """Ray Serve deployment options (`Deployment.options`) for these limits."""
        from ray.serve.config import BackpressureConfig

        return dict(max_ongoing_requests=self.max_ongoing_requests, max_queued_requests=self.max_queued_requests,
                    backpressure_config=BackpressureConfig(status_code=self.queue_full_status,
                                                           retry_after_s=self.retry_after_s),
                    health_check_period_s=self.health_check_period_s,
                    health_check_timeout_s=self.health_check_timeout_s)


# ---------------------------------------------------------------- the Host check

def host_name(header: str) -> str:
    """The host of a Host header, lower-case, without port or trailing dot ('[::1]:8000' -> '::1')."""
    h = header.strip().lower()
    if h.startswith("["):
        h = h[1:h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def allowed_host_names(bound: str, extra: list[str] = ()) -> set[str]:
    """Hosts a request may name when no API key is set: the bound one, its loopback forms
    when it is loopback (or a wildcard), and `extra`."""
    names = {host_name(h) for h in extra}
    if bound in WILDCARD or host_name(bound) in LOOPBACK:
        names |= set(LOOPBACK)  # a wildcard bind: only the loopback names are known to be ours
    else:
        names.add(host_name(bound))
    return names - {""}


def check_host(headers, api_key: str, allowed: set[str]) -> None:
    """With no API key: 421 when the Host header names another host (DNS rebinding), 403 when
    the Origin header names another host (a page elsewhere posting through a visitor's
    browser). A request without these headers is let through: browsers always send Host,
    and Origin on every request that could change something."""
    if api_key:
        return
    names = ", ".join(sorted(allowed))
    header = headers.get("host")
    if header is not None and host_name(header) not in allowed:
        raise APIError(421, f"this server does not answer for the host {header[:100]!r} (it answers for {names}); "
                            "with no API key set, requests for other host names are refused, against DNS rebinding. "
                            "Use one of those names, or start the server with an API key or allowed_hosts.",
                       code="misdirected_request")
    origin = headers.get("origin")
    if origin is not None and host_name(origin.split("://", 1)[-1].split("/", 1)[0]) not in allowed:
        raise APIError(403, f"requests from the web origin {origin[:100]!r} are refused (this server answers pages "
                            f"served from {names}); with an API key set, any origin may call it with the key.",
                       code="forbidden_origin")


# ---------------------------------------------------------------- deadlines

async def read_body(request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes the limit (even without a
    Content-Length) and with 408 when it has not all arrived within timeout_s."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    raw = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                raw += part
                if len(raw) > limit:
                    raise APIError(413, f"request body exceeds the limit of {limit} bytes",
                                   code="request_too_large")
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s ({len(raw)} bytes received); "
                            "send the whole body at once", code="request_timeout", type="timeout_error") from None
    return bytes(raw)


def generation_timeout(timeout_s: float) -> APIError:
    return APIError(504, f"the response was not ready within {timeout_s:g} s (the server's generation timeout) and "
                         "was abandoned; retry later, or ask for fewer tokens (max_tokens) or choices (n, best_of)",
                    code="generation_timeout", type="timeout_error")


class EngineDead(RuntimeError):
    pass


def engine_unavailable(e: EngineDead, retry_after_s: float) -> APIError:
    return APIError(503, f"the replica's engine has failed ({e}); the replica is being replaced, retry shortly",
                    code="engine_dead", type="server_error",
                    headers={"Retry-After": str(max(1, int(retry_after_s + 0.999)))})


# ---------------------------------------------------------------- the engine loop

@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    params: object
    deadline: float  # time.monotonic()
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    ids: tuple[str, ...] = field(default=())


class EngineLoop:
    """One thread that owns a `vllm.LLM` and steps it: requests join the running batch
    between two steps (continuous batching), each finished request resolves its future,
    and a request past its deadline or abandoned by its caller (timeout, client gone) is
    aborted in the engine, so it stops taking compute. At most `max_running` requests are
    in the engine at once; more wait here. The engine is used from this thread only.

    A step that raises kills the loop: every waiting caller gets `EngineDead`, and so does
    `check()` (the replica's health check), so that Serve replaces the replica."""

    def __init__(self, llm, max_running: int = 32, gather_s: float = 0.0, name: str = "engine"):
        self.llm, self.max_running, self.gather_s = llm, max_running, gather_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: collections.deque[_Job] = collections.deque()
        self._running: dict[str, _Job] = {}
        self.error: BaseException | None = None
        self.last_step = time.monotonic()
        self.counts = {"finished": 0, "timed_out": 0, "abandoned": 0}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # -------------------------------------------------- caller side (event loop)

    async def generate(self, prompt_ids: list[int], params, deadline: float):
        """The vLLM RequestOutput for one prompt; `asyncio.TimeoutError` past the deadline."""
        self.check()
        loop = asyncio.get_running_loop()
        job = _Job(prompt_ids, params, deadline, loop.create_future(), loop)
        self._inbox.put(("add", job))
        try:
            return await job.future
        except (asyncio.CancelledError, TimeoutError):
            self._inbox.put(("drop", job))  # the caller's own timeout, or the client left
            raise

    def check(self) -> None:
        """Raise EngineDead if the loop is gone or its engine failed."""
        if self.error is not None:
            raise EngineDead(f"{type(self.error).__name__}: {self.error}")
        if not self._thread.is_alive():
            raise EngineDead("the engine thread has exited")
        resources = getattr(getattr(self.llm.llm_engine, "engine_core", None), "resources", None)
        if getattr(resources, "engine_dead", False):
            raise EngineDead("vLLM reports its engine core dead")

    def stalled_for(self) -> float:
        """Seconds the engine has had work without finishing a step (0 when idle)."""
        return time.monotonic() - self.last_step if self._running else 0.0

    def stats(self) -> dict:
        return {"running": len(self._running), "waiting": len(self._pending), **self.counts}

    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(("stop", None))

    # -------------------------------------------------- the engine thread

    @staticmethod
    def _resolve(job: _Job, result=None, error: BaseException | None = None) -> None:
        def set_():
            if not job.future.done():
                job.future.set_exception(error) if error is not None else job.future.set_result(result)
        try:
            job.loop.call_soon_threadsafe(set_)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass

    def _take_messages(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=1.0) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        if block and self.gather_s > 0:  # an idle engine waits a moment for more to start with
            time.sleep(self.gather_s)
        while True:
            kind, job = msg
            if kind == "add":
                self._pending.append(job)
            elif kind == "drop":
                self._drop(job, "abandoned")
            elif kind == "stop":
                self._stopped = True
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _drop(self, job: _Job, why: str, error: BaseException | None = None) -> None:
        if job in self._pending:
            self._pending.remove(job)
        elif job.ids and job.ids[0] in self._running:
            self.llm.llm_engine.abort_request([job.ids[0]], internal=True)
            for i in job.ids:
                self._running.pop(i, None)
        else:
            return  # already finished
        self.counts[why] += 1
        if error is not None:  # an abandoned job's caller has stopped waiting
            self._resolve(job, error=error)

    def _run(self) -> None:
        engine = self.llm.llm_engine
        try:
            while not self._stopped:
                self._take_messages(block=not self._running and not self._pending)
                now = time.monotonic()
                for job in [j for j in self._pending if j.deadline <= now] + \
                           [j for i, j in self._running.items() if i == j.ids[0] and j.deadline <= now]:
                    self._drop(job, "timed_out", TimeoutError("generation deadline passed"))
                while self._pending and len({j.ids[0] for j in self._running.values()}) < self.max_running:
                    if not self._running:
                        self.last_step = time.monotonic()  # the stall clock starts with the work
                    job = self._pending.popleft()
                    try:
                        [rid] = self.llm.enqueue([{"prompt_token_ids": job.prompt_ids}], job.params, use_tqdm=False)
                    except Exception as e:  # noqa: BLE001 - this request's fault (e.g. its params): tell its caller
                        self._resolve(job, error=e)
                        continue
                    # vLLM answers under the external id ("7"); enqueue returns the internal one ("7-1a2b").
                    job.ids = tuple(dict.fromkeys((rid, rid.rsplit("-", 1)[0])))
                    for i in job.ids:
                        self._running[i] = job
                if not self._running:
                    continue
                outputs = engine.step()
                self.last_step = time.monotonic()
                for out in outputs:
                    if out.finished and (job := self._running.get(out.request_id)) is not None:
                        for i in job.ids:
                            self._running.pop(i, None)
                        self.counts["finished"] += 1
                        self._resolve(job, out)
        except BaseException as e:  # noqa: BLE001 - the engine is gone: fail everyone, health check reports it
            self.error = e
            dead = EngineDead(f"{type(e).__name__}: {e}")
            for job in list(self._pending) + list({id(j): j for j in self._running.values()}.values()):
                self._resolve(job, error=dead)
            self._pending.clear()
            self._running.clear()
            while True:  # and whoever is still in the inbox
                try:
                    kind, job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    self._resolve(job, error=dead)


def replica_gpus(args) -> float:
    """GPUs a replica asks Ray for (`gpus_per_replica`, -1 = one where the cluster has GPUs)."""
    import ray

    from hh_ray.runtime import gpus_for

    return gpus_for(args.gpus_per_replica, ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0, 1)

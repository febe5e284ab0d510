"""A server that sheds load (serve/load.py): deadlines, a bounded queue, a health check that
replaces a replica whose PM died, the Host check.

The engine loop's deadline and death handling are tested on a fake engine (no vLLM, fast);
the rest on one real Ray Serve app over real HTTP on 127.0.0.1 (tiny policy, untrained PM),
started once for the module with small limits: one request at a time, one queued, a 3 s
body deadline, a 2 s generation deadline and a health check every second.
"""

import asyncio
import json
import os
import signal
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

pytestmark = pytest.mark.timeout(600)


# ---------------------------------------------------------------- the engine loop, on a fake engine

class _Out(SimpleNamespace):
    pass


class _FakeEngine:
    """vLLM's LLMEngine as EngineLoop uses it: step() advances every request one token."""

    def __init__(self, fail_at_step: int | None = None):
        self.running, self.aborted, self.steps, self.fail_at_step = {}, [], 0, fail_at_step

    def step(self):
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("engine core died")
        time.sleep(0.001)
        out = []
        for rid, left in list(self.running.items()):
            self.running[rid] = left - 1
            if left <= 1:
                del self.running[rid]
                out.append(_Out(request_id=rid.split("-")[0], finished=True, outputs=[_Out(text="done")]))
        return out

    def abort_request(self, ids, internal=False):
        assert internal
        self.aborted += ids
        for i in ids:
            self.running.pop(i, None)


class _FakeLLM:
    def __init__(self, **kw):
        self.llm_engine, self.n = _FakeEngine(**kw), 0

    def enqueue(self, prompts, params, use_tqdm=False):  # params: tokens the request needs
        rid = f"{self.n}-ab12"  # internal id; outputs carry the external one, as vLLM's do
        self.n += 1
        self.llm_engine.running[rid] = params
        return [rid]


def _wait(pred, timeout=5.0):
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        time.sleep(0.01)


def test_engine_loop_answers_and_aborts_past_the_deadline():
    from serve.load import EngineLoop

    llm = _FakeLLM()
    loop = EngineLoop(llm, max_running=2)

    async def run():
        far = time.monotonic() + 30
        out = await loop.generate([1, 2], 3, far)
        assert out.outputs[0].text == "done"
        with pytest.raises(TimeoutError):  # needs 10^9 steps: dropped at its deadline
            await loop.generate([1], 10 ** 9, time.monotonic() + 0.1)
        # A caller that stops waiting (its own timeout, a client gone) has its request aborted too.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.generate([1], 10 ** 9, far), 0.1)
        # Past max_running, requests wait outside the engine and still finish.
        outs = await asyncio.gather(*(loop.generate([1], 5, far) for _ in range(5)))
        assert len(outs) == 5

    asyncio.run(run())
    _wait(lambda: loop.stats()["running"] == 0)
    assert llm.llm_engine.aborted == ["1-ab12", "2-ab12"] and not llm.llm_engine.running
    assert loop.stats() == {"running": 0, "waiting": 0, "finished": 6, "timed_out": 1, "abandoned": 1}
    loop.check()  # healthy
    loop.stop()


def test_a_dead_engine_fails_its_callers_and_the_health_check():
    from serve.app import check_engine
    from serve.load import EngineDead, EngineLoop, engine_unavailable

    loop = EngineLoop(_FakeLLM(fail_at_step=3))

    async def run():
        with pytest.raises(EngineDead, match="engine core died"):
            await loop.generate([1], 100, time.monotonic() + 30)
        with pytest.raises(EngineDead):  # and every later caller, at once
            await loop.generate([1], 1, time.monotonic() + 30)

    asyncio.run(run())
    with pytest.raises(EngineDead, match="engine core died"):
        check_engine(loop, stall_s=60)
    e = engine_unavailable(EngineDead("x"), 4.2)
    assert e.status == 503 and e.headers == {"Retry-After": "5"} and e.body()["error"]["code"] == "engine_dead"


def test_a_stuck_engine_fails_the_health_check():
    from serve.app import check_engine
    from serve.load import EngineLoop

    block = threading.Event()
    llm = _FakeLLM()
    step = llm.llm_engine.step
    llm.llm_engine.step = lambda: (block.wait(), step())[1]  # a step that never returns
    loop = EngineLoop(llm)

    async def run():
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(loop.generate([1], 1, time.monotonic() + 30), 0.3)

    asyncio.run(run())
    check_engine(loop, stall_s=60)  # not yet
    with pytest.raises(RuntimeError, match="made no step"):
        check_engine(loop, stall_s=0.1)
    block.set()


def test_host_and_origin_checks():
    from serve.load import APIError, allowed_host_names, check_host

    loopback = allowed_host_names("127.0.0.1")
    for ok in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST", "[::1]:8000", "localhost."):
        check_host({"host": ok}, "", loopback)
    check_host({}, "", loopback)  # no Host at all: not a browser
    for bad in ("evil.example:8000", "127.0.0.1.nip.io", "0.0.0.0:8000", "10.0.0.5"):
        with pytest.raises(APIError) as e:
            check_host({"host": bad}, "", loopback)
        assert e.value.status == 421 and e.value.code == "misdirected_request" and "DNS rebinding" in e.value.message
    check_host({"host": "localhost:8000", "origin": "http://localhost:8000"}, "", loopback)
    for bad in ("https://evil.example", "null"):
        with pytest.raises(APIError) as e:
            check_host({"host": "127.0.0.1:8000", "origin": bad}, "", loopback)
        assert e.value.status == 403 and e.value.code == "forbidden_origin"
    check_host({"host": "evil.example", "origin": "null"}, "key", loopback)  # a key protects the server instead
    lan = allowed_host_names("10.0.0.5", ["assistant.lan"])
    check_host({"host": "10.0.0.5:8000"}, "", lan)
    check_host({"host": "assistant.lan"}, "", lan)
    with pytest.raises(APIError):
        check_host({"host": "localhost:8000"}, "", lan)  # not bound there: not ours
    assert allowed_host_names("0.0.0.0") == {"127.0.0.1", "localhost", "::1"}


def test_a_dead_pm_actor_fails_the_health_check(ray_cluster):
    from serve.app import pm_alive

    @ray_cluster.remote(num_cpus=0)
    class Scorer:
        def score(self):
            return 1.0

    pm = Scorer.remote()
    asyncio.run(pm_alive(pm, 30))
    ray_cluster.kill(pm)
    # ray.kill returns before the actor is gone: a ping sent at once may still be answered.
    deadline = time.monotonic() + 30
    with pytest.raises(RuntimeError, match="the PM actor does not answer"):
        while time.monotonic() < deadline:
            asyncio.run(pm_alive(pm, 5))
            time.sleep(0.2)


# ---------------------------------------------------------------- one real app over HTTP

MESSAGES = [{"role": "user", "content": "How do I bake bread?"}]
SLOW = {"messages": MESSAGES, "n": 8, "best_of": 16, "max_tokens": 900}  # 128 sequences of up to 900 tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pm_actors(ray):
    """{actor id: pid} of the live PM actors (from the GCS: the session's cluster has no dashboard)."""
    return {a["ActorID"]: a["Pid"] for a in ray._private.state.actors().values()
            if a["ActorClassName"] == "PMScorer" and a["State"] == "ALIVE"}


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from hh_ray.models import load_scalar_head_model, save_model
    from serve.app import start

    d = tmp_path_factory.mktemp("serve-load")
    pm, tok = load_scalar_head_model(tiny_model)  # untrained head: enough to rank candidates
    save_model(pm, tok, d / "pm")
    before = set(_pm_actors(ray_cluster))
    port = _free_port()
    t0 = time.monotonic()
    start(dict(policy=tiny_model, pm=str(d / "pm"), kv_cache_gib=0.25, max_tokens=900, default_max_tokens=8,
               body_timeout_s=3, generation_timeout_s=2, max_ongoing_requests=1, max_queued_requests=1,
               queue_full_status=429, retry_after_s=3, health_check_period_s=1, health_check_timeout_s=10),
          port=port, name="hh-ray-load")
    print(f"\napp up in {time.monotonic() - t0:.1f} s")
    pms = set(_pm_actors(ray_cluster)) - before
    assert len(pms) == 1
    yield SimpleNamespace(url=f"http://127.0.0.1:{port}", port=port, pm_actor=pms.pop())
    serve.shutdown()


def _health(app):
    r = httpx.get(app.url + "/healthz", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _chat(app, body, **kw):
    return httpx.post(app.url + "/v1/chat/completions", json=body, timeout=120, **kw)


def _slow_body_client(port: int) -> socket.socket:
    """A client that sends its headers and half its body, then nothing."""
    s = socket.create_connection(("127.0.0.1", port))
    body = json.dumps({"messages": MESSAGES}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body[:10])
    return s


def _response(s: socket.socket, timeout: float = 30) -> tuple[int, dict]:
    s.settimeout(timeout)
    raw = b""
    while b"\r\n\r\n" not in raw:
        raw += s.recv(65536)
    head, rest = raw.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(rest) < length:
        rest += s.recv(65536)
    return int(head.split()[1]), json.loads(rest[:length])


def test_wrong_host_is_refused(app):
    r = httpx.get(app.url + "/healthz", headers={"Host": f"rebound.example:{app.port}"}, timeout=30)
    assert r.status_code == 421, r.text
    assert r.json()["error"]["code"] == "misdirected_request" and "DNS rebinding" in r.json()["error"]["message"]
    r = _chat(app, {"messages": MESSAGES, "max_tokens": 2}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin"
    r = httpx.get(f"http://localhost:{app.port}/healthz", timeout=30)
    assert r.status_code == 200, r.text


def test_a_full_queue_is_refused_at_once_and_a_slow_body_gets_408(app):
    """One request in the replica (a client that never finishes its body), one queued behind it:
    the next is refused at once with 429 and Retry-After, not left hanging; the slow client
    gets 408 when its body deadline passes, and the server answers again."""
    holder = _slow_body_client(app.port)
    time.sleep(1.0)  # it reaches the replica, which waits for the body
    queued = _slow_body_client(app.port)
    time.sleep(0.3)
    t0 = time.monotonic()
    r = _chat(app, {"messages": MESSAGES, "max_tokens": 2})
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "3" and time.monotonic() - t0 < 1.0
    status, body = _response(holder)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert "did not arrive within 3 s" in body["error"]["message"]
    holder.close()
    queued.close()  # gone before its turn: Serve drops it once it notices (not at once under load)
    deadline = time.monotonic() + 15
    while True:
        r = _chat(app, {"messages": MESSAGES, "max_tokens": 2, "best_of": 1})
        if r.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text


def test_generation_past_its_deadline_gets_504_and_is_dropped(app):
    t0 = time.monotonic()
    r = _chat(app, SLOW)
    took = time.monotonic() - t0
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "generation_timeout" and err["type"] == "timeout_error"
    assert "not ready within 2 s" in err["message"] and took < 10
    # The engine stopped working on it: nothing runs, the request counted as dropped.
    _wait(lambda: _health(app)["engine"]["running"] == 0, 10)
    eng = _health(app)["engine"]
    assert eng["timed_out"] + eng["abandoned"] >= 1
    # Streamed, the deadline arrives as an SSE error event after the 200 header.
    with httpx.stream("POST", app.url + "/v1/chat/completions", json={**SLOW, "stream": True}, timeout=60) as s:
        assert s.status_code == 200
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "generation_timeout"
    r = _chat(app, {"messages": MESSAGES, "max_tokens": 4, "best_of": 2})
    assert r.status_code == 200 and len(r.json()["hh_ray"]["candidate_pm_scores"][0]) == 2


def test_a_replica_whose_pm_died_is_replaced(app, ray_cluster):
    before = _health(app)["replica"]
    os.kill(_pm_actors(ray_cluster)[app.pm_actor], signal.SIGKILL)
    t0 = time.monotonic()
    while True:  # Serve's health check (every 1 s) fails, and Serve starts a new replica with a new PM
        assert time.monotonic() - t0 < 180, "the replica was not replaced"
        try:
            r = httpx.get(app.url + "/healthz", timeout=10)
            if r.status_code == 200 and r.json()["replica"] != before:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    print(f"\nreplaced in {time.monotonic() - t0:.1f} s")
    r = _chat(app, {"messages": MESSAGES, "max_tokens": 4, "best_of": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["hh_ray"]["candidate_pm_scores"][0]) == 2

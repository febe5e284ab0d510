"""A bounded load test of the Serve app on loopback: more concurrent clients than the replica
holds and queues, a fixed number of requests within a fixed time. The server should refuse
the excess at once (503 or 429 with Retry-After), answer the rest (200), and answer nothing
else with a 5xx; no request should hang.

    .venv/bin/python bench/bench_load.py [--requests 400] [--duration 60] [--clients 16]
        [--max-ongoing 4] [--max-queued 4] [--model tiny]

The app binds 127.0.0.1 only (a free port), with the limits given; clients are one
`httpx.AsyncClient` per client, each sending its next request as soon as the last was
answered (after a refusal, `--pause-after-refusal` seconds; they do not wait for
Retry-After, to keep the pressure on). Stops at `--requests` sent or `--duration`
seconds, whichever first; each request has a client timeout of generation timeout + 30 s,
and one that runs out counts as "no answer". Prints counts by outcome and the latency
p50/p95 of the answered and of the refused. Not a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import QUESTIONS, _free_port  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] if xs else float("nan")


async def drive(url: str, clients: int, total: int, duration: float, max_tokens: int, client_timeout: float,
                pause_after_refusal: float) -> dict:
    import httpx

    sent = 0
    status = collections.Counter()
    latency: dict[str, list[float]] = collections.defaultdict(list)
    retry_after = collections.Counter()
    stop_at = time.monotonic() + duration

    async def client(k: int):
        nonlocal sent
        async with httpx.AsyncClient(timeout=client_timeout) as http:
            while sent < total and time.monotonic() < stop_at:
                i = sent
                sent += 1
                body = {"messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                        "max_tokens": max_tokens, "seed": i}
                t0 = time.perf_counter()
                try:
                    r = await http.post(url + "/v1/chat/completions", json=body)
                except httpx.TimeoutException:
                    status["no answer"] += 1
                    continue
                except httpx.HTTPError as e:
                    status[f"connection error ({type(e).__name__})"] += 1
                    continue
                dt = time.perf_counter() - t0
                status[r.status_code] += 1
                if r.status_code in (429, 503):
                    latency["refused"].append(dt)
                    retry_after["with Retry-After" if "retry-after" in r.headers else "without"] += 1
                    await asyncio.sleep(pause_after_refusal)
                elif r.status_code == 200:
                    latency["ok"].append(dt)

    t0 = time.monotonic()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return dict(sent=sent, status=status, latency=latency, retry_after=retry_after, wall=time.monotonic() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=400, help="requests to send in all")
    ap.add_argument("--duration", type=float, default=60, help="seconds at most")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (past max_ongoing + max_queued)")
    ap.add_argument("--max-ongoing", type=int, default=4, help="the replica's max_ongoing_requests")
    ap.add_argument("--max-queued", type=int, default=4, help="the deployment's max_queued_requests")
    ap.add_argument("--queue-full-status", type=int, default=503, choices=[503, 429])
    ap.add_argument("--generation-timeout-s", type=float, default=30)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--pause-after-refusal", type=float, default=0.5, help="seconds a refused client waits")
    ap.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a policy folder")
    ap.add_argument("--cpus", type=float, default=1, help="CPUs of the replica (vLLM threads)")
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    args = ap.parse_args()

    import ray
    from ray import serve

    from hh_ray.models import resolve_model
    from serve.app import start

    policy = resolve_model(args.model)
    ray.init(num_cpus=max(2, int(args.cpus) + 1), include_dashboard=False, log_to_driver=False)
    port = _free_port()
    t0 = time.perf_counter()
    start(dict(policy=policy, cpus_per_replica=args.cpus, kv_cache_gib=args.kv_cache_gib,
               max_ongoing_requests=args.max_ongoing, max_queued_requests=args.max_queued,
               queue_full_status=args.queue_full_status, generation_timeout_s=args.generation_timeout_s),
          host="127.0.0.1", port=port, name="hh-ray-load")
    print(f"app up in {time.perf_counter() - t0:.1f} s: {Path(policy).name}, 127.0.0.1:{port}, "
          f"max_ongoing_requests={args.max_ongoing}, max_queued_requests={args.max_queued}, "
          f"queue full -> {args.queue_full_status}, generation_timeout_s={args.generation_timeout_s:g}", flush=True)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 4}, timeout=120).raise_for_status()  # warm-up
        r = asyncio.run(drive(url, args.clients, args.requests, args.duration, args.max_tokens,
                              args.generation_timeout_s + 30, args.pause_after_refusal))
    finally:
        serve.shutdown()
        ray.shutdown()

    st = r["status"]
    refused = st[429] + st[503]
    other_5xx = {k: v for k, v in st.items() if isinstance(k, int) and k >= 500 and k != 503}
    other = {k: v for k, v in st.items() if k not in (200, 429, 503) and k not in other_5xx}
    ok, ref = r["latency"]["ok"], r["latency"]["refused"]
    print(f"{args.clients} clients, {r['sent']} requests sent in {r['wall']:.1f} s "
          f"(limits: {args.requests} requests, {args.duration:g} s)")
    print(f"  answered 200:      {st[200]}  (p50 {pct(ok, .5):.2f} s, p95 {pct(ok, .95):.2f} s)")
    print(f"  refused 429/503:   {refused}  (429: {st[429]}, 503: {st[503]}; "
          f"{r['retry_after']['with Retry-After']} with Retry-After; p50 {pct(ref, .5) * 1000:.0f} ms, "
          f"p95 {pct(ref, .95) * 1000:.0f} ms)")
    print(f"  other 5xx:         {sum(other_5xx.values())}  {dict(other_5xx) if other_5xx else ''}")
    print(f"  other outcomes:    {sum(other.values())}  {dict(other) if other else ''}")
    print(f"  throughput:        {st[200] / r['wall']:.1f} answered/s")


if __name__ == "__main__":
    main()
